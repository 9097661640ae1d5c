"""What a user has to be able to trust: epoch numbering, resume after a crash, retention, one writer
per split, full disks, deleted or damaged stores and odd inputs.

Small, deterministic data (fixed seeds, a few rows per batch, 3-10 rows per chunk), no sleeps: threads
and child processes are coordinated with Events and pipes. Metrics are checked against
``oocmetrics.compute_arrays`` over the concatenated rows (rtol 1e-12); what is on disk is read with
zarr or ``oocmetrics.compute_stored``.
"""
from __future__ import annotations

import collections.abc
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
import zarr

import oocmetrics
from oocmetrics import recorder as recorder_mod
from oocmetrics import store as store_mod
from oocmetrics.__main__ import main as cli_main

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 60  # seconds: a guard against hangs only, never reached by a passing test

# Shared by the tests and the child processes (exec'd in both), so the parent regenerates exactly
# what a child recorded.
DATA_SRC = r'''
import numpy as np

def epoch_batches(epoch, n_batches=3, rows=3, trailing=(2,), seed=1000, dtype=np.float32):
    """Seeded batches of one epoch: (y_true, y_pred) pairs of shape (rows, *trailing)."""
    rng = np.random.default_rng(seed + epoch)
    out = []
    for b in range(n_batches):
        t = (epoch + rng.standard_normal((rows, *trailing))).astype(dtype)
        p = (t + 0.5 * rng.standard_normal(t.shape) + 0.1 * b).astype(dtype)
        out.append((t, p))
    return out
'''
exec(DATA_SRC)
epoch_batches: Callable[..., list[tuple[np.ndarray, np.ndarray]]]  # defined by the exec above

# A child that holds a split open: records ``n_complete`` finished epochs, then two batches of the
# next epoch and flushes them (durable, epoch incomplete), reports, and waits for a command on stdin:
# "close" closes the recorder (then waits again), anything else (or EOF) exits without closing.
# The parent may also SIGKILL it while it waits.
HOLDER_CHILD = DATA_SRC + r'''
import json, os, sys
import oocmetrics

path, split, n_complete = sys.argv[1], sys.argv[2], int(sys.argv[3])
rec = oocmetrics.Recorder(path, split, chunk_rows=4, keep_epochs=None)
for e in range(n_complete):
    for t, p in epoch_batches(e):
        rec.update(t, p)
    rec.reset()
for t, p in epoch_batches(n_complete)[:2]:
    rec.update(t, p)
rec.flush()
print(json.dumps({"pid": os.getpid(), "epoch": rec.epoch, "rows": rec.rows, "durable": rec.durable_rows}), flush=True)
if sys.stdin.readline().strip() == "close":
    rec.close()
    print("closed", flush=True)
    sys.stdin.readline()
os._exit(0)
'''


# ------------------------------------------------------------------------------------------ helpers
def _cat(batches: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


def assert_same(res: oocmetrics.EpochMetrics, t: np.ndarray, p: np.ndarray, metrics: Any = None) -> None:
    """Every overall and per-output value equals compute_arrays over the same rows (rtol 1e-12).

    atol 1e-14 (a few ulps of 1.0) only for values near 0 of ``1 - a/b`` metrics (r2, explained
    variance): the stored epoch's chunks merge in another tree than compute_arrays' single block.
    """
    ref = oocmetrics.compute_arrays(t, p, metrics=metrics)
    assert list(res.overall) == list(ref.overall)
    assert res.n_rows == ref.n_rows == t.shape[0]
    for name in ref.overall:
        np.testing.assert_allclose(res.overall[name], ref.overall[name], rtol=1e-12, atol=1e-14, err_msg=name)
    for name in ref.per_output:
        np.testing.assert_allclose(res.per_output[name], ref.per_output[name], rtol=1e-12, atol=1e-14, err_msg=name)


def epoch_dirs(path: Path, split: str) -> list[str]:
    """The ``epoch=<k>`` directories of a split on disk, by number."""
    d = Path(path) / split
    if not d.is_dir():
        return []
    names = [e.name for e in d.iterdir() if e.is_dir() and e.name.startswith("epoch=")]
    return sorted(names, key=lambda n: int(n.split("=", 1)[1]) if n.split("=", 1)[1].isdigit() else -1)


def epoch_group(path: Path, split: str, epoch: int) -> zarr.Group:
    return zarr.open_group(str(Path(path) / split / f"epoch={epoch}"), mode="r")


def assert_on_disk(path: Path, split: str, epoch: int, t: np.ndarray, p: np.ndarray, *, complete: bool) -> None:
    """The stored epoch holds exactly (t, p): attrs, array shapes and values."""
    g = epoch_group(path, split, epoch)
    assert g.attrs["rows"] == t.shape[0]
    assert g.attrs["complete"] is complete
    assert g.attrs["epoch"] == epoch
    assert g["y_true"].shape == t.shape and g["y_pred"].shape == p.shape
    np.testing.assert_array_equal(g["y_true"][:], t)
    np.testing.assert_array_equal(g["y_pred"][:], p)


def snapshot(d: Path) -> dict[str, bytes]:
    """Every file under ``d`` with its bytes (to show a directory was not touched)."""
    return {str(f.relative_to(d)): f.read_bytes() for f in sorted(Path(d).rglob("*")) if f.is_file()}


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file())


def held_and_durable(message: str) -> tuple[int, int]:
    """(held, durable) row counts stated by a WriterError message."""
    held = re.search(r"(\d+) rows are held in memory", message)
    durable = re.search(r"(\d+) rows (?:of this epoch )?are durable", message)
    assert held and durable, f"no row counts in the message: {message}"
    return int(held.group(1)), int(durable.group(1))


