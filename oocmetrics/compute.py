"""Epoch-end reduction: one dask pass over the stored chunks for every decomposable metric.

Each task reads one chunk of y_true and y_pred and reduces it to float64 partials (K, J) with the
numba kernel (which releases the GIL, so threads run in parallel). Partials then merge in dask's tree
reduction over chunk index (``split_every`` at a time, pairwise within each group): a fixed order, so
results do not depend on the number of threads or workers.
"""
from __future__ import annotations

from typing import Any, Iterable

import dask
import dask.array as da
import numpy as np
import zarr

from oocmetrics.kernels import select
from oocmetrics.kernels.moments import (
    K, N, chunk_partials, empty_partials, n_outputs, reference_shift, tree_combine,
)
from oocmetrics.metrics import EpochMetrics, finalize, order_statistics_needed

SPLIT_EVERY = 8


def _partials_block(t: np.ndarray, p: np.ndarray, n_out: int, shift: np.ndarray) -> np.ndarray:
    return chunk_partials(t.reshape(-1, n_out), p.reshape(-1, n_out), shift)[None]


def _combine(x: np.ndarray, axis: Any = None, keepdims: bool = True) -> np.ndarray:
    return tree_combine(x)[None]


def _identity(x: np.ndarray, axis: Any = None, keepdims: bool = True) -> np.ndarray:
    return x


def _rows2d(y_true: da.Array, y_pred: da.Array) -> tuple[da.Array, da.Array, int]:
    """Both arrays as (rows, values per row), one block per row chunk, and the number of outputs J."""
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has shape {y_true.shape} but y_pred has {y_pred.shape}")
    if y_true.chunks[0] != y_pred.chunks[0]:
        y_pred = y_pred.rechunk(y_true.chunks)
    J = n_outputs(y_true.shape)
    if y_true.ndim == 1:
        y_true, y_pred = y_true[:, None], y_pred[:, None]
    # Trailing axes must be whole in each block (they are for stored arrays); then flatten them.
    y_true = y_true.rechunk({i: -1 for i in range(1, y_true.ndim)})
    y_pred = y_pred.rechunk({i: -1 for i in range(1, y_pred.ndim)})
    if y_true.ndim > 2:
        y_true = y_true.reshape(y_true.shape[0], -1)
        y_pred = y_pred.reshape(y_pred.shape[0], -1)
    return y_true, y_pred, J


def partials_graph(
    y_true: da.Array, y_pred: da.Array, shift: np.ndarray, *, split_every: int = SPLIT_EVERY,
) -> da.Array:
    """Lazy (1, K, J) partials of two dask arrays chunked along rows only; see ``chunk_partials``."""
    y_true, y_pred, J = _rows2d(y_true, y_pred)
    nb = y_true.numblocks[0]
    parts = da.map_blocks(
        _partials_block, y_true, y_pred, J, np.asarray(shift, dtype=np.float64),
        new_axis=[2], chunks=((1,) * nb, (K,), (J,)), dtype=np.float64,
        meta=np.empty((0, 0, 0), dtype=np.float64),
    )
    return da.reduction(
        parts, chunk=_identity, combine=_combine, aggregate=_combine, axis=0, keepdims=True,
        dtype=np.float64, split_every=split_every, concatenate=True,
        meta=np.empty((0, 0, 0), dtype=np.float64),
    )


def _histogram_block(t: np.ndarray, p: np.ndarray, J: int, level: int, prefix: np.ndarray) -> np.ndarray:
    return select.histogram_chunk(t.reshape(-1, J), p.reshape(-1, J), J, level, prefix)[None]


def abs_error_order_statistics(
    y_true: da.Array, y_pred: da.Array, ranks: np.ndarray, *, split_every: int = SPLIT_EVERY,
    scheduler: Any = None,
) -> np.ndarray:
    """Exact ``ranks[j, r]``-th smallest |y_true - y_pred| (0-based) of each output j, as float64.

    Radix select (see :mod:`oocmetrics.kernels.select`): usually two histogram passes and one gather
    pass over the chunks; memory is one histogram per task and at most ``GATHER_MAX`` candidates.
    A negative rank (an output with no finite pair) gives NaN.
    """
    t2, p2, J = _rows2d(y_true, y_pred)
    ranks = np.asarray(ranks, dtype=np.int64)
    missing = ranks < 0
    rank = np.where(missing, 0, ranks)
    R = rank.shape[1]
    nb = t2.numblocks[0]
    prefix = np.zeros((J, R), np.uint64)
    bits = 0
    for level in range(select.LEVELS):
        hist = da.map_blocks(
            _histogram_block, t2, p2, J, level, prefix, new_axis=[2, 3],
            chunks=((1,) * nb, (J,), (R,), (select.BINS,)), dtype=np.int64,
            meta=np.empty((0, 0, 0, 0), dtype=np.int64),
        ).sum(axis=0, split_every=split_every)
        (merged,) = dask.compute(hist, scheduler=scheduler)
        prefix, rank, count = select.narrow(np.asarray(merged), prefix, rank)
        bits += select.DIGIT_BITS
        if bits == 64:  # every bit known: the bucket holds copies of one value
            return np.where(missing, np.nan, select.key_to_value(prefix))
        if count.max() <= select.GATHER_MAX:
            break
    tasks = [
        dask.delayed(select.gather_chunk)(tb.reshape(-1, J), pb.reshape(-1, J), J, bits, prefix)
        for tb, pb in zip(t2.to_delayed().ravel(), p2.to_delayed().ravel())
    ]
    gathered = dask.compute(*tasks, scheduler=scheduler)
    values = np.concatenate([g[0] for g in gathered])
    index = np.concatenate([g[1] for g in gathered])
    out = np.empty((J, R))
    order = np.argsort(index, kind="stable")
    values, index = values[order], index[order]
    starts = np.searchsorted(index, np.arange(J * R))
    ends = np.searchsorted(index, np.arange(J * R), side="right")
    for jr in range(J * R):
        if missing.flat[jr]:
            out.flat[jr] = np.nan
            continue
        cand = np.sort(values[starts[jr]:ends[jr]])
        out.flat[jr] = cand[rank.flat[jr]]
    return np.where(missing, np.nan, out)


