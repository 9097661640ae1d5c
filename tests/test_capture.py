"""DeviceStager (oocmetrics.capture): device-side chunk staging for CUDA batches.

The same code path runs with device="cpu" (no events, no pinning), so chunking, ordering, partial
flush + continue, slot reuse, dtype widening, the non-finite verdict and interrupt safety are all
tested here against a plain model (the input batches concatenated). Tests marked ``cuda`` need a GPU:
no host sync in append (``torch.cuda.set_sync_debug_mode("error")``), many chunks bit-identical after
the pinned copies under a consumer thread, and a NaN batch reported at the chunk boundary.
"""
from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, strategies as st

torch = pytest.importorskip("torch")

from oocmetrics.capture import (  # noqa: E402
    DeviceStager, NonFiniteBatchError, ReadyChunk, Staged, is_cuda_batch, stored_dtype, tensor_layout,
)

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


# ------------------------------------------------------------------------------------------ helpers
def bits(a: np.ndarray) -> np.ndarray:
    """The raw bits of a float array (NaN payloads and -0.0 compared exactly)."""
    return a.view({4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


class Disk:
    """The consumer model: what a writer would store, chunk by chunk (a sealed chunk is replaced later)."""

    def __init__(self) -> None:
        self.chunks: dict[int, dict] = {}
        self.log: list[ReadyChunk] = []

    def take(self, chunks: list[ReadyChunk] | ReadyChunk | None) -> None:
        if chunks is None:
            return
        for c in [chunks] if isinstance(chunks, ReadyChunk) else chunks:
            c.wait()
            self.chunks[c.index] = {"t": c.t.copy(), "p": c.p.copy(), "n": c.n, "batches": c.batches,
                                    "spans": c.spans, "sealed": c.sealed,
                                    "labels": {k: v.copy() for k, v in c.labels.items()}}
            self.log.append(c)
            c.release()

    def rows(self, chunk_rows: int) -> tuple[np.ndarray, np.ndarray]:
        keys = sorted(self.chunks)
        assert keys == list(range(len(keys))), f"chunks {keys} are not contiguous"
        for k in keys[:-1]:
            assert self.chunks[k]["n"] == chunk_rows, f"chunk {k} is partial but not the last"
        return (np.concatenate([self.chunks[k]["t"] for k in keys]),
                np.concatenate([self.chunks[k]["p"] for k in keys]))


def make_batches(sizes: list[int], trailing: tuple[int, ...] = (3, 2), seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn((n, *trailing), generator=g).to(dtype), torch.randn((n, *trailing), generator=g).to(dtype))
            for n in sizes]


def concat(batches, i: int, dtype=np.float32) -> np.ndarray:
    return np.concatenate([b[i].to(torch.float64 if dtype == np.float64 else torch.float32).numpy()
                           for b in batches])


def expected_spans_and_batches(sizes: list[int], row_start: int, n: int) -> tuple[tuple, int]:
    """(spans, batches) a full chunk of rows [row_start, row_start + n) must report, from the batch sizes."""
    starts = np.concatenate([[0], np.cumsum(sizes)])
    end = row_start + n
    spans = tuple((i, int(starts[i]), m) for i, m in enumerate(sizes)
                  if m and starts[i] < end and starts[i] + m > row_start)
    b = next(i for i, m in enumerate(sizes) if m and starts[i] + m >= end)  # the batch that filled it
    return spans, b + int(starts[b] + sizes[b] == end)


# ------------------------------------------------------------------------------- chunk splitting
@given(
    chunk_rows=st.integers(1, 12),
    slots=st.integers(2, 4),
    ops=st.lists(st.one_of(st.integers(0, 30), st.just("flush")), min_size=1, max_size=25),
)
def test_chunks_equal_concatenated_input(chunk_rows, slots, ops):
    """Any batch sizes vs chunk sizes, flushes anywhere: the stored rows are the input, bit for bit."""
    sizes = [op for op in ops if op != "flush"]
    batches = iter(make_batches(sizes, seed=len(ops)))
    stager = DeviceStager(chunk_rows, (3, 2), device="cpu", slots=slots)
    disk = Disk()
    committed = 0
    for op in ops:
        if op == "flush":
            c = stager.flush()
            assert c is None or (c.sealed and c.batches == committed and c.n == stager.fill)
            disk.take(c)
            continue
        disk.take(stager.append(*next(batches)))
        committed += 1
        assert stager.batches == committed and stager.rows == sum(sizes[:committed])
        assert stager.fill == stager.rows % chunk_rows and stager.chunk_index == stager.rows // chunk_rows
    disk.take(stager.flush())
    if max(sizes, default=0) <= chunk_rows:
        assert stager.n_slots == slots  # the ring grows only for a batch that needs more chunks than it has
    if sum(sizes) == 0:
        assert disk.chunks == {}
        return
    all_batches = make_batches(sizes, seed=len(ops))
    t, p = disk.rows(chunk_rows)
    np.testing.assert_array_equal(bits(t), bits(concat(all_batches, 0)))
    np.testing.assert_array_equal(bits(p), bits(concat(all_batches, 1)))
    for k, c in disk.chunks.items():
        if c["sealed"]:  # the last chunk, partial: its batches are those with rows in it
            starts = np.concatenate([[0], np.cumsum(sizes)])
            assert c["spans"] == tuple((i, int(starts[i]), m) for i, m in enumerate(sizes)
                                       if m and starts[i] + m > k * chunk_rows)
        else:
            assert (c["spans"], c["batches"]) == expected_spans_and_batches(sizes, k * chunk_rows, c["n"])


def test_chunk_metadata_by_hand():
    """Batches of 3 rows, chunks of 5: which batches each chunk holds and how many are complete."""
    stager = DeviceStager(5, (2,), device="cpu")
    disk = Disk()
    for t, p in make_batches([3] * 4, trailing=(2,)):
        disk.take(stager.append(t, p))
    disk.take(stager.flush())
    assert [(k, c["n"], c["batches"], c["spans"], c["sealed"]) for k, c in disk.chunks.items()] == [
        (0, 5, 1, ((0, 0, 3), (1, 3, 3)), False),
        (1, 5, 3, ((1, 3, 3), (2, 6, 3), (3, 9, 3)), False),
        (2, 2, 4, ((3, 9, 3),), True),
    ]
    assert [c.row_start for c in disk.log] == [0, 5, 10]
    assert all(c.is_copied() and c.checked for c in disk.log)  # on the CPU the copy is done at once
    assert "sealed chunk 2: rows 10-11" in repr(disk.log[-1])


def test_batch_ending_on_chunk_boundary_counts_and_next_starts_fresh():
    stager = DeviceStager(4, (), device="cpu")
    disk = Disk()
    for t, p in make_batches([4, 0, 2, 2], trailing=()):
        disk.take(stager.append(t, p))
    assert [(k, c["batches"]) for k, c in disk.chunks.items()] == [(0, 1), (1, 4)]
    assert stager.fill == 0 and stager.chunk_index == 2 and stager.batches == 4 and stager.flush() is None


def test_zero_row_batch_counts_a_batch_and_no_rows():
    stager = DeviceStager(4, (2,), device="cpu")
    assert stager.append(torch.empty(0, 2), torch.empty(0, 2)) == []
    assert (stager.rows, stager.batches, stager.fill) == (0, 1, 0)
    assert stager.flush() is None


def test_noncontiguous_and_grad_requiring_inputs_are_copied_exactly():
    stager = DeviceStager(7, (4, 3), device="cpu")
    disk = Disk()
    base = torch.randn(5, 3, 4)
    t = base.transpose(1, 2)  # (5, 4, 3), not contiguous
    p = torch.randn(5, 4, 3, requires_grad=True)
    disk.take(stager.append(t, p * 2))
    disk.take(stager.flush())
    got_t, got_p = disk.rows(7)
    np.testing.assert_array_equal(got_t, t.numpy())
    np.testing.assert_array_equal(got_p, (p * 2).detach().numpy())
    assert all(not d.requires_grad for s in stager._state.ring for d in s.dev)


def test_inference_mode_on_either_side():
    """Built (or grown) inside torch.inference_mode(), used outside it, and the other way round."""
    b = make_batches([3, 9, 2], trailing=(2,))
    with torch.inference_mode():
        stager = DeviceStager(4, (2,), device="cpu", slots=2)
        disk = Disk()
        disk.take(stager.append(*b[0]))
        disk.take(stager.append(*b[1]))  # grows the ring inside inference mode
    assert stager.n_slots == 3
    disk.take(stager.append(*b[2]))
    disk.take(stager.flush())
    np.testing.assert_array_equal(disk.rows(4)[0], concat(b, 0))
    other = DeviceStager(4, (2,), device="cpu")
    with torch.inference_mode():
        (c,) = other.append(*b[1])[:1]
    c.wait()
    np.testing.assert_array_equal(c.p, b[1][1][:4].numpy())


def test_ring_grows_for_a_batch_larger_than_the_ring():
    stager = DeviceStager(4, (2,), device="cpu", slots=2)
    disk = Disk()
    batches = make_batches([3, 19, 2], trailing=(2,))
    for t, p in batches:
        disk.take(stager.append(t, p))
    disk.take(stager.flush())
    assert stager.n_slots > 2  # 19 rows after 3: five chunks fill in one batch
    t, p = disk.rows(4)
    np.testing.assert_array_equal(t, concat(batches, 0))
    np.testing.assert_array_equal(p, concat(batches, 1))


# ----------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_narrow_floats_are_widened_to_float32_exactly(dtype):
    batches = make_batches([5, 6, 2], dtype=dtype)
    trailing, dtypes, device = tensor_layout(*batches[0])
    assert dtypes == (np.dtype(np.float32), np.dtype(np.float32)) and trailing == (3, 2) and device.type == "cpu"
    stager = DeviceStager(4, trailing, dtypes, device="cpu")
    disk = Disk()
    for t, p in batches:
        disk.take(stager.append(t, p))
    disk.take(stager.flush())
    t, p = disk.rows(4)
    assert t.dtype == np.float32 and p.dtype == np.float32
    np.testing.assert_array_equal(bits(t), bits(np.concatenate([b[0].float().numpy() for b in batches])))
    np.testing.assert_array_equal(bits(p), bits(np.concatenate([b[1].float().numpy() for b in batches])))


def test_float64_is_kept_and_float32_into_float64_is_widened():
    batches = [(torch.randn(4, 2, dtype=torch.float64) + 1e-12, torch.randn(4, 2)) for _ in range(3)]
    stager = DeviceStager.for_batch(*batches[0], chunk_rows=5)
    assert stager.dtypes == (np.dtype(np.float64), np.dtype(np.float32)) and stager.device == torch.device("cpu")
    disk = Disk()
    for t, p in batches:
        disk.take(stager.append(t, p))
    disk.take(stager.flush())
    t, p = disk.rows(5)
    assert t.dtype == np.float64 and p.dtype == np.float32
    np.testing.assert_array_equal(bits(t), bits(np.concatenate([b[0].numpy() for b in batches])))
    wide = DeviceStager(5, (2,), (np.float64, torch.float64), device="cpu")  # torch dtypes accepted too
    disk = Disk()
    for t, p in batches:
        disk.take(wide.append(t.float(), p))  # float32 into a float64 epoch: exact
    disk.take(wide.flush())
    t, p = disk.rows(5)
    assert p.dtype == np.float64
    np.testing.assert_array_equal(t, np.concatenate([b[0].float().double().numpy() for b in batches]))
    np.testing.assert_array_equal(p, np.concatenate([b[1].double().numpy() for b in batches]))


def test_float64_into_a_float32_epoch_raises():
    stager = DeviceStager(4, (2,), device="cpu")
    with pytest.raises(TypeError, match=r"y_pred in batch 0 has dtype torch.float64, but this epoch stores float32"):
        stager.append(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.float64))
    assert stager.rows == 0