def call_with_timeout(fn: Callable[[], Any], timeout: float = 20) -> BaseException | None:
    """Run ``fn`` in a thread; fail the test if it does not return in time; return its exception."""
    box: dict[str, BaseException | None] = {"exc": None}

    def target() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box["exc"] = exc

    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join(timeout)
    assert not th.is_alive(), f"{fn} did not return within {timeout} s (hang)"
    return box["exc"]


def abandon(rec: oocmetrics.Recorder) -> None:
    """Test cleanup of a recorder left in a failed state: stop its writer and release its lock."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rec._abandon(RuntimeError)


def readline(proc: subprocess.Popen, timeout: float = TIMEOUT) -> str:
    """One line of a child's stdout, failing (not hanging) if none comes."""
    box: dict[str, str] = {}
    th = threading.Thread(target=lambda: box.setdefault("line", proc.stdout.readline()), daemon=True)
    th.start()
    th.join(timeout)
    if "line" not in box or not box["line"]:
        proc.kill()
        _, err = proc.communicate(timeout=TIMEOUT)
        pytest.fail(f"child gave no line (rc {proc.returncode}); stderr:\n{err}")
    return box["line"]


def start_holder(path: Path, split: str, n_complete: int) -> tuple[subprocess.Popen, dict[str, Any]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER_CHILD, str(path), split, str(n_complete)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO),
    )
    return proc, json.loads(readline(proc))


def tell(proc: subprocess.Popen, line: str) -> None:
    proc.stdin.write(line + "\n")
    proc.stdin.flush()


def finish(proc: subprocess.Popen) -> None:
    try:
        proc.stdin.close()
    except OSError:
        pass
    proc.wait(timeout=TIMEOUT)
    proc.stdout.close()
    proc.stderr.close()


@pytest.fixture(scope="module")
def crashed_store(tmp_path_factory) -> Path:
    """A run killed mid-epoch: epochs 0 and 1 complete, epoch 2 with 6 durable rows, never closed.

    Recorded by a child process that is SIGKILLed after a flush (keep_epochs=None, chunk_rows=4).
    Tests copy it before changing anything.
    """
    path = tmp_path_factory.mktemp("crash") / "run"
    proc, info = start_holder(path, "val", 2)
    proc.send_signal(signal.SIGKILL)
    finish(proc)
    assert info == {"pid": info["pid"], "epoch": 2, "rows": 6, "durable": 6}
    return path


