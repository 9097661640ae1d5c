"""`python -m oocmetrics report`: PNGs that are real images, a report.md that shows the exact numbers
and links every PNG, the sections that depend on the data (steps, groups, intervals), and errors."""
from __future__ import annotations

import importlib.util
import json
import struct
import subprocess
import sys

import numpy as np

import oocmetrics
from oocmetrics.__main__ import main
from oocmetrics.report import NO_MATPLOTLIB, default_out_dir

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(path):
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", path
    assert len(data) > 8000, f"{path} is only {len(data)} bytes"
    return struct.unpack(">II", data[16:24])


def _store(path, rng, shape=(26, 12, 4), *, groups=None, chunk_rows=4):
    t = rng.standard_normal(shape).astype(np.float32)
    p = (t + 0.3 * rng.standard_normal(shape)).astype(np.float32)
    with oocmetrics.Recorder(path, "val", chunk_rows=chunk_rows) as rec:
        kw = {} if groups is None else {"groups": groups[:9]}
        rec.update(t[:9], p[:9], **kw)
        kw = {} if groups is None else {"groups": groups[9:]}
        rec.update(t[9:], p[9:], **kw)
    return path


def test_report_of_sequences_with_groups(tmp_path, rng, capsys):
    groups = np.repeat([11, 12, 13], [10, 10, 6])
    path = _store(tmp_path / "run", rng, groups=groups)
    assert main(["report", str(path), "--split", "val"]) == 0
    out = default_out_dir(path, "val", 0)
    assert out == tmp_path / "run-report" / "val-epoch=0"  # beside the store, not inside the zarr tree
    assert f"wrote {out / 'report.md'}" in capsys.readouterr().out
    pngs = ["per_output.png", "abs_error.png", "per_step.png", "per_group.png"]
    assert sorted(p.name for p in out.glob("*.png")) == sorted(pngs)
    for name in pngs:
        width, height = _png_size(out / name)
        assert width >= 600 and height >= 300, name
    md = (out / "report.md").read_text()
    for name in pngs:
        assert f"]({name})" in md, name
    result = oocmetrics.compute_stored(path, "val", quantiles=True)
    assert f"| rmse | {result['rmse']:.6g} |" in md
    assert f"| 0.99 | {result.quantiles['pooled'][-1]:.6g} |" in md
    assert "12 steps x 4 outputs" in md and "| group | rows |" in md and "| 13 | 6 |" in md
    if importlib.util.find_spec("oocmetrics.intervals") is not None:
        assert "95% interval" in md and "Intervals: block bootstrap" in md
    doc = json.loads((out / "report.json").read_text())
    assert doc["metrics"]["overall"]["rmse"] == result["rmse"]
    assert doc["breakdown"]["steps"] == 12 and doc["breakdown"]["per_group"]["groups"] == [11, 12, 13]
    assert doc["breakdown"]["abs_error_histogram"]["n"] == result.n_values


def test_report_of_flat_rows_without_groups(tmp_path, rng):
    path = _store(tmp_path / "run", rng, shape=(30, 5), chunk_rows=7)
    out = tmp_path / "custom"
    assert main(["report", str(path), "--split", "val", "--epoch", "0", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["abs_error.png", "per_output.png"]
    for name in ("abs_error.png", "per_output.png"):
        _png_size(out / name)
    md = (out / "report.md").read_text()
    assert "No step axis: the data are (5,) per row" in md
    assert "No groups recorded in this epoch" in md
    assert not (tmp_path / "run-report").exists()


def test_errors_exit_2_and_write_nothing(tmp_path, rng, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "No oocmetrics store at" in capsys.readouterr().err
    path = _store(tmp_path / "run", rng, shape=(6, 3, 2))
    assert main(["report", str(path), "--split", "test"]) == 2
    assert "No split 'test'" in capsys.readouterr().err
    assert main(["report", str(path), "--split", "val", "--epoch", "4"]) == 2
    assert "No epoch 4" in capsys.readouterr().err
    assert not (tmp_path / "run-report").exists()


def test_missing_matplotlib_names_the_fix(tmp_path, rng, monkeypatch, capsys):
    path = _store(tmp_path / "run", rng, shape=(6, 3, 2))
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    assert main(["report", str(path), "--split", "val"]) == 2
    err = capsys.readouterr().err
    assert "pip install matplotlib" in err and NO_MATPLOTLIB in err
    assert not (tmp_path / "run-report").exists()


def test_report_leaves_pyplot_and_the_backend_alone(tmp_path, rng):
    path = _store(tmp_path / "run", rng, shape=(8, 3, 2))
    code = (
        "import sys, matplotlib\n"
        "before = matplotlib.rcParams._get_backend_or_none()\n"
        "from oocmetrics.report import write_report\n"
        f"md = write_report({str(path)!r}, 'val')\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
        "assert matplotlib.rcParams._get_backend_or_none() == before\n"
        "print(md)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("report.md")