def test_stored_dtype_and_is_cuda_batch():
    assert stored_dtype(torch.bfloat16) == np.float32 and stored_dtype(torch.float64) == np.float64
    with pytest.raises(TypeError, match="expected a floating dtype"):
        stored_dtype(torch.int32)
    assert not is_cuda_batch(torch.zeros(2), torch.zeros(2))
    assert not is_cuda_batch(np.zeros(2), np.zeros(2))


# ---------------------------------------------------------------------------- non-finite check
def run_until_error(stager: DeviceStager, batches, disk: Disk):
    """Append, consuming in order after each batch; return (error, chunks left undelivered) at the first error."""
    for t, p in batches:
        chunks = stager.append(t, p)
        for i, c in enumerate(chunks):
            try:
                disk.take(c)
            except NonFiniteBatchError as err:
                return err, chunks[i + 1:]
    for c in [stager.flush()]:
        if c is not None:
            try:
                disk.take(c)
            except NonFiniteBatchError as err:
                return err, []
    return None, []


def expected_error(sizes, C, bad_batch, offset):
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    start, row = int(starts[bad_batch]), int(starts[bad_batch]) + offset
    chunk = start // C
    return chunk, (row if row // C == chunk else None), start - chunk * C, (start, start + sizes[bad_batch])


@given(
    chunk_rows=st.integers(1, 9),
    sizes=st.lists(st.integers(1, 20), min_size=1, max_size=12),
    data=st.data(),
)
def test_nonfinite_names_the_batch_across_chunk_boundaries(chunk_rows, sizes, data):
    bad = data.draw(st.integers(0, len(sizes) - 1))
    offset = data.draw(st.integers(0, sizes[bad] - 1))
    which = data.draw(st.sampled_from([0, 1]))
    value = data.draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
    batches = make_batches(sizes, trailing=(2,))
    batches[bad][which][offset, 1] = value
    stager = DeviceStager(chunk_rows, (2,), device="cpu")
    err, _ = run_until_error(stager, batches, Disk())
    chunk, first_row, valid, rows = expected_error(sizes, chunk_rows, bad, offset)
    assert err is not None
    assert (err.name, err.batch_index, err.batch_rows) == (("y_true", "y_pred")[which], bad, rows)
    assert (err.chunk_index, err.first_row, err.valid_rows) == (chunk, first_row, valid)
    assert f"batch {bad} (rows {rows[0]}-{rows[1] - 1} of this epoch)" in str(err)


@pytest.mark.parametrize("sizes, C, bad, offset, which, expect", [
    ([3] * 10, 5, 4, 0, 0, (2, 12, 2)),  # inside a chunk
    ([3] * 10, 5, 1, 2, 1, (0, None, 3)),  # straddles 0/1, the bad row is past chunk 0: chunk 0 reports it
    ([3] * 10, 5, 1, 0, 0, (0, 3, 3)),  # straddles, the bad row is in chunk 0
    ([2, 13, 3], 5, 1, 12, 1, (0, None, 2)),  # a batch over three chunks, bad in the last part
    ([5, 5], 5, 1, 0, 0, (1, 5, 0)),  # the batch starts its chunk: nothing before it is kept
])
def test_nonfinite_cases_by_hand(sizes, C, bad, offset, which, expect):
    batches = make_batches(sizes, trailing=(2,))
    batches[bad][which][offset, 0] = float("nan")
    err, _ = run_until_error(DeviceStager(C, (2,), device="cpu"), batches, Disk())
    assert (err.chunk_index, err.first_row, err.valid_rows) == expect
    assert err.name == ("y_true", "y_pred")[which] and isinstance(err, ValueError)


def test_first_bad_batch_and_array_are_named_when_several_are_bad():
    batches = make_batches([1] * 10, trailing=(2,))
    batches[3][1][0, 0] = float("nan")  # y_pred of batch 3
    batches[6][0][0, 0] = float("inf")  # y_true of batch 6, later
    batches[8][0][0, 1] = float("nan")
    batches[8][1][0, 1] = float("nan")
    err, _ = run_until_error(DeviceStager(10, (2,), device="cpu"), batches, Disk())
    assert (err.batch_index, err.name, err.first_row) == (3, "y_pred", 3)
    only8 = make_batches([1] * 10, trailing=(2,))
    only8[8][0][0, 1] = only8[8][1][0, 1] = float("nan")
    err, _ = run_until_error(DeviceStager(10, (2,), device="cpu"), only8, Disk())
    assert (err.batch_index, err.name) == (8, "y_true")  # both arrays in one row: y_true first


def test_nonfinite_in_a_flushed_chunk_is_reported_by_flush():
    batches = make_batches([2, 2], trailing=(2,))
    batches[1][1][1, 0] = float("nan")
    stager = DeviceStager(10, (2,), device="cpu")
    for t, p in batches:
        assert stager.append(t, p) == []
    c = stager.flush()
    with pytest.raises(NonFiniteBatchError, match=r"y_pred in batch 1 \(rows 2-3 of this epoch\).*first at row 3"):
        c.wait()
    with pytest.raises(NonFiniteBatchError) as info:  # wait() again: the same verdict
        c.wait()
    stager.rewind(c, info.value.valid_rows)  # a sealed chunk's slot is the current one: it stays current
    assert (stager.rows, stager.batches, stager.fill, stager.in_flight) == (2, 1, 2, 0)
    clean = make_batches([3], trailing=(2,), seed=2)
    assert stager.append(*clean[0]) == []
    disk = Disk()
    disk.take(stager.flush())
    np.testing.assert_array_equal(disk.rows(10)[1], concat(batches[:1] + clean, 1))


def test_rewind_after_nonfinite_drops_the_batch_and_later_rows_and_continues():
    sizes = [3] * 8
    batches = make_batches(sizes, trailing=(2,))
    batches[4][0][1, 1] = float("nan")  # batch 4: rows 12-14, chunk 2 (rows 10-14)
    stager = DeviceStager(5, (2,), device="cpu", slots=3)
    disk = Disk()
    err, undelivered = run_until_error(stager, batches, disk)
    assert (err.batch_index, err.chunk_index, err.valid_rows) == (4, 2, 2)
    stager.rewind(err.chunk, err.valid_rows)
    assert (stager.rows, stager.batches, stager.fill, stager.chunk_index, stager.in_flight) == (12, 4, 2, 2, 0)
    for c in undelivered:  # chunks staged after the bad one are discarded
        c.release()
        with pytest.raises(RuntimeError, match="discarded by DeviceStager.rewind"):
            c.wait()
    with pytest.raises(RuntimeError, match="released, or discarded"):
        err.chunk.wait()
    more = make_batches([4, 6], trailing=(2,), seed=9)
    for t, p in more:
        disk.take(stager.append(t, p))
    disk.take(stager.flush())
    t, p = disk.rows(5)
    kept = batches[:4] + more
    np.testing.assert_array_equal(t, concat(kept, 0))
    np.testing.assert_array_equal(p, concat(kept, 1))
    assert stager.batches == 6


@given(
    chunk_rows=st.integers(1, 8),
    slots=st.integers(2, 3),
    ops=st.lists(st.one_of(st.tuples(st.integers(0, 12), st.booleans()), st.just("flush")), min_size=1, max_size=30),
)
def test_random_batches_with_nonfinite_ones_against_a_list_of_batches(chunk_rows, slots, ops):
    """A state machine: append (some batches hold a NaN), flush, consume in order; on each report rewind
    and drop the batches from the bad one on. The stored rows are always the kept batches, in order."""
    stager = DeviceStager(chunk_rows, (2,), device="cpu", slots=slots)
    disk = Disk()
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []  # the model: batch i of the epoch is kept[i]

    def consume(chunks: list[ReadyChunk]) -> None:
        for c in chunks:
            try:
                disk.take(c)
            except NonFiniteBatchError as err:
                assert torch.isnan(kept[err.batch_index][0]).any() or torch.isnan(kept[err.batch_index][1]).any()
                assert not any(torch.isnan(x).any() for b in kept[:err.batch_index] for x in b)
                stager.rewind(err.chunk, err.valid_rows)
                del kept[err.batch_index:]
                assert (stager.rows, stager.batches) == (sum(len(b[0]) for b in kept), len(kept))
                return  # the other chunks of this call were discarded by the rewind

    for i, op in enumerate(ops):
        if op == "flush":
            c = stager.flush()
            consume([c] if c is not None else [])
            continue
        n, bad = op
        t, p = make_batches([n], trailing=(2,), seed=i)[0]
        if bad and n:
            (t if i % 2 else p)[i % n, i % 2] = float("nan")
        kept.append((t, p))
        consume(stager.append(t, p))
    c = stager.flush()
    consume([c] if c is not None else [])
    c = stager.flush()  # after a rewind in the last flush, the kept rows still need writing
    consume([c] if c is not None else [])
    if stager.rows == 0:
        return
    t, p = disk.rows(chunk_rows)
    np.testing.assert_array_equal(bits(t[:stager.rows]), bits(concat(kept, 0)))
    np.testing.assert_array_equal(bits(p[:stager.rows]), bits(concat(kept, 1)))
    assert len(t) == stager.rows


def test_rewind_to_a_chunk_start_frees_its_slot():
    batches = make_batches([5, 5, 5], trailing=(2,))
    batches[1][0][0, 0] = float("nan")
    stager = DeviceStager(5, (2,), device="cpu")
    disk = Disk()
    err, _ = run_until_error(stager, batches, disk)
    stager.rewind(err.chunk, err.valid_rows)
    assert (stager.rows, stager.batches, stager.fill, stager.chunk_index) == (5, 1, 0, 1)
    disk.take(stager.append(*make_batches([5], trailing=(2,), seed=4)[0]))
    assert sorted(disk.chunks) == [0, 1] and disk.chunks[1]["spans"] == ((1, 5, 5),)


def test_rewind_errors():
    stager = DeviceStager(4, (2,), device="cpu", slots=3)
    b = make_batches([3, 3, 3, 3], trailing=(2,))
    c0 = stager.append(*b[0]) + stager.append(*b[1])
    c1 = stager.append(*b[2]) + stager.append(*b[3])
    assert [c.index for c in c0 + c1] == [0, 1, 2]
    with pytest.raises(ValueError, match=r"keep_rows=2 cuts batch 0 \(rows 0-2\) in two"):
        stager.rewind(c0[0], 2)
    with pytest.raises(ValueError, match=r"keep_rows=4; expected an int in \[0, 3\]"):
        stager.rewind(c0[0], 4)
    with pytest.raises(RuntimeError, match=r"chunk\(s\) \[0\], handed out before it, are not released"):
        stager.rewind(c1[0], 1)
    with pytest.raises(ValueError, match="takes a ReadyChunk of this stager"):
        DeviceStager(4, (2,), device="cpu").rewind(c0[0], 0)
    c0[0].release()
    with pytest.raises(RuntimeError, match="already released or discarded"):
        stager.rewind(c0[0], 3)


def test_rewind_cut_must_be_a_batch_boundary_and_works_on_one():
    stager = DeviceStager(4, (2,), device="cpu", slots=3)
    b = make_batches([3, 3, 3, 3], trailing=(2,))
    chunks = [c for t, p in b for c in stager.append(t, p)]  # chunk 0: rows 0-3, 1: 4-7, 2: 8-11
    chunks[0].release()
    with pytest.raises(ValueError, match=r"keep_rows=1 cuts batch 1 \(rows 3-5\)"):
        stager.rewind(chunks[1], 1)
    stager.rewind(chunks[1], 2)  # row 6: batch 2 starts there
    assert (stager.rows, stager.batches, stager.fill, stager.chunk_index) == (6, 2, 2, 1)
    chunks[2].release()  # discarded by the rewind: a no-op
    assert stager.in_flight == 0 and stager.n_slots == 3


def test_check_finite_false_stores_non_finite_values_bit_for_bit():
    batches = make_batches([3, 4], trailing=(2,))
    batches[0][0][0, 0] = float("nan")
    batches[1][1][2, 1] = -float("inf")
    stager = DeviceStager(5, (2,), device="cpu", check_finite=False)
    disk = Disk()
    for t, p in batches:
        disk.take(stager.append(t, p))
    disk.take(stager.flush())
    assert not disk.log[0].checked
    t, p = disk.rows(5)
    np.testing.assert_array_equal(bits(t), bits(concat(batches, 0)))
    np.testing.assert_array_equal(bits(p), bits(concat(batches, 1)))


@pytest.mark.parametrize("trailing", [(), (0,), (2, 0)])
def test_nonfinite_check_with_scalar_rows_and_empty_rows(trailing):
    stager = DeviceStager(3, trailing, device="cpu")
    t, p = torch.zeros((4, *trailing)), torch.zeros((4, *trailing))
    if not trailing:
        p[2] = float("nan")
    chunks = stager.append(t, p)
    if trailing:
        chunks[0].wait()
        assert chunks[0].t.shape == (3, *trailing)
    else:
        with pytest.raises(NonFiniteBatchError, match="first at row 2"):
            chunks[0].wait()


# ------------------------------------------------------------------------- flush and slot reuse
def test_partial_flush_then_continue_rewrites_the_chunk_whole():
    stager = DeviceStager(6, (2,), device="cpu")
    disk = Disk()
    batches = make_batches([2, 2, 3, 5], trailing=(2,))
    disk.take(stager.append(*batches[0]))
    sealed = stager.flush()
    assert (sealed.index, sealed.n, sealed.sealed, sealed.batches) == (0, 2, True, 1)
    disk.take(sealed)
    assert stager.fill == 2 and stager.rows == 2  # the slot stays current
    disk.take(stager.append(*batches[1]))
    again = stager.flush()
    assert (again.index, again.n) == (0, 4)
    disk.take(again)
    repeat = stager.flush()  # nothing new: the same rows again (callers skip it; harmless)
    assert (repeat.index, repeat.n) == (0, 4)
    disk.take(repeat)
    for t, p in batches[2:]:
        disk.take(stager.append(t, p))
    disk.take(stager.flush())
    assert [(c.index, c.n, c.sealed) for c in disk.log] == [(0, 2, True), (0, 4, True), (0, 4, True),
                                                            (0, 6, False), (1, 6, False)]
    t, p = disk.rows(6)
    np.testing.assert_array_equal(t, concat(batches, 0))
    np.testing.assert_array_equal(p, concat(batches, 1))


def test_filling_a_flushed_chunk_waits_for_its_release():
    stager = DeviceStager(4, (2,), device="cpu", wait_timeout=0.2)
    b = make_batches([2, 2, 2], trailing=(2,))
    stager.append(*b[0])
    sealed = stager.flush()
    with pytest.raises(RuntimeError, match=r"waited 0.2 s for the flushed chunk 0 to be released.*chunk\(s\) \[0\]"):
        stager.append(*b[1])
    with pytest.raises(RuntimeError, match="flushed chunk 0"):
        stager.flush()
    assert (stager.rows, stager.batches) == (2, 1)  # the failed append changed nothing
    sealed.wait()
    sealed.release()
    (full,) = stager.append(*b[1])
    full.wait()
    np.testing.assert_array_equal(full.t, concat(b[:2], 0))


def test_a_single_threaded_caller_that_never_releases_gets_an_error_not_a_hang():
    stager = DeviceStager(2, (2,), device="cpu", slots=2, wait_timeout=0.2)
    b = make_batches([2, 2, 2], trailing=(2,))
    held = stager.append(*b[0]) + stager.append(*b[1])
    with pytest.raises(RuntimeError, match=r"waited 0.2 s for 1 free slot\(s\).*chunk\(s\) \[0, 1\].*release\(\)"):
        stager.append(*b[2])
    assert (stager.rows, stager.batches, stager.n_slots) == (4, 2, 2)
    held[0].release()
    held[0].release()  # idempotent
    (c,) = stager.append(*b[2])
    c.wait()
    np.testing.assert_array_equal(c.p, b[2][1].numpy())
    with pytest.raises(RuntimeError, match="released, or discarded"):
        held[0].wait()


def test_poll_gives_up_a_wait_and_changes_nothing():
    """The recorder's hook: a failed writer releases nothing, so the wait must end with its error."""

    class WriterFailed(Exception):
        pass

    polls = []

    def poll() -> None:
        polls.append(1)
        if len(polls) >= 3:
            raise WriterFailed("the writer failed")

    stager = DeviceStager(2, (2,), device="cpu", slots=2, poll=poll)
    b = make_batches([2, 2, 2], trailing=(2,))
    held = stager.append(*b[0]) + stager.append(*b[1])
    with pytest.raises(WriterFailed):
        stager.append(*b[2])
    assert len(polls) == 3 and (stager.rows, stager.batches, stager.in_flight) == (4, 2, 2)
    sealed = DeviceStager(4, (2,), device="cpu", poll=poll)
    sealed.append(*b[0])
    sealed.flush()
    with pytest.raises(WriterFailed):
        sealed.flush()  # the previous flushed chunk was never released
    for c in held:
        c.release()


def test_consumer_thread_with_backpressure_reuses_two_slots():
    """A slow consumer on another thread: the producer waits for slots; every row arrives in order."""
    stager = DeviceStager(8, (5,), device="cpu", slots=2)
    sizes = [int(x) for x in np.random.default_rng(1).integers(1, 9, 120)]
    batches = make_batches(sizes, trailing=(5,))
    q: queue.SimpleQueue = queue.SimpleQueue()
    disk = Disk()
    max_out = []

    def consume() -> None:
        while (c := q.get()) is not None:
            max_out.append(stager.in_flight)
            time.sleep(0.002)
            disk.take(c)

    th = threading.Thread(target=consume)
    th.start()
    for t, p in batches:
        for c in stager.append(t, p):
            q.put(c)
    c = stager.flush()
    if c is not None:
        q.put(c)
    q.put(None)
    th.join()
    assert stager.n_slots == 2 and max(max_out) <= 2
    t, p = disk.rows(8)
    np.testing.assert_array_equal(t, concat(batches, 0))
    np.testing.assert_array_equal(p, concat(batches, 1))


def test_reset_reuses_the_slots_for_a_new_epoch():
    stager = DeviceStager(4, (2,), device="cpu")
    ring = stager._state.ring
    disk = Disk()
    for t, p in make_batches([3, 3], trailing=(2,)):
        disk.take(stager.append(t, p))
    out = stager.flush()
    with pytest.raises(RuntimeError, match=r"reset\(\) while chunk\(s\) \[1\] are handed out"):
        stager.reset()
    disk.take(out)
    stager.reset()
    assert (stager.rows, stager.batches, stager.fill, stager.chunk_index) == (0, 0, 0, 0)
    assert stager._state.ring is ring
    disk2 = Disk()
    b = make_batches([5], trailing=(2,), seed=3)
    disk2.take(stager.append(*b[0]))
    disk2.take(stager.flush())
    np.testing.assert_array_equal(disk2.rows(4)[0], concat(b, 0))


def test_close_discards_and_refuses_more():
    stager = DeviceStager(2, (2,), device="cpu")
    (c,) = stager.append(*make_batches([3], trailing=(2,))[0])
    stager.close()
    stager.close()  # idempotent
    assert stager.closed and "closed" in repr(stager)
    with pytest.raises(RuntimeError, match="DeviceStager is closed"):
        stager.append(torch.zeros(1, 2), torch.zeros(1, 2))
    with pytest.raises(RuntimeError, match="DeviceStager is closed"):
        stager.flush()
    with pytest.raises(RuntimeError, match="DeviceStager is closed"):
        stager.reset()
    with pytest.raises(RuntimeError, match="discarded"):
        c.wait()
    c.release()  # a no-op


# ------------------------------------------------------------------------------ interrupt safety
def test_stage_without_commit_changes_nothing():
    stager = DeviceStager(4, (2,), device="cpu", slots=2)
    disk = Disk()
    b = make_batches([3, 7, 2], trailing=(2,))
    disk.take(stager.append(*b[0]))
    dropped = stager.stage(*make_batches([9], trailing=(2,), seed=5)[0])  # would fill three chunks
    assert isinstance(dropped, Staged) and dropped.full_chunks == 3
    assert (stager.rows, stager.batches, stager.in_flight) == (3, 1, 0)
    for t, p in b[1:2]:
        disk.take(stager.append(t, p))
    with pytest.raises(RuntimeError, match="stale Staged"):
        stager.commit(dropped)
    with pytest.raises(ValueError, match="takes a Staged returned by this stager"):
        DeviceStager(4, (2,), device="cpu").commit(dropped)
    first = stager.stage(*make_batches([3], trailing=(2,), seed=6)[0])
    second = stager.stage(*b[2])  # writes the rows the first one wrote: the first is void
    with pytest.raises(RuntimeError, match=r"stale Staged.*another stage"):
        stager.commit(first)
    disk.take(stager.commit(second))
    disk.take(stager.flush())
    np.testing.assert_array_equal(disk.rows(4)[1], concat(b, 1))


def test_an_interrupt_inside_stage_leaves_the_state_as_it_was(monkeypatch):
    stager = DeviceStager(4, (2,), device="cpu", slots=2)
    disk = Disk()
    b = make_batches([3, 9, 2], trailing=(2,))
    disk.take(stager.append(*b[0]))
    real = stager._copy_rows
    calls = []

    def flaky(*args):
        calls.append(1)
        if len(calls) == 2:  # after the current chunk's rows, before the next slot's
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(stager, "_copy_rows", flaky)
    with pytest.raises(KeyboardInterrupt):
        stager.append(*b[1])
    assert (stager.rows, stager.batches, stager.fill, stager.in_flight) == (3, 1, 3, 0)
    monkeypatch.setattr(stager, "_copy_rows", real)
    for t, p in b[1:]:
        disk.take(stager.append(t, p))
    disk.take(stager.flush())
    np.testing.assert_array_equal(disk.rows(4)[0], concat(b, 0))


def test_an_interrupt_inside_commit_before_the_assignment_leaves_the_state_as_it_was(monkeypatch):
    stager = DeviceStager(4, (2,), device="cpu", slots=2)
    disk = Disk()
    b = make_batches([3, 9, 2], trailing=(2,))
    disk.take(stager.append(*b[0]))
    real = stager._enqueue_copy
    calls = []

    def flaky(*args):
        calls.append(1)
        if len(calls) == 2:  # the second chunk's copy
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(stager, "_enqueue_copy", flaky)
    staged = stager.stage(*b[1])
    with pytest.raises(KeyboardInterrupt):
        stager.commit(staged)
    assert (stager.rows, stager.batches, stager.fill, stager.in_flight) == (3, 1, 3, 0)
    monkeypatch.setattr(stager, "_enqueue_copy", real)
    disk.take(stager.commit(staged))  # the same Staged commits once the interrupt is handled
    for t, p in b[2:]:
        disk.take(stager.append(t, p))
    disk.take(stager.flush())
    np.testing.assert_array_equal(disk.rows(4)[1], concat(b, 1))
    assert [c.spans for c in disk.log][:2] == [((0, 0, 3), (1, 3, 9)), ((1, 3, 9),)]


# ----------------------------------------------------------------------------------- labels
def test_labels_are_staged_with_their_rows():
    stager = DeviceStager(4, (2,), device="cpu", labels=("ids", "groups"))
    disk = Disk()
    sizes = [3, 6, 1]
    batches = make_batches(sizes, trailing=(2,))
    ids = np.arange(10, dtype=np.int64) * 7
    start = 0
    for (t, p), n in zip(batches, sizes):
        disk.take(stager.append(t, p, labels=(ids[start:start + n], -ids[start:start + n])))
        start += n
    disk.take(stager.flush())
    got = np.concatenate([disk.chunks[k]["labels"]["ids"] for k in sorted(disk.chunks)])
    np.testing.assert_array_equal(got, ids)
    assert set(disk.chunks[0]["labels"]) == {"ids", "groups"}


def test_label_errors():
    stager = DeviceStager(4, (2,), device="cpu", labels=("ids",))
    t = torch.zeros(2, 2)
    with pytest.raises(ValueError, match=r"came with 0 label array\(s\), but this stager stages \['ids'\]"):
        stager.append(t, t)
    with pytest.raises(TypeError, match="ids in batch 0 is ndarray int32; expected an int64 NumPy array"):
        stager.append(t, t, labels=(np.zeros(2, np.int32),))
    with pytest.raises(ValueError, match=r"ids in batch 0 has shape \(3,\); expected \(2,\)"):
        stager.append(t, t, labels=(np.zeros(3, np.int64),))


# ----------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs, match", [
    ({"chunk_rows": 0}, r"chunk_rows=0; expected a positive int"),
    ({"chunk_rows": True}, r"chunk_rows=True; expected a positive int"),
    ({"trailing": (3, -1)}, r"trailing=\(3, -1\); expected the shape of one row"),
    ({"dtypes": (np.float32,)}, r"expected two dtypes"),
    ({"dtypes": (np.float16, np.float32)}, r"stores float32 or float64"),
    ({"dtypes": ("nonsense", np.float32)}, r"dtype 'nonsense'; a stager stores float32 or float64"),
    ({"slots": 1}, r"slots=1; expected an int >= 2"),
    ({"wait_timeout": 0}, r"wait_timeout=0; expected seconds > 0"),
    ({"labels": ("ids", "ids")}, r"expected distinct non-empty names"),
    ({"labels": "ids"}, r"labels='ids'; expected distinct non-empty names"),
    ({"device": "meta"}, r"stages on 'cuda' \(or 'cpu', for tests\), not 'meta'"),
    ({"device": "nonsense"}, r"device='nonsense' is not a device"),
])
def test_constructor_errors(kwargs, match):
    args = {"chunk_rows": 4, "trailing": (2,), "dtypes": (np.float32, np.float32), "device": "cpu", **kwargs}
    chunk_rows = args.pop("chunk_rows")
    trailing = args.pop("trailing")
    dtypes = args.pop("dtypes")
    with pytest.raises(ValueError, match=match):
        DeviceStager(chunk_rows, trailing, dtypes, **args)