def copy_crashed(crashed_store: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(crashed_store, dest)
    return dest


# ========================================================================= lifecycle: epoch numbers
def test_explicit_epoch_is_stored_under_that_number(tmp_path):
    batches = epoch_batches(0)
    rec = oocmetrics.Recorder(tmp_path / "r", "val", epoch=5, chunk_rows=4)
    assert rec.epoch == 5
    for t, p in batches:
        rec.update(t, p)
    res = rec.compute()
    rec.close()
    assert res.epoch == 5
    assert epoch_dirs(tmp_path / "r", "val") == ["epoch=5"]
    assert_on_disk(tmp_path / "r", "val", 5, *_cat(batches), complete=True)
    stored = oocmetrics.compute_stored(tmp_path / "r", "val")
    assert stored.epoch == 5
    assert_same(stored, *_cat(batches))


def test_reset_with_nothing_recorded_does_not_advance(tmp_path):
    path = tmp_path / "r"
    rec = oocmetrics.Recorder(path, "val", chunk_rows=4, keep_epochs=None)
    rec.reset()
    rec.reset()
    assert rec.epoch == 0 and rec.rows == 0
    assert epoch_dirs(path, "val") == []
    for t, p in epoch_batches(0):
        rec.update(t, p)
    rec.reset()
    assert rec.epoch == 1
    rec.reset()  # empty again: stays at 1
    assert rec.epoch == 1
    assert epoch_dirs(path, "val") == ["epoch=0"]
    rec.close()
    assert epoch_dirs(path, "val") == ["epoch=0"]


def test_torchmetrics_habit_reset_first_numbers_epochs_from_zero(tmp_path):
    path = tmp_path / "r"
    data = {}
    with oocmetrics.Recorder(path, "val", chunk_rows=4, keep_epochs=None) as rec:
        for e in range(3):
            rec.reset()
            data[e] = epoch_batches(e)
            for t, p in data[e]:
                rec.update(t, p)
            res = rec.compute()
            assert res.epoch == e and rec.epoch == e
            assert_same(res, *_cat(data[e]))
    assert epoch_dirs(path, "val") == ["epoch=0", "epoch=1", "epoch=2"]
    for e in range(3):
        assert_on_disk(path, "val", e, *_cat(data[e]), complete=True)
        assert_same(oocmetrics.compute_stored(path, "val", e), *_cat(data[e]))


def test_reset_with_epoch_must_increase_and_may_jump(tmp_path):
    path = tmp_path / "r"
    rec = oocmetrics.Recorder(path, "val", chunk_rows=4, keep_epochs=None)
    for t, p in epoch_batches(0):
        rec.update(t, p)
    rec.reset()
    assert rec.epoch == 1
    with pytest.raises(ValueError, match=r"epoch=0"):
        rec.reset(epoch=0)  # epoch 0 is finished
    assert rec.epoch == 1
    b1 = epoch_batches(1)
    for t, p in b1:
        rec.update(t, p)
    for k in (0, 1):  # 1 is the epoch being recorded: not a new number either
        with pytest.raises(ValueError, match=rf"epoch={k}"):
            rec.reset(epoch=k)
    assert (rec.epoch, rec.rows, rec.batches) == (1, 9, 3)  # the refused resets lost nothing
    rec.reset(epoch=10)
    assert rec.epoch == 10 and rec.rows == 0
    b10 = epoch_batches(10)
    for t, p in b10:
        rec.update(t, p)
    rec.close()
    assert epoch_dirs(path, "val") == ["epoch=0", "epoch=1", "epoch=10"]
    assert_on_disk(path, "val", 1, *_cat(b1), complete=True)
    assert_on_disk(path, "val", 10, *_cat(b10), complete=True)


# ====================================================================== lifecycle: resume a crash
def test_resume_replaces_the_crashed_epoch_and_keeps_the_finished_ones(crashed_store, tmp_path):
    path = copy_crashed(crashed_store, tmp_path)
    assert epoch_dirs(path, "val") == ["epoch=0", "epoch=1", "epoch=2"]
    assert epoch_group(path, "val", 2).attrs["complete"] is False
    assert epoch_group(path, "val", 2).attrs["rows"] == 6
    before = {e: snapshot(path / "val" / f"epoch={e}") for e in (0, 1)}

    rec = oocmetrics.Recorder(path, "val", mode="resume", keep_epochs=None, chunk_rows=4)
    assert rec.epoch == 2
    assert epoch_dirs(path, "val") == ["epoch=0", "epoch=1", "epoch=2"]  # opening deleted nothing
    new = epoch_batches(20, n_batches=4, rows=2)  # 8 new rows, other values than the crashed 6
    for t, p in new:
        rec.update(t, p)
    res = rec.compute()
    rec.close()

    assert_same(res, *_cat(new))
    assert epoch_dirs(path, "val") == ["epoch=0", "epoch=1", "epoch=2"]
    assert_on_disk(path, "val", 2, *_cat(new), complete=True)  # exactly the new rows
    assert_same(oocmetrics.compute_stored(path, "val", 2), *_cat(new))
    for e in (0, 1):
        assert snapshot(path / "val" / f"epoch={e}") == before[e]  # byte for byte untouched
        assert_on_disk(path, "val", e, *_cat(epoch_batches(e)), complete=True)


def test_resume_with_epoch_replaces_later_epochs_only_when_the_new_epoch_writes(crashed_store, tmp_path):
    path = copy_crashed(crashed_store, tmp_path)
    before = snapshot(path / "val")

    # opening (and closing with nothing recorded) deletes nothing
    rec = oocmetrics.Recorder(path, "val", mode="resume", epoch=1, keep_epochs=None, chunk_rows=4)
    assert rec.epoch == 1
    rec.close()
    assert snapshot(path / "val") == before

    rec = oocmetrics.Recorder(path, "val", mode="resume", epoch=1, keep_epochs=None, chunk_rows=4)
    new = epoch_batches(30, n_batches=3, rows=3)
    rec.update(*new[0])  # 3 rows < chunk_rows: nothing written yet
    assert snapshot(path / "val") == before
    rec.flush()  # the first chunk of the new epoch 1 is written: now 1 and 2 are replaced
    assert epoch_dirs(path, "val") == ["epoch=0", "epoch=1"]
    assert_on_disk(path, "val", 1, *_cat(new[:1]), complete=False)
    for t, p in new[1:]:
        rec.update(t, p)
    rec.close()
    assert epoch_dirs(path, "val") == ["epoch=0", "epoch=1"]
    assert_on_disk(path, "val", 1, *_cat(new), complete=True)
    assert_on_disk(path, "val", 0, *_cat(epoch_batches(0)), complete=True)
    assert snapshot(path / "val" / "epoch=0") == {k[len("epoch=0/"):]: v for k, v in before.items()
                                                   if k.startswith("epoch=0/")}


def test_resume_with_default_retention_never_deletes_by_opening(crashed_store, tmp_path):
    path = copy_crashed(crashed_store, tmp_path)
    before = snapshot(path / "val")
    rec = oocmetrics.Recorder(path, "val", mode="resume")  # keep_epochs=1 (the default)
    assert rec.epoch == 2
    assert snapshot(path / "val") == before
    rec.reset()  # nothing recorded: nothing finished, nothing to retain
    rec.close()
    assert snapshot(path / "val") == before
    assert epoch_dirs(path, "val") == ["epoch=0", "epoch=1", "epoch=2"]


def test_lock_is_released_when_the_holder_is_sigkilled(tmp_path):
    path = tmp_path / "run"
    proc, info = start_holder(path, "val", 1)
    try:
        with pytest.raises(oocmetrics.LockedError, match=rf"process {info['pid']}\b"):
            oocmetrics.Recorder(path, "val", mode="resume")
    finally:
        proc.send_signal(signal.SIGKILL)
        finish(proc)
    with oocmetrics.Recorder(path, "val", mode="resume", keep_epochs=None, chunk_rows=4) as rec:
        assert rec.epoch == 1  # the killed run's epoch 1 was incomplete: it is recorded again
        new = epoch_batches(7)
        for t, p in new:
            rec.update(t, p)
    assert_on_disk(path, "val", 1, *_cat(new), complete=True)
    assert_on_disk(path, "val", 0, *_cat(epoch_batches(0)), complete=True)


# =========================================================================== lifecycle: retention
def test_keep_epochs_zero_readme_loop_leaves_the_last_epoch_after_close(tmp_path):
    path = tmp_path / "r"
    rec = oocmetrics.Recorder(path, "val", keep_epochs=0, chunk_rows=4)
    results = {}
    for e in range(3):
        for t, p in epoch_batches(e):
            rec.update(t, p)
        results[e] = rec.compute()
        rec.reset()
    rec.close()
    assert epoch_dirs(path, "val") == ["epoch=2"]
    assert_on_disk(path, "val", 2, *_cat(epoch_batches(2)), complete=True)
    stored = oocmetrics.compute_stored(path, "val")
    assert stored.epoch == 2
    assert_same(stored, *_cat(epoch_batches(2)))
    assert_same(results[2], *_cat(epoch_batches(2)))


@pytest.mark.parametrize("loop", ["readme", "close_ends_last_epoch"])
def test_keep_epochs_one_after_three_epochs_leaves_the_last(tmp_path, loop):
    path = tmp_path / "r"
    with oocmetrics.Recorder(path, "val", keep_epochs=1, chunk_rows=4) as rec:
        for e in range(3):
            for t, p in epoch_batches(e):
                rec.update(t, p)
            if loop == "readme":
                rec.compute()
                rec.reset()
            elif e < 2:
                rec.reset()
    assert epoch_dirs(path, "val") == ["epoch=2"]
    assert_on_disk(path, "val", 2, *_cat(epoch_batches(2)), complete=True)


# ================================================================ lifecycle: exceptions in `with`
@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt])
def test_exception_in_with_block_leaves_the_epoch_incomplete(tmp_path, exc_type):
    path = tmp_path / "r"
    batches = epoch_batches(0)
    with pytest.raises(exc_type):
        with oocmetrics.Recorder(path, "val", chunk_rows=4) as rec:
            for t, p in batches:
                rec.update(t, p)
            raise exc_type("the training loop stopped")
    assert rec.closed
    assert_on_disk(path, "val", 0, *_cat(batches), complete=False)  # every row durable, not finished
    # the lock was released; resume replaces the unfinished epoch
    with oocmetrics.Recorder(path, "val", mode="resume", chunk_rows=4) as rec:
        assert rec.epoch == 0
        for t, p in batches:
            rec.update(t, p)
    assert_on_disk(path, "val", 0, *_cat(batches), complete=True)  # a normal exit marks it complete


