"""A real full filesystem (a small tmpfs), not an injected error: nothing durable is lost, nothing is
counted twice, retry() finishes the epoch once space is freed, and the CLI reads the store throughout.

Needs permission to mount a tmpfs (root, as in CI here); skipped elsewhere.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import oocmetrics


@pytest.fixture
def small_fs(tmp_path: Path):
    mnt = tmp_path / "fs"
    mnt.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                              capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "oocmetrics", *args], capture_output=True, text=True)


def test_a_real_full_disk_loses_nothing_and_retry_finishes(small_fs: Path) -> None:
    rng = np.random.default_rng(7)
    batches = [(rng.standard_normal((100, 20)).astype(np.float32),) for _ in range(40)]
    batches = [(t, (t + 0.1 * rng.standard_normal(t.shape)).astype(np.float32)) for (t,) in batches]
    rec = oocmetrics.Recorder(small_fs / "run", "val", chunk_rows=1000)
    ballast = small_fs / "ballast"
    free = os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize
    ballast.write_bytes(b"\0" * (free - 400_000))  # room for about 2 chunks of both arrays
    recorded, failure = 0, None
    for t, p in batches:
        try:
            rec.update(t, p)
            recorded += 1
        except oocmetrics.WriterError as exc:
            failure = exc
            break
    if failure is None:
        with pytest.raises(oocmetrics.WriterError) as info:
            rec.flush()
        failure = info.value
    assert "disk is full" in str(failure) and "retry()" in str(failure)
    assert rec.rows == 100 * recorded  # the batch that met the error was not recorded, or whole
    durable = rec.durable_rows
    assert 0 < durable < rec.rows
    # the CLI reads the durable rows while the disk is still full
    out = _cli("compute", str(small_fs / "run"), "--split", "val")
    assert out.returncode == 0, out.stderr
    assert f"{durable} rows" in out.stdout and "INCOMPLETE" in out.stdout
    # free space: retry writes what was held, the rest of the epoch follows, nothing lost or doubled
    ballast.unlink()
    rec.retry()
    for t, p in batches[recorded:]:
        rec.update(t, p)
    res = rec.compute()
    rec.close()
    T = np.concatenate([t for t, _ in batches])
    P = np.concatenate([p for _, p in batches])
    ref = oocmetrics.compute_arrays(T, P)
    assert res.n_rows == T.shape[0]
    for k in ref:
        assert res[k] == pytest.approx(ref[k], rel=1e-12), k
    stored = oocmetrics.compute_stored(small_fs / "run", "val")
    assert stored.n_rows == T.shape[0] and stored.extra["complete"] is True
    assert _cli("inspect", str(small_fs / "run")).returncode == 0