@pytest.mark.skipif(CUDA, reason="checks the error on a machine without CUDA")
def test_cuda_device_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match=r"device='cuda', but CUDA is not available here.*device='cpu'"):
        DeviceStager(4, (2,))


@pytest.mark.parametrize("make, exc, match", [
    (lambda: (np.zeros((2, 2), np.float32), torch.zeros(2, 2)), TypeError,
     r"y_true in batch 0 is a ndarray; DeviceStager takes torch tensors"),
    (lambda: (torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.int64)), TypeError,
     r"y_pred in batch 0 has dtype torch.int64; expected a floating dtype.*y_pred.float\(\)"),
    (lambda: (torch.tensor(1.0), torch.tensor(1.0)), ValueError, r"y_true in batch 0 is a scalar"),
    (lambda: (torch.zeros(2, 2), torch.zeros(2, 3)), ValueError,
     r"Expected y_pred to have the shape of y_true \(2, 2\), but got \(2, 3\) \(batch 0\)"),
    (lambda: (torch.zeros(2, 2), torch.zeros(2, 2, device="meta")), TypeError,
     r"y_true is on cpu but y_pred is on meta \(batch 0\).*y_true.to\(y_pred.device"),
    (lambda: (torch.zeros(2, 2, device="meta"), torch.zeros(2, 2, device="meta")), TypeError,
     r"Batch 0 is on meta, but this epoch stages batches on cpu"),
    (lambda: (torch.zeros(2, 3), torch.zeros(2, 3)), ValueError,
     r"Batch 0 has trailing shape \(3,\), but this epoch's batches have \(2,\)"),
])
def test_batch_errors_change_nothing(make, exc, match):
    stager = DeviceStager(4, (2,), device="cpu")
    with pytest.raises(exc, match=match):
        stager.append(*make())
    assert (stager.rows, stager.batches) == (0, 0)