# ============================================================================ lifecycle: results
def test_compute_returns_a_fresh_object_each_call(tmp_path):
    batches = epoch_batches(0, n_batches=4)
    with oocmetrics.Recorder(tmp_path / "r", "val", chunk_rows=4) as rec:
        for n_done in (2, 4):
            for t, p in batches[n_done - 2:n_done]:
                rec.update(t, p)
            first = rec.compute()  # computed afresh after new rows
            first.overall["mse"] = -1.0
            first.overall.pop("r2")
            first.per_output["mae"][:] = -1.0
            first.per_output["rmse"] = np.zeros(2)
            first.extra["batches"] = -1
            second = rec.compute()  # nothing recorded in between: the cached result, as a copy
            assert second is not first
            assert_same(second, *_cat(batches[:n_done]))
            assert second.extra["batches"] == n_done
            third = rec.compute()
            assert third is not second and third == second


def test_epoch_metrics_is_a_mapping_and_metrics_may_be_a_generator(tmp_path):
    batches = epoch_batches(0)
    t, p = _cat(batches)
    with oocmetrics.Recorder(tmp_path / "r", "val", chunk_rows=4, metrics=(m for m in ["mse", "r2"])) as rec:
        for bt, bp in batches[:2]:
            rec.update(bt, bp)
        early = rec.compute()
        rec.update(*batches[2])
        res = rec.compute()  # the generator was read once: the selection holds for every compute
    assert list(early) == ["mse", "r2"]
    assert isinstance(res, collections.abc.Mapping)
    assert list(res) == ["mse", "r2"] and len(res) == 2
    assert dict(res) == res.overall
    assert list(res.items()) == list(res.overall.items())
    assert list(res.keys()) == ["mse", "r2"] and list(res.values()) == list(res.overall.values())
    assert "mse" in res and "mae" not in res and res.get("mae") is None
    ref = oocmetrics.compute_arrays(t, p, metrics=(m for m in ["mse", "r2"]))
    assert list(ref) == ["mse", "r2"]
    assert_same(res, t, p, metrics=["mse", "r2"])
    for name in ref:
        np.testing.assert_allclose(res[name], ref[name], rtol=1e-12)


# ========================================================================= lifecycle: on-disk size
def test_sealed_epoch_arrays_hold_exactly_the_rows(tmp_path):
    path = tmp_path / "r"
    batches = epoch_batches(0, n_batches=5, rows=5, trailing=(3, 2))  # 25 rows, chunks of 10
    rec = oocmetrics.Recorder(path, "val", chunk_rows=10)
    for t, p in batches:
        rec.update(t, p)
    res = rec.compute()
    g = epoch_group(path, "val", 0)
    assert g["y_true"].shape == (25, 3, 2) and g["y_pred"].shape == (25, 3, 2)
    rec.close()
    assert_on_disk(path, "val", 0, *_cat(batches), complete=True)
    assert_same(res, *_cat(batches))


def test_small_epoch_with_default_chunk_mb_is_small_on_disk(tmp_path):
    path = tmp_path / "r"
    batches = epoch_batches(0, n_batches=5, rows=8, trailing=(3,))  # 40 rows, default chunk_mb=8
    rec = oocmetrics.Recorder(path, "val")
    for t, p in batches:
        rec.update(t, p)
    res = rec.compute()
    rec.close()
    size = dir_bytes(path / "val" / "epoch=0")
    assert size < 1 << 20, f"a 40-row epoch takes {size} bytes on disk"
    assert_on_disk(path, "val", 0, *_cat(batches), complete=True)
    assert_same(res, *_cat(batches))

    # an epoch that grows after a compute (its single chunk is rebuilt): still exact and small
    more = epoch_batches(1, n_batches=6, rows=8, trailing=(3,))
    with oocmetrics.Recorder(path, "val", mode="resume", keep_epochs=None) as rec:
        for t, p in more[:5]:
            rec.update(t, p)
        assert_same(rec.compute(), *_cat(more[:5]))
        rec.update(*more[5])
        assert_same(rec.compute(), *_cat(more))
    assert_on_disk(path, "val", 1, *_cat(more), complete=True)
    assert dir_bytes(path / "val" / "epoch=1") < 1 << 20


