"""Recorder's device path: an epoch of CUDA tensors is staged by a DeviceStager (oocmetrics.capture).

Without a GPU the same path runs on CPU tensors through the test switch
``recorder._DEVICE_PATH_FOR_CPU_TENSORS`` (the stager on device="cpu": no events, nothing pinned).
Every test runs the device path against the host path on the same data (NumPy copies of the
batches, which take the host path whatever the switch): the metrics must be bit for bit the same,
and so must every stored array (data, labels, per-chunk partials) and epoch attribute. Tests marked
``cuda`` run real CUDA batches.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

import oocmetrics
from oocmetrics import recorder as recorder_mod
from oocmetrics import store as store_mod
from oocmetrics.errors import WriterError

torch = pytest.importorskip("torch")

from oocmetrics.capture import DeviceStager, NonFiniteBatchError, ReadyChunk  # noqa: E402

CUDA = torch.cuda.is_available()
cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def device_path(monkeypatch):
    """CPU tensors take the device path in every test here (NumPy arrays still take the host path)."""
    monkeypatch.setattr(recorder_mod, "_DEVICE_PATH_FOR_CPU_TENSORS", True)


# ------------------------------------------------------------------------------------------ helpers
Batch = tuple[Any, Any]


def make(sizes: list[int], trailing: tuple[int, ...] = (4, 3), seed: int = 0, dtype: Any = None) -> list[Batch]:
    """Tensor batches with a drifting error; ``dtype`` per batch (a list) or for all."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(sizes):
        t = 5.0 + torch.randn((n, *trailing), generator=g)
        p = t + 0.3 * torch.randn((n, *trailing), generator=g) + 0.01 * i
        dt = dtype[i % len(dtype)] if isinstance(dtype, list) else (dtype or torch.float32)
        out.append((t.to(dt), p.to(dt)))
    return out


def host(b: Batch) -> tuple[np.ndarray, np.ndarray]:
    """The batch as NumPy arrays, widened as the device path stores it (exact for float16/bfloat16)."""
    return tuple(x.numpy() if x.dtype == torch.float64 else x.float().numpy() for x in b)  # type: ignore[return-value]


def as_json(res: oocmetrics.EpochMetrics, *, source: bool = True) -> str:
    """Every number of a result (repr round-trips floats: equal strings are equal bits); ``source=False``
    leaves out which source computed it (to compare ``source="data"`` with ``"auto"``)."""
    out = res.to_dict()
    if not source:
        out.pop("source", None)
    return json.dumps(out, sort_keys=True)


def bits(a: np.ndarray) -> np.ndarray:
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def stored(path: Path, split: str) -> dict[str, Any]:
    """Every epoch of a split on disk: its attributes (less times and run id) and arrays."""
    out: dict[str, Any] = {}
    split_dir = path / split
    for name in sorted(os.listdir(split_dir)):
        if not name.startswith("epoch="):
            continue
        g = zarr.open_group(str(split_dir / name), mode="r")
        attrs = {k: v for k, v in g.attrs.items() if k not in ("created", "updated", "run_id")}
        arrays = {k: g[k][:] for k in sorted(g.array_keys())}
        out[name] = (attrs, arrays)
    return out


def assert_same_store(a: Path, b: Path, split: str) -> None:
    sa, sb = stored(a, split), stored(b, split)
    assert list(sa) == list(sb), (list(sa), list(sb))
    for name in sa:
        (attrs_a, arr_a), (attrs_b, arr_b) = sa[name], sb[name]
        assert attrs_a == attrs_b, name
        assert list(arr_a) == list(arr_b), name
        for k in arr_a:
            assert arr_a[k].dtype == arr_b[k].dtype and arr_a[k].shape == arr_b[k].shape, (name, k)
            np.testing.assert_array_equal(bits(arr_a[k]), bits(arr_b[k]), err_msg=f"{name}/{k}")


class Twin:
    """The same calls on a Recorder taking the device path and one taking the host path."""

    def __init__(self, root: Path, split: str = "val", **kwargs: Any) -> None:
        self.root = root
        self.split = split
        self.kwargs = kwargs
        self.dev = oocmetrics.Recorder(root / "dev", split, **kwargs)
        self.host = oocmetrics.Recorder(root / "host", split, **kwargs)

    def update(self, b: Batch, **labels: Any) -> None:
        self.dev.update(*b, **labels)
        self.host.update(*host(b), **{k: np.asarray(v) for k, v in labels.items()})
        assert self.dev._stager is not None and self.host._stager is None
        assert (self.dev.rows, self.dev.batches) == (self.host.rows, self.host.batches)

    def compute(self, **kwargs: Any) -> oocmetrics.EpochMetrics:
        got, ref = self.dev.compute(**kwargs), self.host.compute(**kwargs)
        assert as_json(got) == as_json(ref)
        return got

    def flush(self) -> None:
        self.dev.flush()
        self.host.flush()
        assert self.dev.durable_rows == self.host.durable_rows == self.dev.rows

    def reset(self) -> None:
        self.dev.reset()
        self.host.reset()
        assert self.dev.epoch == self.host.epoch

    def close(self) -> None:
        self.dev.close()
        self.host.close()

    def resume(self) -> None:
        self.dev = oocmetrics.Recorder(self.root / "dev", self.split, mode="resume", **self.kwargs)
        self.host = oocmetrics.Recorder(self.root / "host", self.split, mode="resume", **self.kwargs)
        assert self.dev.epoch == self.host.epoch

    def check_store(self) -> None:
        assert_same_store(self.root / "dev", self.root / "host", self.split)