def test_tensor_layout_errors():
    with pytest.raises(TypeError, match="DeviceStager takes torch tensors"):
        tensor_layout([1.0], torch.zeros(1))


# ------------------------------------------------------------------------------------- CUDA
def consume_in_thread(stager: DeviceStager):
    """A writer-like consumer thread: wait, copy the rows out, release. Returns (queue, thread, disk, errors)."""
    q: queue.SimpleQueue = queue.SimpleQueue()
    disk = Disk()
    errors: list[BaseException] = []

    def run() -> None:
        while (c := q.get()) is not None:
            try:
                disk.take(c)
            except BaseException as exc:  # noqa: BLE001 - handed back to the test
                errors.append(exc)
                return

    th = threading.Thread(target=run)
    th.start()
    return q, th, disk, errors


@cuda
def test_cuda_append_and_flush_never_sync():
    dev = torch.device("cuda")
    sizes = [16, 16, 5, 30, 16, 1, 40, 16]  # crosses several 24-row chunks, one batch spans two
    g = torch.Generator(device=dev).manual_seed(0)
    batches = [(torch.randn(n, 50, 4, device=dev, generator=g).to(torch.bfloat16 if i % 3 == 0 else torch.float32),
                torch.randn(n, 50, 4, device=dev, generator=g)) for i, n in enumerate(sizes)]
    stager = DeviceStager(24, (50, 4), device=dev, slots=10, check_finite=True)
    warm = [c for t, p in batches[:3] for c in stager.append(t, p)] + [stager.flush()]
    for c in warm:
        c.wait()
        c.release()
    stager.reset()
    torch.cuda.synchronize()
    out = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t, p in batches:
            out += stager.append(t, p)
        out.append(stager.flush())
    finally:
        torch.cuda.set_sync_debug_mode(0)
    disk = Disk()
    disk.take(out)
    got_t, got_p = disk.rows(24)
    np.testing.assert_array_equal(got_t, torch.cat([t.float() for t, _ in batches]).cpu().numpy())
    np.testing.assert_array_equal(got_p, torch.cat([p for _, p in batches]).cpu().numpy())