def test_epoch_metadata_stays_small_for_many_outputs_and_has_dimension_names(tmp_path):
    path = tmp_path / "r"
    batches = epoch_batches(0, n_batches=2, rows=2, trailing=(10_000,))
    with oocmetrics.Recorder(path, "val", chunk_rows=3) as rec:
        for t, p in batches:
            rec.update(t, p)
        res = rec.compute()
    assert_same(res, *_cat(batches))
    epoch_dir = path / "val" / "epoch=0"
    for meta in (epoch_dir / "zarr.json", epoch_dir / "y_true" / "zarr.json", epoch_dir / "y_pred" / "zarr.json"):
        assert meta.stat().st_size < 4096, f"{meta} is {meta.stat().st_size} bytes"
    for trailing in [(), (2,), (3, 2)]:
        p2 = tmp_path / f"dims{len(trailing)}"
        t, p = epoch_batches(0, n_batches=1, rows=4, trailing=trailing)[0]
        with oocmetrics.Recorder(p2, "val", chunk_rows=3) as rec:
            rec.update(t, p)
        g = epoch_group(p2, "val", 0)
        for name in ("y_true", "y_pred"):
            dims = g[name].metadata.dimension_names
            assert dims is not None and len(dims) == 1 + len(trailing), dims
            assert all(isinstance(d, str) and d for d in dims) and len(set(dims)) == len(dims)
            assert dims[0] == "row"


def test_import_changes_no_process_wide_settings():
    code = (
        "import json, os, zarr\n"
        "before = [zarr.config.get('threading.max_workers'), os.environ.get('NUMBA_CACHE_DIR')]\n"
        "import oocmetrics\n"
        "after = [zarr.config.get('threading.max_workers'), os.environ.get('NUMBA_CACHE_DIR')]\n"
        "print(json.dumps([before, after]))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_", "ZARR_", "PYTEST_"))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=str(REPO), timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr
    before, after = json.loads(out.stdout.strip().splitlines()[-1])
    assert before == after
    assert after[1] is None  # NUMBA_CACHE_DIR was not set


# ============================================================================ concurrency: locks
def test_second_writer_in_the_same_process_is_refused(tmp_path):
    path = tmp_path / "r"
    b0, b1 = epoch_batches(0), epoch_batches(1)
    first = oocmetrics.Recorder(path, "val", chunk_rows=4, keep_epochs=None)
    try:
        for t, p in b0:
            first.update(t, p)
        first.reset()
        for t, p in b1[:2]:
            first.update(t, p)
        first.flush()
        before = snapshot(path / "val")
        for mode in ("create", "resume", "overwrite"):
            with pytest.raises(oocmetrics.LockedError, match=rf"process {os.getpid()}\b") as ei:
                oocmetrics.Recorder(path, "val", mode=mode)
            assert isinstance(ei.value, oocmetrics.StoreError)
        assert snapshot(path / "val") == before  # overwrite deleted nothing
        # another split of the same store works side by side
        with oocmetrics.Recorder(path, "test", chunk_rows=4) as other:
            for t, p in b1:
                other.update(t, p)
        assert_on_disk(path, "test", 0, *_cat(b1), complete=True)
        # readers need no lock
        assert_same(oocmetrics.compute_stored(path, "val", 0), *_cat(b0))
        assert_same(oocmetrics.compute_stored(path, "val", 1), *_cat(b1[:2]))
        assert cli_main(["compute", str(path), "--split", "val", "--epoch", "1"]) == 0
        # the writer is unaffected by all this
        first.update(*b1[2])
        assert_same(first.compute(), *_cat(b1))
    finally:
        first.close()
    with oocmetrics.Recorder(path, "val", mode="resume", keep_epochs=None) as again:
        assert again.epoch == 2
    assert_on_disk(path, "val", 1, *_cat(b1), complete=True)


def test_second_writer_in_another_process_is_refused(tmp_path):
    path = tmp_path / "run"
    proc, info = start_holder(path, "val", 1)  # epoch 0 complete, epoch 1: 6 durable rows
    try:
        before = snapshot(path / "val")
        for mode in ("create", "resume", "overwrite"):
            with pytest.raises(oocmetrics.LockedError, match=rf"process {info['pid']}\b") as ei:
                oocmetrics.Recorder(path, "val", mode=mode)
            assert isinstance(ei.value, oocmetrics.StoreError)
        assert snapshot(path / "val") == before  # overwrite deleted nothing
        with oocmetrics.Recorder(path, "test", chunk_rows=4) as other:  # another split: fine
            other.update(*epoch_batches(5)[0])
        # readers while the child holds the lock
        b0, b1 = epoch_batches(0), epoch_batches(1)
        assert_same(oocmetrics.compute_stored(path, "val", 0), *_cat(b0))
        durable = oocmetrics.compute_stored(path, "val", 1)
        assert_same(durable, *_cat(b1[:2]))
        out = subprocess.run([sys.executable, "-m", "oocmetrics", "compute", str(path), "--split", "val"],
                             capture_output=True, text=True, cwd=str(REPO), timeout=TIMEOUT)
        assert out.returncode == 0, out.stderr
        assert "epoch 1: 6 rows" in out.stdout and "INCOMPLETE" in out.stdout
        tell(proc, "close")
        assert readline(proc).strip() == "closed"
        with oocmetrics.Recorder(path, "val", mode="resume", keep_epochs=None) as rec:  # free again
            assert rec.epoch == 2
    finally:
        finish(proc)
    assert_on_disk(path, "val", 1, *_cat(epoch_batches(1)[:2]), complete=True)