def record_host(path: Path, batches: list[Batch], split: str = "val", **kwargs: Any) -> oocmetrics.EpochMetrics:
    """The host path's result over ``batches`` (the reference for runs that dropped some)."""
    with oocmetrics.Recorder(path, split, **kwargs) as rec:
        for b in batches:
            rec.update(*host(b))
        return rec.compute()


# ------------------------------------------------------------------------------ (a) same results
@pytest.mark.parametrize("chunk_rows,queue_chunks,seed", [(1, 1, 0), (3, 1, 1), (7, 2, 2), (16, 2, 3), (5, 3, 4)])
def test_random_batches_are_bit_identical_to_the_host_path(tmp_path, chunk_rows, queue_chunks, seed):
    """Batches of 0 to 3 chunks + 2 rows (some larger than the ring), many chunk boundaries."""
    rng = np.random.default_rng(seed)
    sizes = [int(x) for x in rng.integers(0, 3 * chunk_rows + 3, 40)]
    twin = Twin(tmp_path, chunk_rows=chunk_rows, queue_chunks=queue_chunks, split_every=2)
    for b in make(sizes, seed=seed):
        twin.update(b)
    twin.compute(source="auto")
    twin.compute(source="data", quantiles=(0.5, 0.9))
    assert twin.dev.rows == sum(sizes)
    twin.close()
    twin.check_store()


@pytest.mark.parametrize("dtypes", [
    [torch.float16], [torch.bfloat16], [torch.float64], [torch.float32, torch.float16, torch.bfloat16],
])
def test_narrow_and_wide_floats_are_stored_as_the_host_path_stores_them(tmp_path, dtypes):
    twin = Twin(tmp_path, chunk_rows=6)
    for b in make([5, 9, 2, 13], seed=3, dtype=dtypes):
        twin.update(b)
    twin.compute()
    twin.close()
    twin.check_store()
    want = np.float64 if dtypes == [torch.float64] else np.float32
    assert stored(tmp_path / "dev", "val")["epoch=0"][1]["y_pred"].dtype == want


@pytest.mark.parametrize("trailing", [(), (1,), (2, 3, 4)])
def test_row_shapes_from_scalars_to_three_axes(tmp_path, trailing):
    twin = Twin(tmp_path, chunk_rows=5)
    for b in make([4, 7, 1, 0, 12], trailing=trailing, seed=8):
        twin.update(b)
    twin.flush()
    twin.compute()
    twin.close()
    twin.check_store()


def test_chunk_mb_gives_the_same_chunk_grid(tmp_path):
    twin = Twin(tmp_path, chunk_mb=0.001)  # 1048 bytes: 21 rows of 12 float32
    for b in make([10, 30, 7, 1, 40]):
        twin.update(b)
    assert twin.dev._stager.chunk_rows == twin.dev._chunk_rows == twin.host._chunk_rows == 21
    twin.compute()
    twin.close()
    twin.check_store()


# ----------------------------------------------------------- (b) flush/compute mid-epoch, epochs
@pytest.mark.parametrize("seed", range(6))
def test_random_operations_match_the_host_path(tmp_path, seed):
    """update / flush / compute / reset in random order, then close and resume: same results, same store."""
    rng = np.random.default_rng(100 + seed)
    chunk_rows = int(rng.choice([1, 4, 9]))
    twin = Twin(tmp_path, chunk_rows=chunk_rows, queue_chunks=int(rng.integers(1, 3)), keep_epochs=None)
    batches = iter(make([int(x) for x in rng.integers(0, 2 * chunk_rows + 2, 200)], seed=seed))
    for _ in range(60):
        op = rng.choice(["update", "flush", "compute", "reset"], p=[0.7, 0.1, 0.12, 0.08])
        if op == "update":
            twin.update(next(batches))
        elif op == "flush":
            twin.flush()
        elif op == "compute" and twin.dev.rows:
            twin.compute(source=str(rng.choice(["auto", "data"])))
        elif op == "reset":
            twin.reset()
    twin.close()
    twin.check_store()
    twin.resume()
    for _ in range(3):
        twin.update(next(batches))
    twin.compute()
    twin.close()
    twin.check_store()


def test_flush_compute_then_continue_reset_close_and_resume(tmp_path):
    twin = Twin(tmp_path, chunk_rows=8, keep_epochs=None)
    b = make([5, 6, 3, 12, 1, 9, 4, 20, 2], seed=7)
    twin.update(b[0])
    twin.flush()  # a partial chunk 0 stored in a 5-row grid, rebuilt later
    twin.compute()
    twin.update(b[1])
    twin.compute(source="data")
    twin.flush()
    twin.flush()  # nothing new since the last flush
    twin.update(b[2])
    twin.update(b[3])
    twin.compute()
    stager = twin.dev._stager
    twin.reset()
    assert twin.dev._stager is None and twin.dev._spare_stager is stager and stager.rows == 0
    for x in b[4:7]:
        twin.update(x)
    assert twin.dev._stager is stager  # same layout: the slots (and their pinned memory) are reused
    twin.compute()
    twin.close()
    assert twin.dev._spare_stager is None and stager.closed
    twin.check_store()
    assert [e["complete"] for e, _ in stored(tmp_path / "dev", "val").values()] == [True, True]
    twin.resume()
    assert twin.dev.epoch == 2
    for x in b[7:]:
        twin.update(x)
    twin.compute()
    twin.close()
    twin.check_store()