@cuda
def test_cuda_many_chunks_bit_identical_after_pinned_copies():
    """Two slots, a consumer thread, inputs overwritten right after append: every row as the sync path gives."""
    dev = torch.device("cuda")
    rng = np.random.default_rng(7)
    sizes = [int(x) for x in rng.integers(1, 60, 150)]
    g = torch.Generator(device=dev).manual_seed(1)
    stager = DeviceStager(37, (500, 20), device=dev, slots=2)
    q, th, disk, errors = consume_in_thread(stager)
    ref_t, ref_p = [], []
    for i, n in enumerate(sizes):
        t = torch.randn(n, 500, 20, device=dev, generator=g)
        p = torch.randn(n, 500, 20, device=dev, generator=g, dtype=torch.float16 if i % 2 else torch.float32)
        ref_t.append(t.cpu().numpy().copy())
        ref_p.append(p.float().cpu().numpy().copy())
        for c in stager.append(t, p):
            q.put(c)
        t.fill_(float("nan"))  # the loop reuses its buffers: the staged copy must not see this
        p.fill_(float("nan"))
    c = stager.flush()
    if c is not None:
        q.put(c)
    q.put(None)
    th.join()
    assert not errors, errors
    got_t, got_p = disk.rows(37)
    np.testing.assert_array_equal(bits(got_t), bits(np.concatenate(ref_t)))
    np.testing.assert_array_equal(bits(got_p), bits(np.concatenate(ref_p)))
    assert stager.n_slots == 2 and len(disk.chunks) == -(-sum(sizes) // 37)


@cuda
def test_cuda_nan_batch_is_reported_at_the_chunk_boundary():
    dev = torch.device("cuda")
    sizes = [16] * 20
    batches = [(torch.randn(16, 500, 20, device=dev), torch.randn(16, 500, 20, device=dev)) for _ in sizes]
    batches[9][1][3, 100, 7] = float("nan")  # batch 9: rows 144-159, chunk 2 of 64-row chunks (rows 128-191)
    stager = DeviceStager(64, (500, 20), device=dev, slots=3)
    q, th, disk, errors = consume_in_thread(stager)
    delivered_at = None
    for i, (t, p) in enumerate(batches):
        for c in stager.append(t, p):
            q.put(c)
            if c.index == 2:
                delivered_at = i
    q.put(None)
    th.join()
    assert delivered_at == 11  # the chunk boundary after batch 9, not batch 9 itself
    (err,) = errors
    assert isinstance(err, NonFiniteBatchError)
    assert (err.name, err.batch_index, err.batch_rows, err.first_row, err.chunk_index, err.valid_rows) == \
        ("y_pred", 9, (144, 160), 147, 2, 16)
    assert sorted(disk.chunks) == [0, 1]


# -------------------------------------------------------------------------------- benchmark
@pytest.mark.slow
def test_benchmark_script_smoke(tmp_path):
    script = ROOT / "benchmarks" / "run_gpu_capture.py"
    if not CUDA:
        proc = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "none")], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "needs a CUDA device" in proc.stdout
        assert not (tmp_path / "none" / "gpu_capture.json").exists()
    proc = subprocess.run(
        [sys.executable, str(script), "--allow-cpu", "--batches", "6", "--warmup", "2", "--repeat", "1",
         "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "gpu_capture.json").read_text())
    for mode in doc["config"]["modes"]:
        res = doc["results"][mode]
        assert res["step"]["ratio"] == 1.0
        for name, r in res.items():
            assert r["ms_per_step"] > 0 and np.isfinite(r["ratio"]), (mode, name)
        assert res["stager"]["rows_captured"] == doc["config"]["rows_per_variant"]
    assert any("+ DeviceStager.append" in line for line in doc["table"])
    (target,) = doc["targets"]
    assert target["met"] is None if doc["config"]["cpu_smoke"] else isinstance(target["met"], bool)
