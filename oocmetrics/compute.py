"""Epoch-end reduction: one dask pass over the stored chunks for every decomposable metric.

Each task reads its row blocks (whole stored chunks) of y_true and y_pred *inside the task*, one at a
time, and reduces each at once with the numba kernel (which releases the GIL, so threads run in
parallel): no chunk data ever waits in the scheduler between tasks, so memory is a few chunks
whatever the epoch size. Partials merge in one fixed tree over block index (:func:`merge_tree`:
``split_every`` at a time, pairwise within each group); a task does the tree's first level, so
results do not depend on the scheduler or on the number of threads, processes or workers.
Exact order statistics (``median_absolute_error``, quantiles) take more passes of the same shape.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from typing import Any, Callable, Iterable, Iterator, Literal

import dask
import numpy as np
import zarr
from zarr.buffer.cpu import NDBuffer

from oocmetrics.exchange import Exchange
from oocmetrics.kernels import select
from oocmetrics.kernels.moments import (
    K, N, SKIPPED, chunk_partials, empty_partials, n_outputs, tree_combine,
)
from oocmetrics.metrics import EpochMetrics, finalize, order_statistics_needed, resolve_metrics
from oocmetrics.errors import StoreError
from oocmetrics.store import chunk_key

SPLIT_EVERY = 8
LOCAL = Exchange()  # one process: nothing to exchange
_BORROW_LOCK = threading.Lock()


class RowBlocks:
    """Row blocks of a (y_true, y_pred) pair: zarr arrays or NumPy arrays, sliced only inside tasks.

    Block ``i`` covers rows [i * block_rows, (i + 1) * block_rows) of the first ``rows`` rows; for
    stored arrays ``block_rows`` is the zarr chunk, so each read is exactly one whole chunk.
    """

    def __init__(
        self, y_true: Any, y_pred: Any, rows: int, block_rows: int,
        buffers: list[tuple[np.ndarray, ...]] | None = None, drop: dict[int, np.ndarray] | None = None,
    ) -> None:
        # Only the first ``rows`` rows are read: arrays of a run that stopped mid-write may be longer.
        if tuple(y_true.shape[1:]) != tuple(y_pred.shape[1:]):
            raise ValueError(f"y_true has shape {tuple(y_true.shape)} but y_pred has {tuple(y_pred.shape)}")
        short = [name for name, a in (("y_true", y_true), ("y_pred", y_pred)) if a.shape[0] < rows]
        if short:
            raise ValueError(
                f"{short[0]} holds {min(y_true.shape[0], y_pred.shape[0])} rows, fewer than the {rows} "
                f"rows to read; the store is damaged (inspect it with `python -m oocmetrics inspect`)."
            )
        self.y_true, self.y_pred = y_true, y_pred
        self.rows, self.block_rows = int(rows), max(1, int(block_rows))
        self.n_outputs = n_outputs(tuple(y_true.shape))
        self.n_blocks = -(-self.rows // self.block_rows)
        self._token = uuid.uuid4().hex  # the arrays may be large: never hash them
        self._local = threading.local()
        # Idle (y_true, y_pred) buffer pairs lent by the caller (a Recorder's chunk buffers): each
        # thread borrows one for its reads instead of allocating two more chunks.
        self._lent = list(buffers or [])
        # Rows left out of every metric (duplicate sample ids): block -> row offsets within the block.
        self.drop = {int(i): np.asarray(r, np.int64) for i, r in (drop or {}).items() if len(r)}
        self.kept_rows = self.rows - sum(r.size for r in self.drop.values())
        self._complete: set[str] = set()  # non-local arrays whose chunks this process has counted

    def __dask_tokenize__(self) -> str:
        return self._token

    def __getstate__(self) -> dict[str, Any]:  # for dask.distributed: buffers are per process
        state = dict(self.__dict__)
        del state["_local"]
        state["_lent"] = []
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()
        self._complete = set()  # a worker sees the store through its own filesystem: count again

    def _read(self, arr: Any, name: str, lo: int, hi: int) -> np.ndarray:
        if not isinstance(arr, zarr.Array):
            return np.asarray(arr[lo:hi])
        # Stored chunks are read into one reused buffer per thread and array: allocating a fresh
        # chunk-sized array per task fragments the heap, which measured +80 MB of peak RSS.
        buf = getattr(self._local, name, None)
        if buf is None:
            buf = self._borrow(name == "t", arr)
            setattr(self._local, name, buf)
        view = buf[: hi - lo]
        if not self._read_file(arr, lo, view):
            if getattr(arr.store, "root", None) is None and name not in self._complete:
                self._check_chunks(arr, name)
            arr.get_basic_selection(slice(lo, hi), out=NDBuffer.from_numpy_array(view))
        return view

    def _check_chunks(self, arr: zarr.Array, name: str) -> None:
        """zarr reads a missing chunk as fill values (zeros): for a store that is not a local
        directory (an fsspec URL), count its chunks once per process before trusting a read."""
        have = arr.nchunks_initialized
        if have < self.n_blocks:
            raise StoreError(
                f"{arr.store} holds {have} chunks of {'y_true' if name == 't' else 'y_pred'}, fewer than the "
                f"{self.n_blocks} that its {self.rows} durable rows fill: the store is damaged or incompletely "
                f"copied, or this process (e.g. a dask worker) does not see the same filesystem."
            )
        self._complete.add(name)

    def _read_file(self, arr: zarr.Array, lo: int, view: np.ndarray) -> bool:
        """Read an uncompressed chunk straight from its file into ``view`` (False: let zarr do it).

        For a local array whose only codec is little-endian bytes, a chunk file is the chunk's C-order
        values (zarr v3 spec), so its first rows are its first bytes: one ``readinto`` in this task's
        thread, no temporary copy, no queue behind zarr's I/O threads, reads in parallel across tasks.
        """
        root = getattr(arr.store, "root", None)
        if root is None or lo % self.block_rows:
            return False
        key = chunk_key(arr, lo // self.block_rows)
        path = f"{root}/{arr.path}/{key}" if arr.path else f"{root}/{key}"
        meta = arr.metadata
        codecs = getattr(meta, "codecs", ())
        if (len(codecs) != 1 or type(codecs[0]).__name__ != "BytesCodec"
                or getattr(getattr(codecs[0], "endian", None), "value", None) != "little"
                or not view.flags.c_contiguous or not view.dtype.str.startswith("<")):
            if not os.path.exists(path):  # zarr would read it as fill values
                raise _missing_chunk(path, lo, view.shape[0])
            return False
        try:
            with open(path, "rb", buffering=0) as f:
                mv = memoryview(view).cast("B")
                got = 0
                while got < mv.nbytes:
                    n = f.readinto(mv[got:])
                    if not n:
                        return False  # a short file: not what we wrote; zarr decides
                    got += n
        except FileNotFoundError:
            # zarr would read a missing chunk as fill values (zeros): never count those as data
            raise _missing_chunk(path, lo, view.shape[0]) from None
        return True

    def _borrow(self, first: bool, arr: zarr.Array) -> np.ndarray:
        shape = (self.block_rows, *arr.shape[1:])
        with _BORROW_LOCK:
            for k, pair in enumerate(self._lent):
                buf = pair[0 if first else 1]
                if (buf is not None and buf.dtype == arr.dtype and buf.shape[1:] == shape[1:]
                        and buf.shape[0] >= shape[0]):
                    self._lent[k] = (None, pair[1]) if first else (pair[0], None)  # type: ignore[assignment]
                    return buf
        return np.empty(shape, dtype=arr.dtype)

    def read(self, i: int, *, rows: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Block i of both arrays as (values, n_outputs) NumPy arrays (valid until the next read),
        without its dropped rows; ``rows=True``: every row, in the stored shape (rows, *trailing)."""
        lo = i * self.block_rows
        hi = min(self.rows, lo + self.block_rows)
        J = self.n_outputs
        t = self._read(self.y_true, "t", lo, hi)
        p = self._read(self.y_pred, "p", lo, hi)
        if rows:
            return t, p
        gone = self.drop.get(i)
        if gone is not None:  # a copy of one block, only for the few blocks holding duplicates
            t, p = np.delete(t, gone, axis=0), np.delete(p, gone, axis=0)
        return t.reshape(-1, J), p.reshape(-1, J)