def test_a_new_layout_or_a_host_epoch_frees_the_spare_stager(tmp_path):
    with oocmetrics.Recorder(tmp_path / "r", chunk_rows=4) as rec:
        rec.update(*make([3])[0])
        first = rec._stager
        rec.reset()
        rec.update(*make([3], trailing=(2,))[0])  # another layout: a new stager
        assert rec._stager is not first and first.closed
        second = rec._stager
        rec.reset()
        rec.update(*host(make([3])[0]))  # NumPy: the host path; the device buffers are let go
        assert rec._stager is None and rec._spare_stager is None and second.closed
        rec.reset()
        rec.update(*make([3])[0])
        assert rec._stager is not None and rec._spare == []
        res = rec.compute()
    assert res.n_rows == 3 and rec.stored_epochs() == [3]


def test_an_empty_first_batch_and_reset_without_rows(tmp_path):
    with oocmetrics.Recorder(tmp_path / "r", chunk_rows=4) as rec:
        rec.update(*make([0])[0])
        assert (rec.rows, rec.batches) == (0, 1) and rec._stager is not None
        rec.reset()  # nothing recorded: the epoch number stays
        assert rec.epoch == 0 and rec._spare_stager is not None
        rec.update(*make([6])[0])
        assert rec.compute().n_rows == 6


# ----------------------------------------------------------------------------- (c) NaN/Inf: raise
def nan_batches(sizes: list[int], bad: dict[int, tuple[int, int]], seed: int = 0) -> list[Batch]:
    """``bad``: batch -> (array 0 y_true / 1 y_pred, row in the batch) holding a NaN (an Inf for y_true)."""
    out = make(sizes, seed=seed)
    for i, (which, row) in bad.items():
        out[i][which][row, 1, 2] = float("inf") if which == 0 else float("nan")
    return out


def feed(rec: oocmetrics.Recorder, batches: list[Batch], kept: list[Batch], reports: list[tuple[int, int]]) -> None:
    """Update with every batch; on a NaN report drop what the recorder says it dropped from ``kept``."""
    for i, b in enumerate(batches):
        try:
            rec.update(*b)
            kept.append(b)
        except ValueError as exc:
            err = exc.__cause__
            assert isinstance(err, NonFiniteBatchError), exc
            assert f"in batch {err.batch_index} " in str(exc) and "the batch passed to this update() call" in str(exc)
            reports.append((i, err.batch_index))
            del kept[err.batch_index:]
        assert (rec.batches, rec.rows) == (len(kept), sum(x[0].shape[0] for x in kept))


def close_reporting(rec: oocmetrics.Recorder, kept: list[Batch], reports: list[tuple[int, int]]) -> None:
    try:
        rec.flush()
    except ValueError as exc:
        err = exc.__cause__
        assert isinstance(err, NonFiniteBatchError), exc
        assert "call it again" in str(exc)
        reports.append((-1, err.batch_index))
        del kept[err.batch_index:]
        rec.flush()


@pytest.mark.parametrize("chunk_rows,sizes,bad", [
    (8, [3] * 12, {5: (1, 2)}),  # batch 5 (rows 15-17) spans chunks 1 and 2; the NaN is in chunk 2's part
    (8, [3] * 12, {5: (0, 0)}),  # an Inf in y_true, in chunk 1's part
    (4, [3, 9, 2, 5, 1, 6], {1: (1, 8)}),  # a batch of three chunks, bad in its last
    (5, [2] * 20, {3: (1, 0), 11: (0, 1)}),  # two bad batches, reported one after the other
    (6, [4, 4, 4, 1], {3: (1, 0)}),  # the last batch: reported by flush
])
def test_nan_batch_is_reported_at_the_chunk_boundary_and_earlier_rows_kept(tmp_path, chunk_rows, sizes, bad):
    batches = nan_batches(sizes, bad)
    kept: list[Batch] = []
    reports: list[tuple[int, int]] = []
    with oocmetrics.Recorder(tmp_path / "dev", "val", chunk_rows=chunk_rows, queue_chunks=1) as rec:
        feed(rec, batches, kept, reports)
        close_reporting(rec, kept, reports)
        assert rec.durable_rows == rec.rows
        got = rec.compute()
        got_data = rec.compute(source="data")
    assert reports and reports[0][1] == min(bad)  # the first bad batch is named first
    assert all(i == -1 or i >= b for i, b in reports)  # never before the bad batch's own update
    for b in kept:
        assert torch.isfinite(b[0]).all() and torch.isfinite(b[1]).all()
    ref = record_host(tmp_path / "host", kept, chunk_rows=chunk_rows)
    assert as_json(got) == as_json(ref)
    assert as_json(got, source=False) == as_json(got_data, source=False)
    attrs, arrays = stored(tmp_path / "dev", "val")["epoch=0"]
    assert attrs["complete"] and attrs["rows"] == sum(b[0].shape[0] for b in kept) == arrays["y_true"].shape[0]
    np.testing.assert_array_equal(arrays["y_pred"], np.concatenate([host(b)[1] for b in kept]))