def test_two_threads_in_one_recorder_get_a_runtime_error(tmp_path, monkeypatch):
    entered, release = threading.Event(), threading.Event()
    real = recorder_mod.check_batch
    gate_thread: list[threading.Thread] = []

    def gated(*args, **kwargs):
        if gate_thread and threading.current_thread() is gate_thread[0]:
            entered.set()
            assert release.wait(TIMEOUT)
        return real(*args, **kwargs)

    monkeypatch.setattr(recorder_mod, "check_batch", gated)
    batches = epoch_batches(0, n_batches=3)
    rec = oocmetrics.Recorder(tmp_path / "r", "val", chunk_rows=4)
    rec.update(*batches[0])
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            rec.update(*batches[1])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    th = threading.Thread(target=worker, daemon=True)
    gate_thread.append(th)
    th.start()
    try:
        assert entered.wait(TIMEOUT)  # the worker is inside update()
        with pytest.raises(RuntimeError, match="another thread"):
            rec.update(*batches[2])
        with pytest.raises(RuntimeError, match="another thread"):
            rec.compute()
    finally:
        release.set()
        th.join(TIMEOUT)
    assert not th.is_alive() and errors == []
    assert (rec.rows, rec.batches) == (6, 2)  # the worker's batch recorded, the refused one not
    rec.update(*batches[2])
    res = rec.compute()
    rec.close()
    assert_same(res, *_cat(batches))
    assert_on_disk(tmp_path / "r", "val", 0, *_cat(batches), complete=True)


@pytest.mark.parametrize("deleted", ["epoch", "store"])
@pytest.mark.parametrize("then", ["update_flush", "compute"])
def test_store_deleted_mid_epoch_is_an_error_not_wrong_metrics(tmp_path, deleted, then):
    path = tmp_path / "r"
    batches = epoch_batches(0, n_batches=4)
    rec = oocmetrics.Recorder(path, "val", chunk_rows=4)
    try:
        for t, p in batches[:2]:
            rec.update(t, p)
        rec.flush()
        shutil.rmtree(path / "val" / "epoch=0" if deleted == "epoch" else path)
        if then == "update_flush":
            rec.update(*batches[2])
            with pytest.raises(oocmetrics.StoreError, match="epoch=0"):
                rec.flush()
        with pytest.raises(oocmetrics.StoreError, match="epoch=0"):
            rec.compute()
        with pytest.raises(oocmetrics.StoreError):  # stays an error
            rec.compute()
    finally:
        abandon(rec)


# ============================================================================ full disk / writes
def _enospc() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")


def _fail_while(monkeypatch, method: str) -> dict:
    """Make ``EpochStore.<method>`` raise ENOSPC while the returned ``state["fail"]`` is True."""
    state = {"fail": False}
    real = getattr(store_mod.EpochStore, method)

    def flaky(self, *args, **kwargs):
        if state["fail"]:
            raise _enospc()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(store_mod.EpochStore, method, flaky)
    return state


@pytest.mark.parametrize("where", ["create", "build"])
def test_full_disk_when_the_epoch_is_created(tmp_path, monkeypatch, where):
    path = tmp_path / "r"
    state = {"fail": True}
    if where == "create":
        real_create = store_mod.EpochStore.create.__func__

        def flaky_create(cls, spec, chunk_rows):
            if state["fail"]:
                raise _enospc()
            return real_create(cls, spec, chunk_rows)

        monkeypatch.setattr(store_mod.EpochStore, "create", classmethod(flaky_create))
    else:  # the disk fills up half-way through building the epoch's group
        real_build = store_mod._build

        def flaky_build(spec, chunk_rows, dest):
            real_build(spec, chunk_rows, dest)
            if state["fail"]:
                raise _enospc()

        monkeypatch.setattr(store_mod, "_build", flaky_build)

    batches = epoch_batches(0, n_batches=3, rows=4)  # 12 rows; chunks of 5: the first batch fills none
    big = _cat(batches[:2])
    rec = oocmetrics.Recorder(path, "val", chunk_rows=5)
    try:
        rec.update(*big)  # 8 rows: chunk 0 full, its write creates the epoch, which fails
        with pytest.raises(oocmetrics.WriterError, match="disk is full") as ei:
            rec.flush()
        assert not isinstance(ei.value, OSError)
        held, durable = held_and_durable(str(ei.value))
        assert (held, durable) == (rec.rows, 0) == (8, 0)
        assert epoch_dirs(path, "val") == []  # no empty epoch group left in the split
        with pytest.raises(oocmetrics.WriterError):
            rec.compute()
        state["fail"] = False
        rec.retry()
        rec.update(*batches[2])
        res = rec.compute()
        rec.close()
    finally:
        if not rec.closed:
            abandon(rec)
    assert_same(res, *_cat(batches))
    assert_on_disk(path, "val", 0, *_cat(batches), complete=True)


