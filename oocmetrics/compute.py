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

from oocmetrics.kernels.moments import (
    K, chunk_partials, empty_partials, n_outputs, reference_shift, tree_combine,
)
from oocmetrics.metrics import EpochMetrics, finalize

SPLIT_EVERY = 8


def _partials_block(t: np.ndarray, p: np.ndarray, n_out: int, shift: np.ndarray) -> np.ndarray:
    return chunk_partials(t.reshape(-1, n_out), p.reshape(-1, n_out), shift)[None]


def _combine(x: np.ndarray, axis: Any = None, keepdims: bool = True) -> np.ndarray:
    return tree_combine(x)[None]


def _identity(x: np.ndarray, axis: Any = None, keepdims: bool = True) -> np.ndarray:
    return x


def partials_graph(
    y_true: da.Array, y_pred: da.Array, shift: np.ndarray, *, split_every: int = SPLIT_EVERY,
) -> da.Array:
    """Lazy (1, K, J) partials of two dask arrays chunked along rows only; see ``chunk_partials``."""
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has shape {y_true.shape} but y_pred has {y_pred.shape}")
    if y_true.chunks[0] != y_pred.chunks[0]:
        y_pred = y_pred.rechunk(y_true.chunks)
    J = n_outputs(y_true.shape)
    nb = y_true.numblocks[0]
    if y_true.ndim == 1:
        y_true, y_pred = y_true[:, None], y_pred[:, None]
    # Trailing axes must be whole in each block (they are for stored arrays); then flatten them.
    y_true = y_true.rechunk({i: -1 for i in range(1, y_true.ndim)})
    y_pred = y_pred.rechunk({i: -1 for i in range(1, y_pred.ndim)})
    if y_true.ndim > 2:
        y_true = y_true.reshape(y_true.shape[0], -1)
        y_pred = y_pred.reshape(y_pred.shape[0], -1)
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


def compute_store_arrays(
    y_true: zarr.Array, y_pred: zarr.Array, rows: int, shift: np.ndarray, *,
    metrics: Iterable[str] | None = None,
    split_every: int = SPLIT_EVERY, scheduler: Any = None, progress: bool = False,
    epoch: int | None = None, split: str | None = None,
) -> EpochMetrics:
    """Exact metrics over the first ``rows`` rows of two stored zarr arrays."""
    t = da.from_zarr(y_true)[:rows]
    p = da.from_zarr(y_pred)[:rows]
    partials = compute_partials(t, p, shift, split_every=split_every, scheduler=scheduler, progress=progress)
    return finalize(partials, metrics, n_rows=rows, epoch=epoch, split=split)


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
    partials = compute_partials(dt, dp, reference_shift(t[:1]), split_every=split_every, scheduler=scheduler)
    return finalize(partials, metrics, n_rows=rows)