@pytest.mark.parametrize("seed", range(4))
def test_random_nan_batches_flushes_and_computes_against_a_list_of_kept_batches(tmp_path, seed):
    """A partial chunk flushed (and stored in a grid of its rows), then a NaN in the same chunk: the
    rewind keeps the flushed rows, the next flush rewrites the chunk; the result is the kept batches'."""
    rng = np.random.default_rng(200 + seed)
    chunk_rows = int(rng.choice([3, 5, 8]))
    sizes = [int(x) for x in rng.integers(1, 2 * chunk_rows, 60)]
    bad = {int(i): (int(rng.integers(0, 2)), int(rng.integers(0, sizes[int(i)])))
           for i in rng.choice(len(sizes), 6, replace=False)}
    batches = nan_batches(sizes, bad, seed=seed)
    kept: list[Batch] = []
    reports: list[tuple[int, int]] = []
    with oocmetrics.Recorder(tmp_path / "dev", "val", chunk_rows=chunk_rows, queue_chunks=1) as rec:
        for i, b in enumerate(batches):
            feed(rec, [b], kept, reports)
            op = rng.choice(["none", "flush", "compute"], p=[0.7, 0.15, 0.15])
            if op == "none" or not rec.rows:
                continue
            try:
                if op == "flush":
                    rec.flush()
                    assert rec.durable_rows == rec.rows
                else:
                    assert rec.compute().n_rows == rec.rows
            except ValueError as exc:
                err = exc.__cause__
                assert isinstance(err, NonFiniteBatchError) and "call it again" in str(exc), exc
                reports.append((i, err.batch_index))
                del kept[err.batch_index:]
                assert (rec.batches, rec.rows) == (len(kept), sum(x[0].shape[0] for x in kept))
        close_reporting(rec, kept, reports)
        got = rec.compute()
    assert reports
    for b in kept:
        assert torch.isfinite(b[0]).all() and torch.isfinite(b[1]).all()
    ref = record_host(tmp_path / "host", kept, chunk_rows=chunk_rows)
    assert as_json(got) == as_json(ref)
    (attrs, arrays), = stored(tmp_path / "dev", "val").values()
    assert attrs["rows"] == sum(x[0].shape[0] for x in kept)
    np.testing.assert_array_equal(bits(arrays["y_true"]), bits(np.concatenate([host(x)[0] for x in kept])))


def test_nan_report_by_update_names_the_batch_and_what_was_dropped(tmp_path):
    b = nan_batches([3] * 10, {4: (1, 1)})  # batch 4: rows 12-14, the NaN at row 13; chunk 1 is rows 8-15
    with oocmetrics.Recorder(tmp_path / "r", chunk_rows=8, queue_chunks=2) as rec:
        for x in b[:6]:  # batch 5 fills chunk 1 (rows 8-15)
            rec.update(*x)
        rec._writer.wait()  # the writer has now met chunk 1 (test only: makes the report's timing exact)
        with pytest.raises(ValueError) as info:
            rec.update(*b[6])
        msg = str(info.value)
        assert "y_pred in batch 4 (rows 12-14 of epoch 0) has non-finite value(s) (NaN/Inf), the first at row 13" in msg
        assert "boundary of chunk 1" in msg
        assert ("Not recorded: batches 4-5 (rows 12-17): batch 4 and the 1 staged after it, and the batch passed "
                "to this update() call; batches 0-3 (rows 0-11) are kept") in msg
        assert "the next batch is batch 4" in msg and "nonfinite='skip'" in msg
        assert (rec.rows, rec.batches, rec.durable_rows) == (12, 4, 8)
        for x in b[5:]:
            rec.update(*x)
        got = rec.compute()
    assert as_json(got) == as_json(record_host(tmp_path / "h", b[:4] + b[5:], split="train", chunk_rows=8))


def test_nan_report_at_compute_then_compute_again(tmp_path):
    b = nan_batches([3, 3, 3], {1: (1, 0)})
    with oocmetrics.Recorder(tmp_path / "r", chunk_rows=16) as rec:
        for x in b:
            rec.update(*x)
        with pytest.raises(ValueError, match=r"batch 1 .*Not recorded: batches 1-2 \(rows 3-8\).*call it again"):
            rec.compute()
        assert (rec.rows, rec.batches) == (3, 1)
        got = rec.compute()
    assert as_json(got) == as_json(record_host(tmp_path / "h", b[:1], split="train", chunk_rows=16))


def test_nan_report_at_reset_and_close_leaves_the_recorder_usable(tmp_path):
    b = nan_batches([4, 4, 4, 4], {1: (0, 3), 3: (1, 0)})
    rec = oocmetrics.Recorder(tmp_path / "r", chunk_rows=32, keep_epochs=None)
    rec.update(*b[0])
    rec.update(*b[1])
    with pytest.raises(ValueError, match="batch 1"):
        rec.reset()
    assert rec.epoch == 0 and rec.rows == 4
    rec.reset()  # again: finishes epoch 0 with its kept rows
    assert rec.epoch == 1
    rec.update(*b[2])
    rec.update(*b[3])
    with pytest.raises(ValueError, match="batch 1"):
        rec.close()
    assert not rec.closed
    rec.close()
    epochs = stored(tmp_path / "r", "train")
    assert [(a["rows"], a["batches"], a["complete"]) for a, _ in epochs.values()] == [(4, 1, True), (4, 1, True)]