def test_full_disk_when_reset_marks_the_epoch_complete(tmp_path, monkeypatch):
    path = tmp_path / "r"
    state = _fail_while(monkeypatch, "mark_complete")
    b0, b1 = epoch_batches(0), epoch_batches(1)
    rec = oocmetrics.Recorder(path, "val", chunk_rows=4, keep_epochs=None)
    try:
        for t, p in b0:
            rec.update(t, p)
        state["fail"] = True
        exc = call_with_timeout(rec.reset)
        assert isinstance(exc, oocmetrics.WriterError), repr(exc)
        assert "complete" in str(exc) and "disk is full" in str(exc)
        held, durable = held_and_durable(str(exc))
        on_disk = epoch_group(path, "val", 0).attrs["rows"]
        assert durable == on_disk == 9 and held == rec.rows - on_disk == 0
        assert epoch_group(path, "val", 0).attrs["complete"] is False
        exc = call_with_timeout(rec.reset)  # again, fault still there: raises again, no hang
        assert isinstance(exc, oocmetrics.WriterError), repr(exc)
        assert (rec.epoch, rec.rows) == (0, 9)
        state["fail"] = False
        exc = call_with_timeout(rec.reset)  # fault cleared, no retry yet: raises or succeeds
        assert exc is None or isinstance(exc, oocmetrics.WriterError), repr(exc)
        if exc is not None:
            assert call_with_timeout(rec.retry) is None
            assert call_with_timeout(rec.reset) is None
        assert (rec.epoch, rec.rows) == (1, 0)
        assert_on_disk(path, "val", 0, *_cat(b0), complete=True)
        for t, p in b1:
            rec.update(t, p)
        res = rec.compute()
        rec.close()
    finally:
        if not rec.closed:
            abandon(rec)
    assert_same(res, *_cat(b1))
    assert_on_disk(path, "val", 0, *_cat(b0), complete=True)
    assert_on_disk(path, "val", 1, *_cat(b1), complete=True)


@pytest.mark.parametrize("fault", ["write_chunk", "mark_complete"])
def test_close_failing_keeps_the_recorder_open_until_retry(tmp_path, monkeypatch, fault):
    path = tmp_path / "r"
    state = _fail_while(monkeypatch, fault)
    first = epoch_batches(0, n_batches=1, rows=3)
    rest = epoch_batches(1, n_batches=1, rows=30)  # one batch spanning 8 chunks of 4
    rec = oocmetrics.Recorder(path, "val", chunk_rows=4, queue_chunks=2)
    try:
        rec.update(*first[0])
        rec.flush()  # 3 rows durable
        if fault == "write_chunk":
            state["fail"] = True
            rec.update(*rest[0])
        else:
            rec.update(*rest[0])
            state["fail"] = True
        exc = call_with_timeout(rec.close)
        assert isinstance(exc, oocmetrics.WriterError), repr(exc)
        assert not rec.closed
        on_disk = epoch_group(path, "val", 0).attrs["rows"]
        held, durable = held_and_durable(str(exc))
        assert durable == on_disk and held == rec.rows - on_disk
        assert rec.rows == 33 and on_disk == (3 if fault == "write_chunk" else 33)
        exc = call_with_timeout(rec.close)  # still failing: still open, nothing dropped
        assert isinstance(exc, oocmetrics.WriterError) and not rec.closed
        state["fail"] = False
        assert call_with_timeout(rec.retry) is None
        assert call_with_timeout(rec.close) is None
        assert rec.closed
    finally:
        if not rec.closed:
            abandon(rec)
    t, p = _cat(first + rest)
    assert_on_disk(path, "val", 0, t, p, complete=True)
    assert_same(oocmetrics.compute_stored(path, "val", 0), t, p)
    with oocmetrics.Recorder(path, "val", mode="resume") as again:  # the lock was released
        assert again.epoch == 1


@pytest.mark.parametrize("base_rows, failing_rows", [(5, 15), (3, 8)])
def test_writer_error_message_counts_match_the_recorder_and_the_disk(tmp_path, monkeypatch, base_rows, failing_rows):
    """(5, 15): the durable rows end in a sealed partial chunk; (3, 8): the failed batch leaves 2 rows
    in the chunk buffer, never submitted (they are held too)."""
    path = tmp_path / "r"
    state = _fail_while(monkeypatch, "write_chunk")
    base = epoch_batches(0, n_batches=2, rows=base_rows)
    failing = epoch_batches(1, n_batches=1, rows=failing_rows)
    last = epoch_batches(2, n_batches=1, rows=5)
    rec = oocmetrics.Recorder(path, "val", chunk_rows=3)
    try:
        for t, p in base:
            rec.update(t, p)
        rec.flush()
        assert epoch_group(path, "val", 0).attrs["rows"] == 2 * base_rows
        state["fail"] = True
        rec.update(*failing[0])  # one call: the writer's failure surfaces at the next call
        messages = []
        for call in (rec.flush, rec.compute, lambda: rec.update(*last[0])):
            exc = call_with_timeout(call)
            assert isinstance(exc, oocmetrics.WriterError), repr(exc)
            messages.append(str(exc))
        on_disk = epoch_group(path, "val", 0).attrs["rows"]
        assert rec.rows == 2 * base_rows + failing_rows and on_disk == 2 * base_rows  # update refused
        for msg in messages:
            assert held_and_durable(msg) == (rec.rows - on_disk, on_disk) == (failing_rows, 2 * base_rows), msg
        state["fail"] = False
        rec.retry()
        rec.update(*last[0])
        res = rec.compute()
        rec.close()
    finally:
        if not rec.closed:
            abandon(rec)
    everything = base + failing + last
    assert_same(res, *_cat(everything))
    assert_on_disk(path, "val", 0, *_cat(everything), complete=True)


def test_fsync_records_and_computes(tmp_path):
    path = tmp_path / "r"
    b0, b1 = epoch_batches(0, n_batches=4), epoch_batches(1, n_batches=2)
    with oocmetrics.Recorder(path, "val", chunk_rows=4, fsync=True, keep_epochs=None) as rec:
        for t, p in b0:
            rec.update(t, p)
        assert_same(rec.compute(), *_cat(b0))
        rec.reset()
        for t, p in b1:
            rec.update(t, p)
        assert_same(rec.compute(), *_cat(b1))
    assert_on_disk(path, "val", 0, *_cat(b0), complete=True)
    assert_on_disk(path, "val", 1, *_cat(b1), complete=True)
    assert_same(oocmetrics.compute_stored(path, "val", 1), *_cat(b1))