def median_abs_error(
    y_true: da.Array, y_pred: da.Array, counts: np.ndarray, **kwargs: Any,
) -> np.ndarray:
    """Exact per-output median of |e| with NumPy's ``np.median`` rule (mean of the middle two)."""
    n = np.asarray(counts, dtype=np.int64)
    ranks = np.stack([np.where(n > 0, (n - 1) // 2, -1), np.where(n > 0, n // 2, -1)], axis=1)
    lo_hi = abs_error_order_statistics(y_true, y_pred, ranks, **kwargs)
    return (lo_hi[:, 0] + lo_hi[:, 1]) / 2


def compute_partials(
    y_true: da.Array, y_pred: da.Array, shift: np.ndarray, *, split_every: int = SPLIT_EVERY,
    scheduler: Any = None, progress: bool = False,
) -> np.ndarray:
    """Merged partials (K, J) of two dask arrays, computed in one pass."""
    if y_true.shape[0] == 0:
        return empty_partials(n_outputs(y_true.shape))
    graph = partials_graph(y_true, y_pred, shift, split_every=split_every)
    if progress:
        from dask.diagnostics import ProgressBar

        with ProgressBar(minimum=1.0):
            (out,) = dask.compute(graph, scheduler=scheduler)
    else:
        (out,) = dask.compute(graph, scheduler=scheduler)
    return np.asarray(out)[0]


def metrics_of(
    y_true: da.Array, y_pred: da.Array, shift: np.ndarray, *, metrics: Iterable[str] | None = None,
    n_rows: int, split_every: int = SPLIT_EVERY, scheduler: Any = None, progress: bool = False,
    epoch: int | None = None, split: str | None = None,
) -> EpochMetrics:
    """Exact metrics of two dask arrays: one pass for the partials, more only for order statistics."""
    partials = compute_partials(
        y_true, y_pred, shift, split_every=split_every, scheduler=scheduler, progress=progress,
    )
    order_stats = {}
    if "median_absolute_error" in order_statistics_needed(metrics):
        order_stats["median_absolute_error"] = median_abs_error(
            y_true, y_pred, partials[N], split_every=split_every, scheduler=scheduler,
        )
    return finalize(partials, metrics, n_rows=n_rows, order_stats=order_stats, epoch=epoch, split=split)


def compute_store_arrays(
    y_true: zarr.Array, y_pred: zarr.Array, rows: int, shift: np.ndarray, *,
    metrics: Iterable[str] | None = None,
    split_every: int = SPLIT_EVERY, scheduler: Any = None, progress: bool = False,
    epoch: int | None = None, split: str | None = None,
) -> EpochMetrics:
    """Exact metrics over the first ``rows`` rows of two stored zarr arrays."""
    return metrics_of(
        da.from_zarr(y_true)[:rows], da.from_zarr(y_pred)[:rows], shift, metrics=metrics, n_rows=rows,
        split_every=split_every, scheduler=scheduler, progress=progress, epoch=epoch, split=split,
    )


def compute_arrays(
    y_true: Any, y_pred: Any, metrics: Iterable[str] | None = None, *, chunk_rows: int | None = None,
    nonfinite: str = "raise", split_every: int = SPLIT_EVERY, scheduler: Any = None,
) -> EpochMetrics:
    """Exact metrics of in-memory arrays with the same kernels and merge tree (no store).

    ``chunk_rows`` sets the row chunking (default: about 16 MB chunks); the result does not depend on
    it beyond float64 rounding.
    """
    from oocmetrics.validation import check_batch

    t, p = check_batch(y_true, y_pred, trailing=None, batch_index=0, row_offset=0, nonfinite=nonfinite)  # type: ignore[arg-type]
    rows = t.shape[0]
    if rows == 0:
        raise ValueError("y_true has no rows; metrics of an empty set are undefined.")
    if chunk_rows is None:
        row_bytes = max(1, t[:1].nbytes)
        chunk_rows = max(1, (16 << 20) // row_bytes)
    dt = da.from_array(t, chunks=(chunk_rows,) + t.shape[1:])
    dp = da.from_array(p, chunks=(chunk_rows,) + p.shape[1:])
    return metrics_of(
        dt, dp, reference_shift(t[:1]), metrics=metrics, n_rows=rows, split_every=split_every,
        scheduler=scheduler,
    )