def test_nan_found_when_a_with_block_closes_is_raised_and_the_epoch_left_incomplete(tmp_path):
    b = nan_batches([4, 4, 4], {2: (1, 0)})
    with pytest.raises(ValueError, match="batch 2"):
        with oocmetrics.Recorder(tmp_path / "r", chunk_rows=32) as rec:
            for x in b:
                rec.update(*x)
    assert rec.closed
    ((attrs, arrays),) = stored(tmp_path / "r", "train").values()
    assert (attrs["rows"], attrs["complete"]) == (8, False)  # the rows before it are durable
    np.testing.assert_array_equal(arrays["y_true"], np.concatenate([host(x)[0] for x in b[:2]]))


def test_nan_found_while_leaving_a_with_block_on_an_exception_keeps_the_clean_rows(tmp_path):
    b = nan_batches([4, 4, 4], {1: (1, 0)})
    with pytest.warns(UserWarning, match="while handling RuntimeError: y_pred in batch 1"):
        with pytest.raises(RuntimeError, match="training stopped"):
            with oocmetrics.Recorder(tmp_path / "r", chunk_rows=32) as rec:
                for x in b:
                    rec.update(*x)
                raise RuntimeError("training stopped")
    ((attrs, _),) = stored(tmp_path / "r", "train").values()
    assert (attrs["rows"], attrs["complete"]) == (4, False)


def test_nan_in_the_first_batch_drops_everything_and_the_epoch_starts_again(tmp_path):
    b = nan_batches([5, 5, 5], {0: (1, 4)})
    with oocmetrics.Recorder(tmp_path / "r", chunk_rows=4) as rec:
        for x in b[:2]:
            rec.update(*x)
        with pytest.raises(ValueError, match=r"batch 0 .*no earlier batch was recorded"):
            rec.flush()
        assert (rec.rows, rec.batches, rec.durable_rows) == (0, 0, 0)
        assert rec.stored_epochs() == []  # no chunk was written: no epoch on disk
        with pytest.raises(ValueError, match="No rows recorded"):
            rec.compute()
        for x in b[1:]:
            rec.update(*x)
        got = rec.compute()
    assert as_json(got) == as_json(record_host(tmp_path / "h", b[1:], split="train", chunk_rows=4))


def test_nan_pending_at_retry_is_reported_not_retried(tmp_path):
    b = nan_batches([4, 4], {0: (1, 0)})
    with oocmetrics.Recorder(tmp_path / "r", chunk_rows=4) as rec:
        rec.update(*b[0])
        rec._writer.wait()
        with pytest.raises(ValueError, match="batch 0"):
            rec.retry()
        rec.retry()  # nothing left to retry
        rec.update(*b[1])
        assert rec.compute().n_rows == 4


# ------------------------------------------------------------------------------ (d) NaN/Inf: skip
def test_nonfinite_skip_stores_them_and_counts_skipped_as_the_host_path(tmp_path):
    b = nan_batches([3] * 12, {2: (1, 0), 5: (0, 2), 9: (1, 1)})
    twin = Twin(tmp_path, chunk_rows=5, nonfinite="skip")
    for x in b:
        twin.update(x)
    got = twin.compute()
    twin.compute(source="data")
    assert got.n_skipped == 3 and got.n_rows == 36
    twin.close()
    twin.check_store()


# -------------------------------------------------------------------------------- (e) ids, groups
def test_ids_and_groups_are_stored_and_deduplicated_as_on_the_host_path(tmp_path):
    rng = np.random.default_rng(5)
    sizes = [int(x) for x in rng.integers(1, 12, 25)]
    n = sum(sizes)
    ids = np.arange(n)
    ids[rng.choice(n, 15, replace=False)] = rng.integers(0, n, 15)  # copies of earlier (or later) samples
    groups = rng.integers(0, 4, n)
    twin = Twin(tmp_path, chunk_rows=7)
    start = 0
    for i, b in enumerate(make(sizes, seed=5)):
        sl = slice(start, start + sizes[i])
        start += sizes[i]
        # ids as CPU tensors or NumPy arrays of other integer dtypes: stored as int64 either way
        ids_b = torch.from_numpy(ids[sl]) if i % 2 else ids[sl].astype(np.int32)
        twin.update(b, ids=ids_b, groups=groups[sl].astype(np.uint8))
    got = twin.compute(quantiles=(0.5,))
    assert got.extra["duplicate_rows"] > 0
    twin.compute(source="data")
    twin.close()
    twin.check_store()
    arrays = stored(tmp_path / "dev", "val")["epoch=0"][1]
    np.testing.assert_array_equal(arrays["ids"], ids)
    np.testing.assert_array_equal(arrays["groups"], groups)