# ================================================================================== bad input
@pytest.mark.parametrize("native", [np.float32, np.float64])
def test_big_endian_arrays_are_accepted_and_converted(tmp_path, native):
    path = tmp_path / "r"
    batches = epoch_batches(0, n_batches=4, dtype=native)
    big = np.dtype(native).newbyteorder(">")
    with oocmetrics.Recorder(path, "val", chunk_rows=4) as rec:
        rec.update(batches[0][0].astype(big), batches[0][1].astype(big))
        rec.update(*batches[1])  # native after big-endian
        rec.update(batches[2][0].astype(big), batches[2][1])  # mixed
        rec.update(batches[3][0], batches[3][1].astype(big))
        res = rec.compute()
    t, p = _cat(batches)
    assert_same(res, t, p)
    g = epoch_group(path, "val", 0)
    assert g["y_true"].dtype == np.dtype(native) and g["y_true"].dtype.isnative
    assert_on_disk(path, "val", 0, t, p, complete=True)
    ref = oocmetrics.compute_arrays(t.astype(big), p.astype(big))
    assert_same(ref, t, p)


def test_meta_device_tensors_are_refused_and_lose_nothing(tmp_path):
    batches = epoch_batches(0)
    with oocmetrics.Recorder(tmp_path / "r", "val", chunk_rows=4) as rec:
        rec.update(*batches[0])
        meta = torch.empty(3, 2, device="meta")
        real = torch.from_numpy(batches[1][0])
        for t, p, name in [(meta, meta, "y_true"), (real, meta, "y_pred")]:
            with pytest.raises((TypeError, ValueError), match="meta") as ei:
                rec.update(t, p)
            assert name in str(ei.value)
        assert (rec.rows, rec.batches) == (3, 1)
        for t, p in batches[1:]:
            rec.update(torch.from_numpy(t), torch.from_numpy(p))
        res = rec.compute()
    assert_same(res, *_cat(batches))
    assert_on_disk(tmp_path / "r", "val", 0, *_cat(batches), complete=True)


@pytest.mark.parametrize("split", ["..", ".", "zarr.json", "a\\b", "a/b", ""])
def test_unsafe_split_names_are_refused(tmp_path, split):
    with pytest.raises(ValueError, match="split="):
        oocmetrics.Recorder(tmp_path / "r", split)
    assert not (tmp_path / "r").exists()  # refused before anything was created
    with oocmetrics.Recorder(tmp_path / "ok", "val") as rec:
        rec.update(*epoch_batches(0)[0])
    with pytest.raises(ValueError, match="split="):
        oocmetrics.compute_stored(tmp_path / "ok", split)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]


def test_foreign_epoch_group_is_ignored_and_not_written_into(tmp_path, capsys):
    path = tmp_path / "r"
    b0 = epoch_batches(0)
    with oocmetrics.Recorder(path, "val", chunk_rows=4) as rec:
        for t, p in b0:
            rec.update(t, p)
    foreign = zarr.open_group(str(path / "val" / "epoch=7"), mode="w", zarr_format=3)
    foreign.attrs["owner"] = "someone else"
    foreign.create_array("data", shape=(2,), dtype="f4")
    before = snapshot(path / "val" / "epoch=7")
    capsys.readouterr()
    assert cli_main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "val/epoch=0" in out
    assert re.search(r"epoch=7.*IGNORED", out), out

    b1 = epoch_batches(1)
    rec = oocmetrics.Recorder(path, "val", mode="resume", chunk_rows=4, keep_epochs=None)
    try:
        assert rec.epoch == 1  # the foreign group does not count as an epoch
        for t, p in b1:
            rec.update(t, p)
        rec.reset(epoch=7)
        rec.update(*epoch_batches(7)[0])  # 3 rows < chunk_rows: written at the flush
        with pytest.raises(oocmetrics.StoreError, match="epoch=7"):
            rec.flush()
    finally:
        abandon(rec)
    assert snapshot(path / "val" / "epoch=7") == before  # left as it was
    assert_on_disk(path, "val", 1, *_cat(b1), complete=True)
    assert_on_disk(path, "val", 0, *_cat(b0), complete=True)


@pytest.mark.parametrize("damaged", ["epoch", "epoch_of_two", "root"])
def test_corrupt_zarr_json_is_a_store_error_naming_the_file(tmp_path, capsys, damaged):
    path = tmp_path / "r"
    with oocmetrics.Recorder(path, "val", chunk_rows=4, keep_epochs=None) as rec:
        for t, p in epoch_batches(0):
            rec.update(t, p)
        if damaged == "epoch_of_two":  # the damaged epoch is not the split's only one
            rec.reset()
            for t, p in epoch_batches(1):
                rec.update(t, p)
    epoch = 1 if damaged == "epoch_of_two" else 0
    target = path / "val" / f"epoch={epoch}" / "zarr.json" if damaged != "root" else path / "zarr.json"
    target.write_bytes(b"\x00\xff{not json")
    with pytest.raises(oocmetrics.StoreError) as ei:
        oocmetrics.compute_stored(path, "val", epoch)
    assert str(target) in str(ei.value)
    capsys.readouterr()
    assert cli_main(["compute", str(path), "--split", "val", "--epoch", str(epoch)]) == 2
    assert str(target) in capsys.readouterr().err
    if damaged == "root":
        with pytest.raises(oocmetrics.StoreError) as ei:
            oocmetrics.Recorder(path, "val", mode="resume")
        assert str(target) in str(ei.value)
        assert cli_main(["inspect", str(path)]) == 2
        assert str(target) in capsys.readouterr().err
