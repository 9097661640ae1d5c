"""`python -m oocmetrics inspect/compute`, including an epoch whose process died mid-epoch."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import oocmetrics
from oocmetrics.__main__ import compute_stored, main
from reference import assert_matches

CRASH = r"""
import os, sys
import numpy as np
import oocmetrics
rng = np.random.default_rng(1)
rec = oocmetrics.Recorder(sys.argv[1], "train", chunk_rows=8)
for b in range(7):                      # 35 rows: chunks of 8 -> 32 rows flushed, 3 in the buffer
    t = rng.standard_normal((5, 4)).astype(np.float32)
    rec.update(t, t + 0.5)
rec._writer.wait()                      # let the writer finish the full chunks ...
os._exit(0)                             # ... then die without close(): no final flush
"""


def test_inspect_and_compute(tmp_path, capsys):
    rng = np.random.default_rng(0)
    t = rng.standard_normal((30, 10, 3)).astype(np.float32)
    p = t + 0.2
    with oocmetrics.Recorder(tmp_path / "run", "val", chunk_rows=4) as rec:
        rec.update(t[:13], p[:13])
        rec.update(t[13:], p[13:])
    assert main(["inspect", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "val/epoch=0: 30 rows x (10, 3) float32, 0.0 MiB, 2 batches" in out and "complete" in out
    assert main(["compute", str(tmp_path / "run"), "--split", "val", "--json", str(tmp_path / "m.json")]) == 0
    data = json.loads((tmp_path / "m.json").read_text())
    assert_matches(compute_stored(tmp_path / "run", "val"), t, p)
    assert data["n_rows"] == 30 and data["overall"]["mse"] == pytest.approx(0.04, rel=1e-6)


def test_crashed_run_keeps_every_flushed_chunk(tmp_path):
    subprocess.run([sys.executable, "-c", CRASH, str(tmp_path / "run")], check=True, timeout=300)
    out = subprocess.run(
        [sys.executable, "-m", "oocmetrics", "inspect", str(tmp_path / "run")],
        capture_output=True, text=True, check=True, timeout=300,
    ).stdout
    assert "train/epoch=0: 32 rows" in out and "INCOMPLETE" in out
    rng = np.random.default_rng(1)
    t = np.concatenate([rng.standard_normal((5, 4)).astype(np.float32) for _ in range(7)])[:32]
    assert_matches(compute_stored(tmp_path / "run", "train", 0), t, t + np.float32(0.5))


def test_errors_name_the_problem(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "No oocmetrics store at" in capsys.readouterr().err
    with oocmetrics.Recorder(tmp_path / "run", "val") as rec:
        rec.update(np.zeros((2, 2), np.float32), np.ones((2, 2), np.float32))
    assert main(["compute", str(tmp_path / "run"), "--split", "test"]) == 2
    assert "No split 'test'" in capsys.readouterr().err
    assert main(["compute", str(tmp_path / "run"), "--split", "val", "--epoch", "5"]) == 2
    assert "No epoch 5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compute", str(tmp_path / "run"), "--metrics", "nope"])