def test_label_errors_on_the_device_path(tmp_path):
    b = make([3, 3, 3])
    with oocmetrics.Recorder(tmp_path / "r", chunk_rows=4) as rec:
        rec.update(*b[0], ids=np.arange(3))
        with pytest.raises(ValueError, match=r"Batch 1 came with labels none, but this epoch's batches have \['ids'\]"):
            rec.update(*b[1])
        with pytest.raises(ValueError, match=r"ids in batch 1 has shape \(2,\); expected \(3,\)"):
            rec.update(*b[1], ids=np.arange(2))
        with pytest.raises(TypeError, match="ids in batch 1 has dtype float64; expected integers"):
            rec.update(*b[1], ids=np.arange(3.0))
        assert (rec.rows, rec.batches) == (3, 1)
        rec.update(*b[1], ids=np.arange(3, 6))
        assert rec.compute().n_rows == 6


# ------------------------------------------------------------------------------- (f) writer failure
def test_a_write_failure_then_retry_loses_nothing(tmp_path, monkeypatch):
    state = {"fail": False}
    real = store_mod.EpochStore.write_chunk

    def flaky(self, *args, **kwargs):
        if state["fail"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(store_mod.EpochStore, "write_chunk", flaky)
    batches = make([5] * 30, seed=9)
    done: list[Batch] = []
    failures = 0
    with oocmetrics.Recorder(tmp_path / "dev", "val", chunk_rows=4, queue_chunks=1) as rec:
        for x in batches[:4]:
            rec.update(*x)
            done.append(x)
        rec.flush()
        state["fail"] = True
        pending = list(batches[4:20])
        while pending:  # until the writer's failure stops update (a slot wait, or the entry check)
            try:
                rec.update(*pending[0])
            except WriterError as exc:
                failures += 1
                assert "No space left" in str(exc) and "call retry()" in str(exc)
                break
            done.append(pending.pop(0))
        assert failures == 1 and pending, "the failure never reached update()"
        held = rec.rows - rec.durable_rows
        assert held > 0 and rec.rows == 5 * len(done)
        with pytest.raises(WriterError):  # still failing: nothing changes
            rec.retry()
        state["fail"] = False
        rec.retry()
        assert rec.durable_rows == rec.rows - rec.rows % 4  # every full chunk written, none lost
        for x in pending + batches[20:]:
            rec.update(*x)
            done.append(x)
        got = rec.compute()
    assert len(done) == 30
    assert as_json(got) == as_json(record_host(tmp_path / "host", done, chunk_rows=4, queue_chunks=1))
    assert_same_store(tmp_path / "dev", tmp_path / "host", "val")


def test_a_failing_flush_is_retried_and_the_sealed_chunk_written(tmp_path, monkeypatch):
    state = {"fail": False}
    real = store_mod.EpochStore.write_chunk

    def flaky(self, *args, **kwargs):
        if state["fail"]:
            raise OSError(errno.EIO, "I/O error")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(store_mod.EpochStore, "write_chunk", flaky)
    b = make([3, 3, 3, 3])
    with oocmetrics.Recorder(tmp_path / "dev", "val", chunk_rows=8) as rec:
        rec.update(*b[0])
        rec.update(*b[1])
        state["fail"] = True
        with pytest.raises(WriterError, match=r"chunk 0 \(rows 0-5\)"):
            rec.flush()
        state["fail"] = False
        rec.retry()
        assert rec.durable_rows == 6
        rec.update(*b[2])
        rec.update(*b[3])
        got = rec.compute()
    assert as_json(got) == as_json(record_host(tmp_path / "host", b, chunk_rows=8))


def test_a_writer_failing_while_update_waits_for_a_slot_ends_the_wait(tmp_path, monkeypatch):
    """Both slots handed out, the writer stuck on the first: update waits, then gets the failure."""
    gate = threading.Event()
    state = {"fail": True}
    real = store_mod.EpochStore.write_chunk

    def slow_then_fail(self, *args, **kwargs):
        gate.wait(10)
        if state["fail"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(store_mod.EpochStore, "write_chunk", slow_then_fail)
    b = make([4, 4, 4, 4, 3], seed=14)
    with oocmetrics.Recorder(tmp_path / "dev", "val", chunk_rows=4, queue_chunks=1) as rec:
        rec.update(*b[0])
        rec.update(*b[1])  # both slots are out now
        timer = threading.Timer(0.3, gate.set)
        timer.start()
        with pytest.raises(WriterError, match=r"chunk 0 \(rows 0-3\).*No space left"):
            rec.update(*b[2])  # waits for a slot: the failure ends the wait
        timer.join()
        assert (rec.rows, rec.batches, rec.durable_rows) == (8, 2, 0)
        state["fail"] = False
        rec.retry()
        assert rec.durable_rows == 8
        for x in b[2:]:
            rec.update(*x)
        got = rec.compute()
    assert as_json(got) == as_json(record_host(tmp_path / "host", b, chunk_rows=4))


def test_a_nan_found_while_update_waits_for_a_slot_is_reported_by_that_update(tmp_path, monkeypatch):
    gate = threading.Event()
    real = ReadyChunk.wait

    def slow_wait(self):
        gate.wait(10)
        return real(self)

    monkeypatch.setattr(ReadyChunk, "wait", slow_wait)
    b = nan_batches([4, 4, 4, 4], {0: (1, 2)})
    with oocmetrics.Recorder(tmp_path / "dev", "val", chunk_rows=4, queue_chunks=1) as rec:
        rec.update(*b[0])
        rec.update(*b[1])
        timer = threading.Timer(0.3, gate.set)
        timer.start()
        with pytest.raises(ValueError, match=r"batch 0 .*Not recorded: batches 0-1 .*and the batch passed to this "
                                             r"update\(\) call; no earlier batch was recorded"):
            rec.update(*b[2])
        timer.join()
        assert (rec.rows, rec.batches, rec.durable_rows) == (0, 0, 0)
        for x in b[1:]:
            rec.update(*x)
        got = rec.compute()
    assert as_json(got) == as_json(record_host(tmp_path / "host", b[1:], chunk_rows=4))


# ------------------------------------------------------------------------------- (g) interrupts
def test_an_interrupt_between_stage_and_commit_records_nothing(tmp_path, monkeypatch):
    real = DeviceStager.stage
    calls = {"n": 0}

    def stage_then_interrupt(self, *args, **kwargs):
        staged = real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] in (3, 6):  # batch 2 (fills chunk 0), then batch 4 (within a chunk)
            raise KeyboardInterrupt
        return staged

    monkeypatch.setattr(DeviceStager, "stage", stage_then_interrupt)
    batches = make([3, 4, 5, 2, 2, 9, 1], seed=11)
    with oocmetrics.Recorder(tmp_path / "dev", "val", chunk_rows=8, queue_chunks=1) as rec:
        i = 0
        interrupted = 0
        while i < len(batches):
            if rec._writer is not None:
                rec._writer.wait()  # the chunks handed out so far are durable
            before = (rec.rows, rec.batches, rec.durable_rows)
            try:
                rec.update(*batches[i])
            except KeyboardInterrupt:
                interrupted += 1
                rec._writer.wait()
                assert (rec.rows, rec.batches, rec.durable_rows) == before  # not even in part
                continue  # the loop passes the same batch again
            i += 1
        assert interrupted == 2
        got = rec.compute()
    assert as_json(got) == as_json(record_host(tmp_path / "host", batches, chunk_rows=8, queue_chunks=1))
    assert_same_store(tmp_path / "dev", tmp_path / "host", "val")


def test_ctrl_c_during_commit_is_held_back_and_the_batch_recorded_whole(tmp_path, monkeypatch):
    real = DeviceStager.commit
    calls = {"n": 0}

    def commit_with_sigint(self, staged):
        calls["n"] += 1
        if calls["n"] == 3:  # batch 2: fills chunk 0 and hands it to the writer
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, staged)

    monkeypatch.setattr(DeviceStager, "commit", commit_with_sigint)
    batches = make([3, 4, 5, 2, 9], seed=12)
    with oocmetrics.Recorder(tmp_path / "dev", "val", chunk_rows=8) as rec:
        rec.update(*batches[0])
        rec.update(*batches[1])
        with pytest.raises(KeyboardInterrupt):
            rec.update(*batches[2])
        assert (rec.rows, rec.batches) == (12, 3)  # committed whole before the interrupt was raised
        for x in batches[3:]:
            rec.update(*x)
        got = rec.compute()
    assert as_json(got) == as_json(record_host(tmp_path / "host", batches, chunk_rows=8))


