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

import os
import threading
import uuid
from typing import Any, Iterable, Literal

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
            arr.get_basic_selection(slice(lo, hi), out=NDBuffer.from_numpy_array(view))
        return view

    def _read_file(self, arr: zarr.Array, lo: int, view: np.ndarray) -> bool:
        """Read an uncompressed chunk straight from its file into ``view`` (False: let zarr do it).

        For a local array whose only codec is little-endian bytes, a chunk file is the chunk's C-order
        values (zarr v3 spec), so its first rows are its first bytes: one ``readinto`` in this task's
        thread, no temporary copy, no queue behind zarr's I/O threads, reads in parallel across tasks.
        """
        root = getattr(arr.store, "root", None)
        meta = arr.metadata
        codecs = getattr(meta, "codecs", ())
        if (root is None or len(codecs) != 1 or type(codecs[0]).__name__ != "BytesCodec"
                or getattr(getattr(codecs[0], "endian", None), "value", None) != "little"
                or not view.flags.c_contiguous or not view.dtype.str.startswith("<") or lo % self.block_rows):
            return False
        key = chunk_key(arr, lo // self.block_rows)
        try:
            with open(f"{root}/{arr.path}/{key}" if arr.path else f"{root}/{key}", "rb", buffering=0) as f:
                mv = memoryview(view).cast("B")
                got = 0
                while got < mv.nbytes:
                    n = f.readinto(mv[got:])
                    if not n:
                        return False  # a short file: not what we wrote; zarr decides
                    got += n
        except FileNotFoundError:
            return False  # a chunk never written: zarr fills it
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


def _histogram_pass(
    blocks: RowBlocks, bits: int, starts: np.ndarray, tprefix: np.ndarray, scheduler: Any,
    exchange: Exchange = LOCAL,
) -> tuple[np.ndarray, int]:
    """Merged (targets, 2**width) int64 histogram of the next ``width`` bits of |e| after the top
    ``bits`` over every block, in bounded memory; returns it and ``width``.

    Each task *folds* a contiguous run of blocks into one histogram it allocates once, so a pass holds
    ``n_folds`` histograms whatever the number of blocks (integer counts: the grouping cannot change
    the result). The digit is 16 bits when ``n_folds`` (target, 65,536) histograms fit
    ``HIST_BUDGET``; with many targets (many outputs x quantiles) it narrows, down to
    ``MIN_DIGIT_BITS``, and then the folds drop to 1: memory stays under the budget, the passes
    do not multiply.
    """
    J = blocks.n_outputs
    T = tprefix.size
    left = 64 - bits
    n_folds = max(1, min(_workers(scheduler), blocks.n_blocks))
    # The digit width must be the same on every rank: size it for the rank with the most folds.
    widest = max(exchange.gather(n_folds)) if exchange.size > 1 else n_folds

    def fit(folds: int) -> int:
        return int(np.floor(np.log2(max(1, HIST_BUDGET // (folds * T * 8)))))

    width = fit(widest)
    if width < min(select.DIGIT_BITS, left):
        widest = max(1, min(widest, HIST_BUDGET // (T * 8 << min(select.DIGIT_BITS, left))))
        width = fit(widest)
    n_folds = min(n_folds, widest)
    width = min(left, max(select.MIN_DIGIT_BITS, min(select.DIGIT_BITS, width)))

    def fold(group: range) -> np.ndarray:
        out = np.zeros((T, 1 << width), np.int64)
        for i in group:
            t, p = blocks.read(i)
            select.histogram_into(t, p, J, bits, width, starts, tprefix, out)
        return out

    results = list(dask.compute(
        *[dask.delayed(fold, pure=False)(g) for g in _fold_groups(blocks.n_blocks, n_folds)],
        scheduler=scheduler,
    ))
    total = results.pop(0) if results else np.zeros((T, 1 << width), np.int64)  # a rank with no rows
    while results:
        total += results.pop(0)  # integer counts: any order gives the same sums
    return exchange.sum(total), width


def select_order_statistics(
    blocks: RowBlocks, ranks: np.ndarray, pooled_ranks: np.ndarray | None = None, *,
    split_every: int = SPLIT_EVERY, scheduler: Any = None, exchange: Exchange = LOCAL,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``ranks[j, r]``-th smallest |e| (0-based) of each output j, and the ``pooled_ranks[r]``-th
    smallest over all outputs' values together, all in the same passes.

    Radix select (see :mod:`oocmetrics.kernels.select`); the pooled set is one more histogram row
    (owner J), so pooled ranks cost no extra pass. Passes, for any number of ranks: histogram passes
    until at most ``GATHER_MAX`` candidates remain (1 on small data, usually 2; 16-bit digits, so at
    most 4 if the histograms fit the budget at full width, e.g. heavily tied data), then 1 gather
    pass (none if all 64 bits are known). So continuous data takes 2 or 3 passes in all.
    Memory: at most ``HIST_BUDGET`` bytes of histograms (with very many targets the digit narrows
    instead) and at most ``GATHER_MAX`` candidates. A negative rank gives NaN.
    Under DDP (``exchange``) the ranks are global, every rank reads its own blocks, histograms are
    summed and candidates gathered across ranks: every rank gets the same values.
    """
    J = blocks.n_outputs
    ranks = np.asarray(ranks, dtype=np.int64).reshape(J, -1)
    R = ranks.shape[1]
    pooled = np.zeros(0, np.int64) if pooled_ranks is None else np.asarray(pooled_ranks, np.int64).reshape(-1)
    all_ranks = np.concatenate([ranks.reshape(-1), pooled])
    owner = np.concatenate([np.repeat(np.arange(J), R), np.full(pooled.size, J)]).astype(np.int64)
    result = np.full(all_ranks.size, np.nan)
    live = np.flatnonzero(all_ranks >= 0)

    def split(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return values[: J * R].reshape(J, R), values[J * R:]

    if live.size == 0:
        return split(result)
    owner, rank = owner[live], all_ranks[live]
    prefix = np.zeros(live.size, np.uint64)
    bits = 0
    while True:
        starts, tprefix, target = select.targets_of(owner, prefix, J + 1)
        hist, width = _histogram_pass(blocks, bits, starts, tprefix, scheduler, exchange)
        prefix, rank, count = select.narrow(hist, target, prefix, rank, width)
        del hist
        bits += width
        if bits == 64:  # every bit known: the bucket holds copies of one value
            result[live] = select.key_to_value(prefix)
            return split(result)
        _, first = np.unique(np.stack([owner.astype(np.uint64), prefix], axis=1), axis=0, return_index=True)
        if count[first].sum() <= select.GATHER_MAX:  # candidates of the distinct buckets
            break

    starts, tprefix, target = select.targets_of(owner, prefix, J + 1)

    def gather(i: int) -> tuple[np.ndarray, np.ndarray]:
        t, p = blocks.read(i)
        return select.gather_chunk(t, p, J, bits, starts, tprefix)

    gathered = dask.compute(*[dask.delayed(gather, pure=False)(i) for i in range(blocks.n_blocks)], scheduler=scheduler)
    values = np.concatenate([g[0] for g in gathered] or [np.zeros(0)])
    index = np.concatenate([g[1] for g in gathered] or [np.zeros(0, np.int64)])
    del gathered
    if exchange.size > 1:
        everyone = exchange.gather((values, index))
        values = np.concatenate([v for v, _ in everyone])
        index = np.concatenate([i for _, i in everyone])
        del everyone
    order = np.lexsort((values, index))  # by target, then by value
    values, index = values[order], index[order]
    begin = np.searchsorted(index, np.arange(tprefix.size))
    result[live] = values[begin[target] + rank]
    return split(result)


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
    per-output medians, returned as ``"median"`` (J,)), comes from one radix select: at most 4
    passes over the data, usually 2 or 3, whatever the number of quantiles.
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