def _missing_chunk(path: str, lo: int, n: int) -> StoreError:
    return StoreError(
        f"{path} is missing: it holds rows {lo}-{lo + n - 1}, which the epoch says are durable. The store "
        f"is damaged (restore the file, or record the epoch again)."
    )


class ShardBlocks:
    """The row blocks of several shards (DDP ranks' stores) one after another, read like one RowBlocks."""

    def __init__(self, parts: list[RowBlocks]) -> None:
        if not parts:
            raise ValueError("no shards to read")
        self.parts = parts
        self.n_outputs = parts[0].n_outputs
        self.rows = sum(b.rows for b in parts)
        self.kept_rows = sum(b.kept_rows for b in parts)
        self._starts = np.cumsum([0] + [b.n_blocks for b in parts])
        self.n_blocks = int(self._starts[-1])

    def read(self, i: int, *, rows: bool = False) -> tuple[np.ndarray, np.ndarray]:
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self.parts[k].read(i - int(self._starts[k]), rows=rows)


def block_partials(t: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Partials (K, J) of one row block, exactly as the epoch-end pass computes them from the store.

    The writer thread calls this on each chunk while it is in memory; the stored result is then the
    same bits the data pass would compute, so merging stored partials equals a recompute bit for bit.
    """
    J = n_outputs(tuple(t.shape))
    if t.size == 0:
        return empty_partials(J)
    return chunk_partials(t.reshape(-1, J), p.reshape(-1, J))


def merge_tree(stack: np.ndarray, split_every: int = SPLIT_EVERY) -> np.ndarray:
    """Merge per-block partials (n, K, J) in THE fixed tree: groups of ``split_every`` consecutive
    blocks (each merged pairwise by :func:`tree_combine`), then groups of those, up to one.

    Every path (stored partials, a data pass with any grouping of tasks, any scheduler, threads or
    workers) uses this tree, so they agree bit for bit.
    """
    if stack.shape[0] == 0:
        return empty_partials(stack.shape[2])
    level = np.ascontiguousarray(stack, dtype=np.float64)
    while level.shape[0] > 1:
        level = np.stack([tree_combine(level[i:i + split_every]) for i in range(0, level.shape[0], split_every)])
    return level[0].copy()


def _group_partials(blocks: Any, first: int, last: int, replaced: dict[int, np.ndarray]) -> np.ndarray:
    """First level of the merge tree for blocks [first, last): each block's partials, merged."""
    stack = np.empty((last - first, K, blocks.n_outputs))
    for i in range(first, last):
        if i in replaced:
            stack[i - first] = replaced[i]
        else:
            t, p = blocks.read(i)
            stack[i - first] = block_partials(t, p)
    return tree_combine(stack)


def compute_partials(
    blocks: Any, *, split_every: int = SPLIT_EVERY, scheduler: Any = None, progress: bool = False,
    replaced: dict[int, np.ndarray] | None = None,
) -> np.ndarray:
    """Merged partials (K, J) of every block, computed in one pass.

    A task reads ``split_every`` consecutive blocks (8 x 2 x 8 MiB by default: ~128 MB, a size that
    suits a dask.distributed cluster) and merges them: that is the merge tree's first level, so the
    result is bit for bit :func:`merge_tree` of the per-block partials, for any scheduler.
    ``replaced``: partials of some blocks already known (they are not read).
    """
    if blocks.n_blocks == 0:
        return empty_partials(blocks.n_outputs)
    replaced = replaced or {}
    tasks = [
        dask.delayed(_group_partials, pure=False)(blocks, a, min(a + split_every, blocks.n_blocks), {
            i: v for i, v in replaced.items() if a <= i < a + split_every})
        for a in range(0, blocks.n_blocks, split_every)
    ]
    if progress and not _is_distributed(scheduler):
        from dask.diagnostics import ProgressBar

        with ProgressBar(minimum=1.0):
            level = dask.compute(*tasks, scheduler=scheduler)
    else:
        level = dask.compute(*tasks, scheduler=scheduler)
    return merge_tree(np.stack(level), split_every)


def _is_distributed(scheduler: Any) -> bool:
    return type(scheduler).__module__.startswith("distributed")


HIST_BUDGET = 32 << 20
"""Bytes of histograms an order-statistics pass may hold at once (beside the chunks being read)."""
SPREAD = 64
"""The second pass's digit is made wide enough that evenly spread buckets would leave at most
``GATHER_MAX / SPREAD`` candidates (not wider: a narrow histogram stays in cache)."""
WINDOW = 1 / 64
"""Least half-width, as a fraction of the bucket, of the window of digits the second pass gathers
around each rank's expected digit (see :func:`_windows`)."""
_log = logging.getLogger(__name__)


def _workers(scheduler: Any) -> int:
    """How many tasks the scheduler runs at once (an estimate: it only sets the number of folds)."""
    if scheduler in ("sync", "synchronous", "single-threaded"):
        return 1
    n = dask.config.get("num_workers", None)
    info = getattr(scheduler, "nthreads", None)  # a dask.distributed Client
    if callable(info):
        try:
            n = sum(info().values())
        except Exception:  # noqa: BLE001  (only a parallelism hint)
            n = None
    return max(1, int(n or os.cpu_count() or 1))


def _fold_groups(n_blocks: int, n_groups: int) -> list[range]:
    """Contiguous runs of block indices, ``n_groups`` of them (fewer if there are fewer blocks)."""
    n_groups = max(1, min(n_groups, n_blocks))
    edges = np.linspace(0, n_blocks, n_groups + 1).round().astype(int)
    return [range(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def _plan(n_rows: int, want: int, folds: int) -> tuple[int, int, int]:
    """(digit width, folds, histogram rows per pass) so that ``folds`` histograms of ``rows`` x
    2**width int64 fit ``HIST_BUDGET``: the digit is ``want`` bits if it fits with fewer folds (down
    to 1), else narrower, down to ``MIN_DIGIT_BITS``; only past that are the rows split over passes."""
    def fit(f: int, rows: int) -> int:
        return int(np.floor(np.log2(max(1, HIST_BUDGET // (f * rows * 8)))))

    if fit(folds, n_rows) < want:
        folds = max(1, min(folds, HIST_BUDGET // (n_rows * 8 << want)))
    width = min(want, fit(folds, n_rows))
    floor = min(want, select.MIN_DIGIT_BITS)
    if width >= floor:
        return width, folds, n_rows
    return floor, 1, max(2, HIST_BUDGET // (8 << floor))


def _second_digit(candidates: int, left: int) -> int:
    """Bits of the second pass's digit: enough that ``candidates`` values spread evenly over the
    buckets leave at most ``GATHER_MAX / SPREAD`` (at least ``MIN_DIGIT_BITS``, at most 16)."""
    need = int(np.ceil(np.log2(max(1.0, candidates * SPREAD / max(1, select.GATHER_MAX)))))
    return min(left, select.DIGIT_BITS, max(select.MIN_DIGIT_BITS, need))


def _fold_sum(blocks: Any, scheduler: Any, n_folds: int, fold: Any) -> list[Any]:
    """``fold(run of blocks)`` for ``n_folds`` contiguous runs of blocks, as dask tasks (each one
    histogram, allocated once, whatever the number of blocks in its run)."""
    return list(dask.compute(
        *[dask.delayed(fold, pure=False)(g) for g in _fold_groups(blocks.n_blocks, n_folds)], scheduler=scheduler,
    ))


def _histogram_pass(
    blocks: Any, bits: int, starts: np.ndarray, tprefix: np.ndarray, scheduler: Any,
    exchange: Exchange = LOCAL, want: int = select.DIGIT_BITS, reads: list[int] | None = None,
    speculate: Callable[[select.RowPlan, int], np.ndarray | None] | None = None,
) -> Iterator[tuple[int, int, np.ndarray, np.ndarray, np.ndarray | None, int, tuple[np.ndarray, np.ndarray] | None]]:
    """Merged histograms of the next ``width`` key bits of |e| after the top ``bits`` over every block,
    in bounded memory. Yields ``(k0, k1, rows, hist, extremes, width, gathered)``: ``hist[rows[k - k0]]``
    is target k's (2**width,) int64 counts for k0 <= k < k1, and ``extremes[rows[k - k0]]`` the
    smallest and largest key among its values (uint64; None in the first pass). Normally one item:
    one read of the data (``reads[0]`` is increased by the reads made).

    ``speculate(plan, width)``: (rows, 4) windows of digits, two per row of the :class:`RowPlan`
    (see :func:`~oocmetrics.kernels.select.row_histogram_into`), or None; the values in them are
    gathered by the same pass, at most ``GATHER_MAX`` (key, target) in all, and yielded as
    ``gathered`` (None if they did not fit, or nothing was asked, or the pass is not by rows).

    Each task *folds* a contiguous run of blocks into one histogram it allocates once, so a pass holds
    ``n_folds`` histograms whatever the number of blocks (integer counts: the grouping cannot change
    the result). The digit is ``want`` bits when ``n_folds`` histograms fit ``HIST_BUDGET``, else with
    fewer folds; with very many targets it narrows (:func:`_plan`); past ``MIN_DIGIT_BITS`` the
    targets are split into groups, one pass over the data each: memory stays under the budget
    whatever the number of outputs and quantiles.

    Every value costs one histogram increment: the first pass (``bits == 0``) counts per output, the
    pooled row being their sum; later passes count per (output, prefix) row, for the outputs' own
    targets and for every output's share of each pooled target (pooled rows: sums again), found in an
    exact :class:`~oocmetrics.kernels.select.TargetTable`. When that table is not exact or those rows
    do not fit, a value is looked up for its output's and its pooled target (``histogram_into``).
    """
    J = blocks.n_outputs
    T = tprefix.size
    left = select.KEY_BITS - bits
    n_folds = max(1, min(_workers(scheduler), blocks.n_blocks))
    # The digit width must be the same on every rank: size it for the rank with the most folds.
    widest = max(exchange.gather(n_folds)) if exchange.size > 1 else n_folds
    pooled = bool(starts[J + 1] > starts[J])
    want = min(want, left)
    no_key = np.iinfo(np.uint64).max
    reads = [0] if reads is None else reads

    def read(fold: Any) -> list[Any]:  # one pass over the data: each task folds a run of blocks
        reads[0] += 1  # under DDP a failed read on one rank is raised on all (none waits for ever)
        return exchange.call(lambda: _fold_sum(blocks, scheduler, n_folds, fold), "an order-statistics pass")

    def merged(results: list[Any], shape: tuple[int, ...]) -> np.ndarray:
        total = results.pop(0) if results else np.zeros(shape, np.int64)  # a rank with no rows
        while results:
            total += results.pop(0)  # integer counts: any order gives the same sums
        return exchange.sum(total)

    def merged_extremes(parts: list[np.ndarray], n: int) -> np.ndarray:
        keys = np.stack(parts) if parts else np.zeros((0, n, 2), np.uint64)
        if exchange.size > 1:
            keys = np.concatenate([k for k in exchange.gather(keys) if k.size] or [keys], axis=0)
        out = np.empty((n, 2), np.uint64)
        out[:, 0] = keys[:, :, 0].min(axis=0) if keys.shape[0] else no_key
        out[:, 1] = keys[:, :, 1].max(axis=0) if keys.shape[0] else 0
        return out

    if bits == 0:  # one row per output: at this level each output has one target at most, prefix 0
        width, widest, per_pass = _plan(J + pooled, want, widest)
        n_folds, size = min(n_folds, widest), 1 << width
        owner_of = np.repeat(np.arange(J + 1), np.diff(starts))
        total_row = np.zeros(size, np.int64) if pooled else None
        step = max(1, per_pass - pooled)
        for j0 in range(0, J, step):
            j1 = min(J, j0 + step)

            def fold(group: range, j0: int = j0, j1: int = j1) -> np.ndarray:
                out = np.zeros((j1 - j0, size), np.int64)
                for i in group:
                    t, p = blocks.read(i)
                    select.owner_histogram_into(t, p, J, j0, j1, width, out)
                return out

            hist = merged(read(fold), (j1 - j0, size))
            if total_row is not None:
                total_row += hist.sum(axis=0)
            k0, k1 = int(starts[j0]), int(starts[j1])
            yield k0, k1, owner_of[k0:k1] - j0, hist, None, width, None
            del hist
        if total_row is not None:
            yield int(starts[J]), T, np.zeros(1, np.int64), total_row[None], None, width, None
        return

    rows = select.RowPlan(starts, tprefix, bits)
    width, folds, per_pass = _plan(T, want, widest)
    if rows.table.exact:
        row_width, row_folds, row_per_pass = _plan(rows.n_rows, want, widest)
        if row_per_pass == rows.n_rows and row_width >= width:
            n_folds, size, dump = min(n_folds, row_folds), 1 << row_width, rows.dump
            win = speculate(rows, row_width) if speculate is not None else None
            # every rank's folds together gather at most GATHER_MAX / 2 values: GATHER_MAX (key, target)
            # once a value of an output's target that is also part of a pooled target is listed for both
            cap = select.GATHER_MAX // (2 * widest * exchange.size) if win is not None else 0
            if win is None:
                win = np.zeros((dump + 1, 4), np.uint64)

            def fold_rows(group: range) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
                out = np.zeros((rows.n_rows, size), np.int64)
                lo_key, hi_key = np.full(rows.n_rows, no_key), np.zeros(rows.n_rows, np.uint64)
                got_k, got_r, m = np.empty(cap, np.uint64), np.empty(cap, np.uint64), 0
                for i in group:
                    t, p = blocks.read(i)
                    m = select.row_histogram_into(t, p, J, bits, row_width, rows.table, out[:dump + 1],
                                                  lo_key[:dump + 1], hi_key[:dump + 1], win, got_k, got_r, m)
                got = (got_k[:m].copy(), got_r[:m].astype(np.int64)) if m >= 0 else None
                return out, np.stack([lo_key, hi_key], axis=1), got

            results = read(fold_rows)
            extremes = merged_extremes([r[1] for r in results], rows.n_rows)
            parts = [r[2] for r in results]
            hist = merged([r[0] for r in results], (rows.n_rows, size))
            del results
            for i, sources in enumerate(rows.pooled_sources):  # pooled rows: sums of every output's share
                hist[dump + 1 + i] = hist[sources].sum(axis=0)
                extremes[dump + 1 + i] = extremes[sources, 0].min(), extremes[sources, 1].max()
            gathered = None
            if cap:
                if exchange.size > 1:
                    parts = [x for everyone in exchange.gather(parts) for x in everyone]
                if all(x is not None for x in parts):
                    gathered = rows.to_targets(np.concatenate([x[0] for x in parts] or [np.zeros(0, np.uint64)]),
                                               np.concatenate([x[1] for x in parts] or [np.zeros(0, np.int64)]))
            del parts
            yield 0, T, rows.of_target, hist, extremes, row_width, gathered
            return

    n_folds, size = min(n_folds, folds), 1 << width
    for k0 in range(0, T, per_pass):
        k1 = min(T, k0 + per_pass)
        table = select.TargetTable(np.clip(starts - k0, 0, k1 - k0), tprefix[k0:k1], bits)

        def fold(group: range, table: select.TargetTable = table, n: int = k1 - k0) -> tuple[np.ndarray, np.ndarray]:
            out = np.zeros((n, size), np.int64)
            lo_key, hi_key = np.full(n, no_key), np.zeros(n, np.uint64)
            for i in group:
                t, p = blocks.read(i)
                select.histogram_into(t, p, J, bits, width, table, out, lo_key, hi_key)
            return out, np.stack([lo_key, hi_key], axis=1)

        results = read(fold)
        extremes = merged_extremes([r[1] for r in results], k1 - k0)
        hist = merged([r[0] for r in results], (k1 - k0, size))
        del results
        yield k0, k1, np.arange(k1 - k0), hist, extremes, width, None
        del hist


def select_order_statistics(
    blocks: Any, ranks: np.ndarray, pooled_ranks: np.ndarray | None = None, *,
    split_every: int = SPLIT_EVERY, scheduler: Any = None, exchange: Exchange = LOCAL,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``ranks[j, r]``-th smallest |e| (0-based) of each output j, and the ``pooled_ranks[r]``-th
    smallest over all outputs' values together, all in the same passes.

    Radix select over the 63-bit keys of |e| (see :mod:`oocmetrics.kernels.select`); the pooled set
    is one more owner whose histogram rows are sums of the outputs' rows, so pooled ranks cost no
    extra pass (and usually no extra work per value). Passes over the data, for any number of ranks:

    1. a histogram of the top 16 bits of every value, per output;
    2. if more than ``GATHER_MAX`` candidates remain, a histogram of the next bits of the selected
       buckets only, its digit just wide enough to leave about ``GATHER_MAX / SPREAD`` candidates
       (:func:`_second_digit`: 6 to 16 bits, so the histograms stay in cache). The same pass gathers
       the values of each bucket's digits around its ranks' expected digits (:func:`_windows`), when
       they probably hold at most ``GATHER_MAX / 2`` values: a rank whose digit falls in its window
       is then resolved by this pass, from its whole bucket;
    3. while more than ``GATHER_MAX`` candidates remain (heavy ties), more histogram passes of
       16-bit digits;
    4. one pass gathers the candidates of the ranks left, and one sort of them picks every rank.

    A rank is also resolved, without a gather, when all 63 bits are known or when the bucket it
    selected turns out, in the next histogram pass, to hold copies of one value (its smallest and
    largest keys, recorded by that pass, are equal). Passes taken: continuous data 2 (small data:
    the gather follows pass 1; larger: pass 2 resolves every rank from its window), 3 when the
    windows would not fit ``GATHER_MAX / 2`` (about 150 M values or more at 20 outputs x 4
    quantiles) or a digit falls outside its window; heavily tied data 2 when the first pass's
    bucket of the tie holds nothing else (e.g. many |e| == 0), else 3 or 4 (a bucket shared by the
    tie and other values is split further); at most 5 in any case (16 + 6 + 16 + 16 bits, then a
    gather or the last bits), as long as the digits are not narrowed by the memory budget, i.e. up
    to 63 outputs and up to 256 distinct buckets asked (e.g. 20 outputs x (4 quantiles + median) x
    2 ranks, pooled too).
    Memory: at most ``HIST_BUDGET`` bytes of histograms (with more outputs or ranks the digits narrow
    and, past ``MIN_DIGIT_BITS``, the targets are split over more passes: more passes, never more
    memory) and at most ``GATHER_MAX`` candidates. A negative rank gives NaN. Each pass is logged at
    DEBUG level on this module's logger, with a ``select_pass`` dict in the record.
    Under DDP (``exchange``) the ranks are global, every rank reads its own blocks, histograms are
    summed and candidates gathered across ranks: every rank gets the same values.
    """
    J = blocks.n_outputs
    ranks = np.asarray(ranks, dtype=np.int64).reshape(J, -1)
    R = ranks.shape[1]
    pooled = np.zeros(0, np.int64) if pooled_ranks is None else np.asarray(pooled_ranks, np.int64).reshape(-1)
    all_ranks = np.concatenate([ranks.reshape(-1), pooled])
    owner_all = np.concatenate([np.repeat(np.arange(J), R), np.full(pooled.size, J)]).astype(np.int64)
    result = np.full(all_ranks.size, np.nan)

    def split(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return values[: J * R].reshape(J, R), values[J * R:]

    live = np.flatnonzero(all_ranks >= 0)
    owner, rank = owner_all[live], all_ranks[live]
    prefix = np.zeros(live.size, np.uint64)
    bits, level, candidates = 0, 0, 0
    count = np.zeros(live.size, np.int64)
    while live.size:
        starts, tprefix, target = select.targets_of(owner, prefix, J + 1)
        want = select.DIGIT_BITS if level != 1 else _second_digit(candidates, select.KEY_BITS - bits)
        windows: list[np.ndarray] = []

        def speculate(plan: select.RowPlan, width: int) -> np.ndarray | None:
            win, first, last = _windows(plan, int(starts[J]), target, rank, count, width)
            windows[:] = [first, last]
            return win

        new_prefix = np.empty_like(prefix)
        new_rank, new_count = np.empty_like(rank), np.empty_like(rank)
        done = np.zeros(live.size, bool)
        tic, reads = time.perf_counter(), [0]
        for k0, k1, rows, hist, extremes, width, gathered in _histogram_pass(
                blocks, bits, starts, tprefix, scheduler, exchange, want, reads,
                speculate if level == 1 else None):  # the second pass also gathers the likely buckets
            mine = np.flatnonzero((target >= k0) & (target < k1))
            new_prefix[mine], new_rank[mine], new_count[mine] = select.narrow(
                hist, rows[target[mine] - k0], prefix[mine], rank[mine], width)
            if extremes is not None:  # a bucket whose smallest and largest keys are equal is resolved
                lo_hi = extremes[rows[target[mine] - k0]]
                tied = lo_hi[:, 0] == lo_hi[:, 1]
                result[live[mine[tied]]] = select.key_to_value(lo_hi[tied, 0])
                done[mine[tied]] = True
            if gathered is not None:  # a rank whose digit fell in its window: its whole bucket is here
                digit = (new_prefix & np.uint64((1 << width) - 1)).astype(np.int64)
                hit = ~done & (digit >= windows[0][target]) & (digit <= windows[1][target])
                picked = _pick_gathered(gathered, bits + width, width, tprefix.size, target[hit], new_prefix[hit],
                                        new_rank[hit], new_count[hit])
                result[live[hit]] = np.where(np.isnan(picked), result[live[hit]], picked)
                done[hit] = ~np.isnan(picked)
        _log.debug("order statistics: histogram level %d, %d targets, %d-bit digit, %d read(s) of the data, "
                   "%d of %d ranks resolved, %.3f s", level + 1, tprefix.size, width, reads[0], done.sum(), done.size,
                   time.perf_counter() - tic,
                   extra={"select_pass": {"kind": "histogram", "targets": int(tprefix.size), "width": width,
                                          "reads": reads[0], "resolved": int(done.sum()),
                                          "gathered": None if gathered is None else int(gathered[0].size),
                                          "seconds": time.perf_counter() - tic}})
        prefix, rank, count = new_prefix, new_rank, new_count
        bits += width
        level += 1
        if bits == select.KEY_BITS:  # every bit known: the bucket holds copies of one value
            result[live[~done]] = select.key_to_value(prefix[~done])
            done[:] = True
        keep = ~done
        live, owner, prefix, rank, count = live[keep], owner[keep], prefix[keep], rank[keep], count[keep]
        if not live.size:
            break
        _, first = np.unique(np.stack([owner.astype(np.uint64), prefix], axis=1), axis=0, return_index=True)
        candidates = int(count[first].sum())
        if candidates <= select.GATHER_MAX:  # candidates of the distinct buckets
            result[live] = select.key_to_value(_gather_pass(blocks, bits, owner, prefix, rank, scheduler, exchange))
            break
    return split(result)


def _windows(
    plan: select.RowPlan, n_own: int, target: np.ndarray, rank: np.ndarray, count: np.ndarray, width: int,
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Windows of the digits that the next pass will probably select, for :func:`_histogram_pass`'s
    ``speculate``: a rank ``r`` of a bucket of ``c`` values is expected at digit ``r / c * 2**width``
    (values spread evenly over the bucket), give or take ``WINDOW`` of the bucket, or ``4 / sqrt(c)``
    of it if more (several times the sampling spread of that estimate). Returns (the (rows, 4) windows of ``plan``, or None when
    they would probably hold more than ``GATHER_MAX / 2`` values; the first and last digit of the
    window of each target)."""
    size = 1 << width
    T = plan.of_target.size
    expected = rank / np.maximum(count, 1) * size
    margin = np.ceil(size * np.maximum(WINDOW, 4 / np.sqrt(np.maximum(count, 1))))
    first = np.full(T, size, np.int64)
    last = np.full(T, -1, np.int64)
    np.minimum.at(first, target, np.clip(np.floor(expected - margin), 0, size - 1).astype(np.int64))
    np.maximum.at(last, target, np.clip(np.floor(expected + margin), 0, size - 1).astype(np.int64))
    bucket = np.zeros(T, np.int64)
    bucket[target] = count
    if float(np.sum(bucket * np.maximum(last - first + 1, 0)) / size) > select.GATHER_MAX / 2:
        return None, first, last
    win = np.zeros((plan.dump + 1, 4), np.uint64)
    own = np.arange(n_own)
    win[plan.of_target[own], 0] = first[own]
    win[plan.of_target[own], 1] = np.maximum(last[own] - first[own] + 1, 0)
    for i, sources in enumerate(plan.pooled_sources):  # a pooled target's window, on every output's share
        win[sources, 2] = first[n_own + i]
        win[sources, 3] = max(last[n_own + i] - first[n_own + i] + 1, 0)
    return win, first, last


def _pick_gathered(
    gathered: tuple[np.ndarray, np.ndarray], bits: int, width: int, n_targets: int, target: np.ndarray,
    prefix: np.ndarray, rank: np.ndarray, count: np.ndarray,
) -> np.ndarray:
    """The ``rank``-th smallest of the gathered (key, target) whose top ``bits`` bits are ``prefix``
    (the bucket the last ``width``-bit digit selected in ``target``), as float64, for each query; NaN
    where the gathered keys are not the whole bucket (``count`` values: they always are when its
    digit was in the target's window)."""
    keys, index = gathered
    out = np.full(target.size, np.nan)
    if not target.size:
        return out
    size = np.uint64(1 << width)
    wanted = target.astype(np.uint64) * size + (prefix & (size - np.uint64(1)))  # (target, digit)
    buckets, which = np.unique(wanted, return_inverse=True)
    slot = np.full(n_targets << width, -1, np.int64)  # (target, digit) -> bucket: no more than a histogram
    slot[buckets.astype(np.int64)] = np.arange(buckets.size)
    digit = (keys >> np.uint64(select.KEY_BITS - bits)) & (size - np.uint64(1))
    pos = slot[(index.astype(np.uint64) * size + digit).astype(np.int64)]
    keep = pos >= 0
    keys, pos = keys[keep], pos[keep]
    whole = np.bincount(pos, minlength=buckets.size)[which] == count
    if whole.any():
        bucket_prefix = np.zeros(buckets.size, np.uint64)
        bucket_prefix[which] = prefix
        out[whole] = select.key_to_value(select.pick(keys, pos, bits, bucket_prefix, which[whole], rank[whole]))
    return out


def _gather_pass(
    blocks: Any, bits: int, owner: np.ndarray, prefix: np.ndarray, rank: np.ndarray, scheduler: Any,
    exchange: Exchange,
) -> np.ndarray:
    """The keys of the ``rank``-th smallest |e| among those whose top ``bits`` bits equal ``prefix``,
    of output ``owner`` (J: pooled), for each query: one pass gathers them, one sort picks them."""
    J = blocks.n_outputs
    tic = time.perf_counter()
    starts, tprefix, target = select.targets_of(owner, prefix, J + 1)
    rows = select.RowPlan(starts, tprefix, bits, dump=False)  # one lookup per value, pooled targets included

    def fold(group: range) -> tuple[np.ndarray, np.ndarray]:
        keys, index = [], []
        for i in group:
            t, p = blocks.read(i)
            k, x = select.gather_chunk(t, p, J, bits, rows.table)
            keys.append(k)
            index.append(x)
        keys_rows = np.concatenate(keys or [np.zeros(0, np.uint64)]), np.concatenate(index or [np.zeros(0, np.int64)])
        return rows.to_targets(*keys_rows)

    gathered = exchange.call(lambda: _fold_sum(blocks, scheduler, max(1, min(_workers(scheduler), blocks.n_blocks)), fold),
                             "the order-statistics gather pass")
    if exchange.size > 1:
        gathered = [g for everyone in exchange.gather(gathered) for g in everyone]
    keys = np.concatenate([g[0] for g in gathered] or [np.zeros(0, np.uint64)])
    index = np.concatenate([g[1] for g in gathered] or [np.zeros(0, np.int64)])
    del gathered
    out = select.pick(keys, index, bits, tprefix, target, rank)
    _log.debug("order statistics: gather pass, %d candidates, %.3f s", keys.size, time.perf_counter() - tic,
               extra={"select_pass": {"kind": "gather", "targets": int(tprefix.size), "candidates": int(keys.size),
                                      "reads": 1, "seconds": time.perf_counter() - tic}})
    return out


def abs_error_order_statistics(blocks: RowBlocks, ranks: np.ndarray, **kwargs: Any) -> np.ndarray:
    """Exact ``ranks[j, r]``-th smallest |y_true - y_pred| (0-based) of each output j, as float64.

    See :func:`select_order_statistics` (and its keyword arguments). A negative rank (an output with
    no finite pair) gives NaN.
    """
    return select_order_statistics(blocks, ranks, None, **kwargs)[0]


def _median_ranks(counts: np.ndarray) -> np.ndarray:
    """(J, 2) ranks of the middle two |e| of each output (-1 for an output with no finite pair)."""
    n = np.asarray(counts, dtype=np.int64)
    return np.stack([np.where(n > 0, (n - 1) // 2, -1), np.where(n > 0, n // 2, -1)], axis=1)


def median_abs_error(blocks: RowBlocks, counts: np.ndarray, **kwargs: Any) -> np.ndarray:
    """Exact per-output median of |e| with NumPy's ``np.median`` rule (mean of the middle two)."""
    lo_hi = abs_error_order_statistics(blocks, _median_ranks(counts), **kwargs)
    return (lo_hi[:, 0] + lo_hi[:, 1]) / 2


DEFAULT_QUANTILES = (0.5, 0.9, 0.95, 0.99)


def check_quantiles(quantiles: Any) -> tuple[float, ...] | None:
    """Validate ``quantiles=``: None, True (:data:`DEFAULT_QUANTILES`), a number or numbers in [0, 1]."""
    if quantiles is None or quantiles is False:
        return None
    if quantiles is True:
        return DEFAULT_QUANTILES
    q = np.asarray(quantiles, dtype=np.float64).reshape(-1)
    if q.size == 0 or not np.all((q >= 0) & (q <= 1)):
        raise ValueError(f"quantiles={quantiles!r}; expected numbers in [0, 1] (e.g. (0.5, 0.9, 0.99)).")
    return tuple(float(x) for x in q)


def abs_error_quantiles(
    blocks: RowBlocks, counts: np.ndarray, quantiles: Iterable[float], *, median: bool = False, **kwargs: Any,
) -> dict[str, Any]:
    """Exact quantiles of |e| per output and pooled over all outputs, NumPy's ``method="linear"``.

    Returns ``{"q": [Q floats], "per_output": (Q, J) float64, "pooled": (Q,) float64}``:
    ``per_output[i, j]`` is bit for bit ``np.quantile(|e|[:, j], q[i])`` over output j's finite pairs
    and ``pooled[i]`` is ``np.quantile`` of all of them together (NaN where there is none). Every
    order statistic of every quantile, per output and pooled (and with ``median=True`` the
    per-output medians, returned as ``"median"`` (J,)), comes from one radix select
    (:func:`select_order_statistics`): 2 passes over the data on continuous data (3 past about
    150 M values at 20 outputs x 4 quantiles), whatever the number of quantiles.
    """
    q = np.asarray(tuple(quantiles), dtype=np.float64)
    n = np.asarray(counts, dtype=np.int64)
    lo, hi, gamma = select.quantile_ranks(n, q)  # (Q, J)
    plo, phi, pgamma = select.quantile_ranks(np.int64(n.sum()), q)  # (Q,)
    Q = q.size
    ranks = [lo.T, hi.T] + ([_median_ranks(n)] if median else [])
    per, pool = select_order_statistics(blocks, np.concatenate(ranks, axis=1), np.concatenate([plo, phi]), **kwargs)
    with np.errstate(invalid="ignore", over="ignore"):
        out: dict[str, Any] = {
            "q": [float(x) for x in q],
            "per_output": select.lerp(per[:, :Q].T, per[:, Q:2 * Q].T, gamma),
            "pooled": select.lerp(pool[:Q], pool[Q:], pgamma),
        }
        if median:
            out["median"] = (per[:, 2 * Q] + per[:, 2 * Q + 1]) / 2
    return out


def metrics_of(
    blocks: Any, *, metrics: Iterable[str] | None = None,
    split_every: int = SPLIT_EVERY, scheduler: Any = None, progress: bool = False,
    epoch: int | None = None, split: str | None = None, quantiles: Any = None,
) -> EpochMetrics:
    """Exact metrics of all blocks: one pass for the partials, more only for order statistics.

    ``quantiles``: exact quantiles of |e| to add as ``result.quantiles`` (see
    :func:`abs_error_quantiles`): numbers in [0, 1], or True for :data:`DEFAULT_QUANTILES`. With
    ``median_absolute_error`` too, both come from the same radix-select passes. Stored epochs, with
    their partials and sample ids, go through :func:`oocmetrics.shards.compute_shards`.
    """
    metrics = resolve_metrics(metrics)  # once: a generator must not be consumed twice
    partials = compute_partials(blocks, split_every=split_every, scheduler=scheduler, progress=progress)
    return finish_metrics(
        blocks, partials, blocks.kept_rows, metrics=metrics, quantiles=quantiles, split_every=split_every,
        scheduler=scheduler, epoch=epoch, split=split,
    )


def finish_metrics(
    blocks: Any, partials: np.ndarray, n_rows: int, *, metrics: tuple[str, ...], quantiles: Any = None,
    split_every: int = SPLIT_EVERY, scheduler: Any = None, exchange: Exchange = LOCAL,
    epoch: int | None = None, split: str | None = None,
) -> EpochMetrics:
    """Metrics from the merged partials (K, J) of every row, plus the order statistics and quantiles
    that need passes over ``blocks`` (this rank's blocks under DDP)."""
    qs = check_quantiles(quantiles)
    order_stats = {}
    quantile_result = None
    want_median = "median_absolute_error" in order_statistics_needed(metrics)
    select_args = {"split_every": split_every, "scheduler": scheduler, "exchange": exchange}
    if qs is not None:
        # the median's two middle ranks are asked with the quantiles' ranks: one select for all
        quantile_result = abs_error_quantiles(blocks, partials[N], qs, median=want_median, **select_args)
        if want_median:
            order_stats["median_absolute_error"] = quantile_result.pop("median")
    elif want_median:
        order_stats["median_absolute_error"] = median_abs_error(blocks, partials[N], **select_args)
    result = finalize(partials, metrics, n_rows=n_rows, order_stats=order_stats, epoch=epoch, split=split)
    result.quantiles = quantile_result
    return result


def compute_arrays(
    y_true: Any, y_pred: Any, metrics: Iterable[str] | None = None, *, chunk_rows: int | None = None,
    nonfinite: str = "raise", split_every: int = SPLIT_EVERY, scheduler: Any = None, quantiles: Any = None,
) -> EpochMetrics:
    """Exact metrics of in-memory arrays with the same kernels and merge tree (no store).

    ``chunk_rows`` sets the row blocks (default: about 8 MiB each); the result does not depend on
    it beyond float64 rounding.
    ``quantiles``: also exact quantiles of |e| in ``result.quantiles`` (see :func:`metrics_of`).
    """
    from oocmetrics.validation import check_batch

    t, p = check_batch(y_true, y_pred, trailing=None, batch_index=0, row_offset=0, nonfinite=nonfinite)  # type: ignore[arg-type]
    rows = t.shape[0]
    if rows == 0:
        raise ValueError("y_true has no rows; metrics of an empty set are undefined.")
    if chunk_rows is None:
        chunk_rows = max(1, (8 << 20) // max(1, t[:1].nbytes))
    return metrics_of(
        RowBlocks(t, p, rows, chunk_rows), metrics=metrics,
        split_every=split_every, scheduler=scheduler, quantiles=quantiles,
    )


Source = Literal["auto", "partials", "data"]


def usable_partials(partials: Any, rows: int, chunk_rows: int, trailing: tuple[int, ...]) -> np.ndarray | None:
    """The stored per-chunk partials of the first ``rows`` rows, or None if they do not cover exactly
    those rows (an old store, or a crash between a chunk's rewrite and its row count)."""
    if partials is None or rows <= 0:
        return None
    n_chunks = -(-rows // chunk_rows)
    if partials.shape[0] < n_chunks or tuple(partials.shape[1:]) != (K, n_outputs((rows, *trailing))):
        return None
    stack = np.array(partials[:n_chunks], dtype=np.float64)  # a copy: callers patch it
    per_row = int(np.prod(trailing[:-1], dtype=np.int64)) if len(trailing) > 1 else 1
    covered = (stack[:, N, 0] + stack[:, SKIPPED, 0]) / per_row
    expected = np.minimum(chunk_rows, rows - np.arange(n_chunks) * chunk_rows)
    return stack if np.array_equal(covered, expected) else None