def test_ctrl_c_during_a_flush_hand_off_is_held_back(tmp_path, monkeypatch):
    real = DeviceStager.flush

    def flush_with_sigint(self):
        os.kill(os.getpid(), signal.SIGINT)
        return real(self)

    batches = make([3, 2, 6], seed=13)
    with oocmetrics.Recorder(tmp_path / "dev", "val", chunk_rows=8) as rec:
        rec.update(*batches[0])
        rec.update(*batches[1])
        monkeypatch.setattr(DeviceStager, "flush", flush_with_sigint)
        with pytest.raises(KeyboardInterrupt):
            rec.flush()
        monkeypatch.setattr(DeviceStager, "flush", real)
        rec._writer.wait()
        assert rec.durable_rows == 5  # the sealed chunk reached the writer with its slot
        rec.update(*batches[2])
        got = rec.compute()
    assert as_json(got) == as_json(record_host(tmp_path / "host", batches, chunk_rows=8))


# ------------------------------------------------------------------------------- batch errors
def test_later_batches_must_be_tensors_of_the_epoch_layout(tmp_path):
    b = make([3, 3])
    with oocmetrics.Recorder(tmp_path / "r", chunk_rows=4) as rec:
        rec.update(*b[0])
        with pytest.raises(TypeError, match="y_true in batch 1 is a ndarray; DeviceStager takes torch tensors"):
            rec.update(*host(b[1]))
        with pytest.raises(TypeError, match="y_pred in batch 1 has dtype torch.float64, but this epoch stores float32"):
            rec.update(b[1][0], b[1][1].double())
        with pytest.raises(ValueError, match=r"Batch 1 has trailing shape \(4, 2\), but this epoch's .* \(4, 3\)"):
            rec.update(b[1][0][..., :2], b[1][1][..., :2])
        with pytest.raises(ValueError, match=r"Expected y_pred to have the shape of y_true \(3, 4, 3\)"):
            rec.update(b[1][0], b[1][1][:2])
        with pytest.raises(TypeError, match="y_true in batch 1 has dtype torch.int64"):
            rec.update(b[1][0].long(), b[1][1])
        assert (rec.rows, rec.batches) == (3, 1)
        rec.update(*b[1])
        assert rec.compute().n_rows == 6


def test_a_bad_first_batch_starts_no_epoch(tmp_path):
    with oocmetrics.Recorder(tmp_path / "r", chunk_rows=4) as rec:
        with pytest.raises(TypeError, match="has dtype torch.int64"):
            rec.update(torch.zeros(3, 2, dtype=torch.int64), torch.zeros(3, 2, dtype=torch.int64))
        with pytest.raises(ValueError, match=r"ids in batch 0 has shape \(2,\)"):
            rec.update(torch.zeros(3, 2), torch.zeros(3, 2), ids=np.arange(2))
        assert rec._writer is None and rec._stager is None
        rec.update(*host(make([3], trailing=(2,))[0]))  # so the epoch may still take the host path
        assert rec._stager is None


def test_without_the_switch_cpu_tensors_take_the_host_path(tmp_path, monkeypatch):
    monkeypatch.setattr(recorder_mod, "_DEVICE_PATH_FOR_CPU_TENSORS", False)
    with oocmetrics.Recorder(tmp_path / "r", chunk_rows=4) as rec:
        rec.update(*make([3])[0])
        assert rec._stager is None and rec._pos.buf is not None


# ------------------------------------------------------------------------------- ChunkWriter parts
def test_chunk_writer_discard_and_acquire_without_buffers(tmp_path):
    writer = store_mod.ChunkWriter(lambda rows: None, 4, None, n_buffers=2)
    try:
        with pytest.raises(RuntimeError, match="make_buffers=None"):
            writer.acquire()
        with pytest.raises(RuntimeError, match="no failure to discard"):
            writer.discard()
    finally:
        writer.close()

    pool = store_mod.ChunkWriter(lambda rows: None, 4, lambda: (np.zeros(4), np.zeros(4)), n_buffers=1)
    try:
        buf = pool.acquire()

        def boom(rows):
            raise OSError(errno.EIO, "I/O error")

        pool._open_store = boom
        pool.submit([store_mod.Job("chunk", 0, buf[0], buf[1], 4), store_mod.Job("complete")])
        pool.wait()
        assert isinstance(pool.error, OSError)
        dropped = pool.discard()
        assert [j.kind for j in dropped] == ["chunk", "complete"] and pool.error is None
        again = pool.acquire()
        assert again[0] is buf[0] and again[1] is buf[1]  # the dropped job's buffers went back to the pool
    finally:
        pool.close()


# ------------------------------------------------------------------------------------------ CUDA
@cuda
def test_cuda_update_never_syncs_and_matches_the_host_path(tmp_path, monkeypatch):
    monkeypatch.setattr(recorder_mod, "_DEVICE_PATH_FOR_CPU_TENSORS", False)
    dev = torch.device("cuda")
    rng = np.random.default_rng(21)
    sizes = [int(x) for x in rng.integers(1, 40, 60)]
    g = torch.Generator(device=dev).manual_seed(0)
    batches = []
    for i, n in enumerate(sizes):
        t = torch.randn(n, 50, 4, device=dev, generator=g)
        p = (t + 0.1 * torch.randn(t.shape, device=dev, generator=g)).requires_grad_(True)
        batches.append((t.to(torch.bfloat16) if i % 3 == 0 else t, p * 1.0))
    ids = [torch.arange(sum(sizes[:i]), sum(sizes[:i + 1])) for i in range(len(sizes))]  # CPU ids: no sync
    with oocmetrics.Recorder(tmp_path / "gpu", "val", chunk_rows=37, queue_chunks=2) as rec:
        rec.update(*batches[0], ids=ids[0])  # builds the stager: pins memory (a sync), once
        assert rec._stager is not None and rec._stager.device.type == "cuda"
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for (t, p), i in zip(batches[1:], ids[1:]):
                rec.update(t, p, ids=i)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        got = rec.compute()
        got_data = rec.compute(source="data")
    host_batches = [(t.float().cpu().numpy(), p.detach().float().cpu().numpy()) for t, p in batches]
    with oocmetrics.Recorder(tmp_path / "cpu", "val", chunk_rows=37, queue_chunks=2) as ref_rec:
        for (t, p), i in zip(host_batches, ids):
            ref_rec.update(t, p, ids=i.numpy())
        ref = ref_rec.compute()
    assert as_json(got) == as_json(ref)
    assert as_json(got, source=False) == as_json(got_data, source=False)
    assert_same_store(tmp_path / "gpu", tmp_path / "cpu", "val")


@cuda
def test_cuda_nan_batch_is_reported_and_the_rest_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(recorder_mod, "_DEVICE_PATH_FOR_CPU_TENSORS", False)
    dev = torch.device("cuda")
    batches = [(torch.randn(16, 50, 4, device=dev), torch.randn(16, 50, 4, device=dev)) for _ in range(20)]
    batches[9][1][3, 10, 2] = float("nan")
    kept: list[Batch] = []
    reports: list[tuple[int, int]] = []
    with oocmetrics.Recorder(tmp_path / "gpu", "val", chunk_rows=64) as rec:
        feed(rec, batches, kept, reports)
        close_reporting(rec, kept, reports)
        got = rec.compute()
    assert reports[0][1] == 9
    ref = record_host(tmp_path / "cpu", [(t.cpu(), p.cpu()) for t, p in kept], chunk_rows=64)
    assert as_json(got) == as_json(ref)
