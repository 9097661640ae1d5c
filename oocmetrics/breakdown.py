"""Breakdowns of a stored epoch, exact and in one pass: per time step, per group, and a |error| histogram.

Per step. Data of shape (rows, steps, outputs) is viewed as (rows, steps * outputs): each (step, output)
pair is then one column of the same kernel (:func:`~oocmetrics.kernels.moments.chunk_partials`), and
the per-block partials merge in the same fixed tree as every other path (:func:`oocmetrics.compute.merge_tree`),
so ``per_step[m][s, j]`` is exactly the metric of column (s, j) over every row, as :func:`finalize` gives
it for any other output. Memory, whatever the number of rows: per reading thread, one chunk of each
array, the kernel's accumulators for ``COLUMNS`` columns at a time (2.5 MB) and ``split_every`` blocks'
(K, steps * outputs) float64 partials (8 x 1.4 MB for 500 x 20); plus one such partials per tree node
waiting to be merged. Measured on 1 GB of (500, 20) float32 windows in 8 MiB chunks, 2 threads: peak
RSS +100 MB over the imports (+25 MB of it the chunk buffers any pass holds), 0.7-1.5 s.

Per group. With a ``groups`` array stored beside y_true (int64, one id per row), each block's rows are
split by group id (stable, so row order is kept) and each group's partials merge over blocks in the
same tree: ``per_group`` holds every metric of every group, over exactly that group's rows.

Histogram. Every finite pair's |y_true - y_pred| (float64) is counted into a fixed log-spaced grid:
the top ``HIST_SUB_BITS`` mantissa bits and the exponent of the value's float64 bit pattern, so
``2**HIST_SUB_BITS`` bins per octave over all of float64 (16,384 int64 counts, 128 KiB), no range to
guess beforehand, and integer counts that any merge order sums the same.

All three come from the same read of each block (:func:`analyze`); a block is read by one task,
``split_every`` consecutive blocks per task, as :func:`oocmetrics.compute.compute_partials` does.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

import dask
import numpy as np

from oocmetrics._numba import njit
from oocmetrics.compute import SPLIT_EVERY, RowBlocks, block_partials
from oocmetrics.dedup import plan_shard, rows_by_block, summarize_ids
from oocmetrics.errors import StoreError
from oocmetrics.kernels.moments import K, MAX_AE, N, SAE, SKIPPED, SSE, chunk_partials, empty_partials, tree_combine
from oocmetrics.metrics import finalize, order_statistics_needed, resolve_metrics
from oocmetrics.stored import open_stored_shards

__all__ = [
    "StepBlocks", "analyze", "per_step", "per_group", "error_histogram", "to_json",
    "HIST_SUB_BITS", "HIST_BINS", "COLUMNS", "MAX_GROUPS",
]

HIST_SUB_BITS = 3
"""Mantissa bits of |e| kept by the histogram: 2**3 = 8 bins per octave (about 24 per decade)."""
HIST_BINS = 1 << (11 + HIST_SUB_BITS)
"""Bins of the full grid: every float64 exponent x ``2**HIST_SUB_BITS`` (the last used one is +inf)."""
_SHIFT = 52 - HIST_SUB_BITS
_INF_KEY = 0x7FF << HIST_SUB_BITS  # key of +inf: a finite pair whose difference overflowed
COLUMNS = 1024
"""Columns per kernel call: its accumulators are 16 rows x 19 x ``COLUMNS`` float64 (2.5 MB), not
16 x 19 x steps * outputs (24 MB for 500 x 20) per thread. Each column's arithmetic does not depend on
the others, so the partials are the same bits as one call over every column."""
MAX_GROUPS = 10_000
"""Distinct group ids a per-group breakdown holds at most (K x outputs float64 partials each)."""


class StepBlocks(RowBlocks):
    """:class:`~oocmetrics.compute.RowBlocks` whose blocks read as (rows, prod(trailing)): every trailing
    position, e.g. each (step, output) of (rows, steps, outputs) data, is a column of its own.
    ``drop``: rows left out (losing copies of a sample id), as for RowBlocks."""

    def __init__(
        self, y_true: Any, y_pred: Any, rows: int, block_rows: int, *, drop: dict[int, np.ndarray] | None = None,
    ) -> None:
        super().__init__(y_true, y_pred, rows, block_rows, drop=drop)
        self.n_outputs = int(np.prod(tuple(y_true.shape[1:]), dtype=np.int64)) if y_true.ndim > 1 else 1


@njit(cache=True, nogil=True)
def _abs_error_histogram_into(tf, pf, out):
    """out[key] += 1 per finite pair, key = the top bits of float64 |t - p|; out[HIST_BINS]: |e| == 0."""
    one = np.empty(1)
    bits = one.view(np.uint64)
    shift = np.uint64(_SHIFT)
    for i in range(tf.size):
        t = np.float64(tf[i])
        p = np.float64(pf[i])
        if (t - t == 0.0) and (p - p == 0.0):
            a = abs(t - p)
            if a == 0.0:
                out[HIST_BINS] += 1
            else:
                one[0] = a
                out[np.int64(bits[0] >> shift)] += 1


def _wide_partials(t: np.ndarray, p: np.ndarray) -> np.ndarray:
    """:func:`~oocmetrics.compute.block_partials` of a (rows, columns) block, ``COLUMNS`` at a time."""
    C = t.shape[1]
    if C <= COLUMNS or t.size == 0:
        return block_partials(t, p)
    out = np.empty((K, C))
    for a in range(0, C, COLUMNS):
        out[:, a:a + COLUMNS] = chunk_partials(t[:, a:a + COLUMNS], p[:, a:a + COLUMNS])
    return out


def _group_rows(t: np.ndarray, p: np.ndarray, g: np.ndarray, J: int) -> dict[int, np.ndarray]:
    """Partials (K, J) of each group's rows of one block (rows kept in order within a group)."""
    uniq = np.unique(g)
    if uniq.size == 1:
        return {int(uniq[0]): block_partials(t.reshape(-1, J), p.reshape(-1, J))}
    order = np.argsort(g, kind="stable")
    starts = np.searchsorted(g[order], uniq)
    ends = np.append(starts[1:], g.size)
    ts, ps = t[order], p[order]
    return {int(u): block_partials(ts[a:b].reshape(-1, J), ps[a:b].reshape(-1, J))
            for u, a, b in zip(uniq, starts, ends)}


def _merge_groups(children: list[dict[int, np.ndarray]]) -> dict[int, np.ndarray]:
    """Union of per-group partials; a group in several children merges pairwise in child order."""
    keys = sorted({k for c in children for k in c})
    if len(keys) > MAX_GROUPS:
        raise ValueError(
            f"The groups array holds more than MAX_GROUPS={MAX_GROUPS} distinct ids ({len(keys)} so far); "
            f"a per-group breakdown of that many is not a table. Store coarser group ids."
        )
    return {k: tree_combine(np.stack([c[k] for c in children if k in c])) for k in keys}


def _block_task(
    blocks: StepBlocks, first: int, last: int, steps: bool, hist: bool, groups: Any, J: int,
) -> tuple[np.ndarray | None, np.ndarray | None, dict[int, np.ndarray] | None]:
    """Blocks [first, last): their step partials merged (the first level of the tree), their
    histogram and their per-group partials, from one read of each block."""
    stack = np.empty((last - first, K, blocks.n_outputs)) if steps else None
    counts = np.zeros(HIST_BINS + 1, np.int64) if hist else None
    per_block: list[dict[int, np.ndarray]] = []
    for i in range(first, last):
        t, p = blocks.read(i)  # (kept rows, steps * outputs) views of reused buffers
        if stack is not None:
            stack[i - first] = _wide_partials(t, p)
        if counts is not None:
            _abs_error_histogram_into(t.reshape(-1), p.reshape(-1), counts)
        if groups is not None:
            lo = i * blocks.block_rows
            g = np.asarray(groups[lo:min(blocks.rows, lo + blocks.block_rows)], dtype=np.int64)
            gone = blocks.drop.get(i)
            per_block.append(_group_rows(t, p, g if gone is None else np.delete(g, gone), J))
    return (
        tree_combine(stack) if stack is not None else None,
        counts,
        _merge_groups(per_block) if groups is not None else None,
    )


def _merge_node(*children: tuple[Any, Any, Any]) -> tuple[Any, Any, Any]:
    """One node of the merge tree: partials as :func:`merge_tree` merges a group, counts summed."""
    parts = [c[0] for c in children]
    hists = [c[1] for c in children]
    groups = [c[2] for c in children]
    total = None
    if hists[0] is not None:
        total = hists[0].copy()
        for h in hists[1:]:
            total += h
    return (
        tree_combine(np.stack(parts)) if parts[0] is not None else None,
        total,
        _merge_groups(groups) if groups[0] is not None else None,
    )


def _tree(level: list[Any], split_every: int) -> Any:
    """:func:`~oocmetrics.compute.merge_tree`'s tree over delayed nodes: ``split_every`` at a time."""
    while len(level) > 1:
        level = [dask.delayed(_merge_node, pure=False)(*level[i:i + split_every])
                 for i in range(0, len(level), split_every)]
    return level[0]


def _one_pass(
    shards: list[tuple[StepBlocks | None, Any]], *, n_columns: int, steps: bool, hist: bool, groups: bool,
    J: int, split_every: int, scheduler: Any, progress: bool,
) -> tuple[Any, Any, Any]:
    """Read every block of every shard once. Partials merge as ``compute_stored`` merges them: each
    shard's blocks in :func:`~oocmetrics.compute.merge_tree`'s tree, then the shards in shard order,
    all as one dask graph (each node frees its children: memory does not grow with the blocks)."""
    if isinstance(split_every, bool) or not isinstance(split_every, int) or split_every < 2:
        raise ValueError(f"split_every={split_every!r}; expected an int >= 2.")
    roots = []
    for blocks, group_arr in shards:
        if blocks is None:  # a shard with no rows: the identity, as compute_stored merges it
            roots.append((empty_partials(n_columns) if steps else None,
                          np.zeros(HIST_BINS + 1, np.int64) if hist else None, {} if groups else None))
            continue
        roots.append(_tree([
            dask.delayed(_block_task, pure=False)(
                blocks, a, min(a + split_every, blocks.n_blocks), steps, hist, group_arr if groups else None, J)
            for a in range(0, blocks.n_blocks, split_every)
        ], split_every))
    graph = _tree(roots, split_every) if len(roots) > 1 else roots[0]
    if progress:
        from dask.diagnostics import ProgressBar

        with ProgressBar(minimum=1.0):
            (out,) = dask.compute(graph, scheduler=scheduler)
    else:
        (out,) = dask.compute(graph, scheduler=scheduler)
    return out


def _histogram_result(counts: np.ndarray) -> dict[str, Any]:
    """The grid trimmed to its non-empty range: edges (B+1,), counts (B,), and the counts kept apart."""
    zero, inf = int(counts[HIST_BINS]), int(counts[_INF_KEY])
    grid = counts[:_INF_KEY]
    used = np.flatnonzero(grid)
    lo, hi = (int(used[0]), int(used[-1]) + 1) if used.size else (0, 0)
    keys = np.arange(lo, hi + 1 if used.size else 0, dtype=np.uint64)
    return {
        "edges": (keys << np.uint64(_SHIFT)).view(np.float64),
        "counts": grid[lo:hi].copy(),
        "zero": zero,  # pairs with |e| == 0 exactly (no place on a log axis)
        "inf": inf,    # finite pairs whose difference overflowed float64
        "n": int(grid.sum()) + zero + inf,
        "bins_per_octave": 1 << HIST_SUB_BITS,
    }


def _step_result(P: np.ndarray, names: tuple[str, ...], rows: int, S: int, J: int) -> dict[str, Any]:
    """per_step (S, J), per_step_overall (S,) and per_step_pooled (S,) from merged (K, S * J) partials."""
    flat = finalize(P, names, n_rows=rows)
    per_step = {k: np.asarray(v).reshape(S, J) for k, v in flat.per_output.items()}
    overall = {name: np.empty(S) for name in names}
    for s in range(S):
        res = finalize(np.ascontiguousarray(P[:, s * J:(s + 1) * J]), names, n_rows=rows)
        for name in names:
            overall[name][s] = res.overall[name]
    Q = P.reshape(K, S, J)
    n = Q[N].sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        mse = Q[SSE].sum(axis=1) / n
        mae = Q[SAE].sum(axis=1) / n
    pooled = {
        "n": n.astype(np.int64), "mse": mse, "rmse": np.sqrt(mse), "mae": mae,
        "max_error": np.where(n > 0, Q[MAX_AE].max(axis=1), np.nan),
    }
    return {"per_step": per_step, "per_step_overall": overall, "per_step_pooled": pooled}


def _group_result(parts: dict[int, np.ndarray], names: tuple[str, ...], per_row: int) -> dict[str, Any]:
    """Metrics of each group from its merged partials (K, J)."""
    ids = sorted(parts)
    results = [finalize(parts[g], names, n_rows=int((parts[g][N, 0] + parts[g][SKIPPED, 0]) // per_row))
               for g in ids]
    return {
        "groups": np.asarray(ids, dtype=np.int64),
        "rows": np.asarray([r.n_rows for r in results], dtype=np.int64),
        "overall": {name: np.asarray([r.overall[name] for r in results]) for name in names},
        "per_output": {k: np.stack([r.per_output[k] for r in results]) if results else np.zeros((0, 0))
                       for k in (results[0].per_output if results else {})},
    }


def _decomposable(metrics: Iterable[str] | str | None) -> tuple[str, ...]:
    names = resolve_metrics(metrics)
    order = order_statistics_needed(names)
    if order:
        raise ValueError(
            f"{list(order)} are order statistics (extra passes per column); breakdowns cover the "
            f"decomposable metrics only: leave {list(order)} out of metrics=."
        )
    return names


def _open_shards(
    path: str | Path, split: str, epoch: int | None, groups: bool,
) -> tuple[list[tuple[StepBlocks | None, Any]], Any, tuple[int, ...], bool]:
    """The epoch's shards as ``[(StepBlocks or None, groups array or None)]`` with the losing copies of
    each sample id dropped (the rule of :mod:`oocmetrics.dedup`), the first shard's info, the trailing
    shape, and whether every shard is complete."""
    stored = open_stored_shards(path, split, epoch)
    info = stored[0].info
    where = f"epoch {info.epoch} of split {split!r} in {path}"
    live = [s for s in stored if s.info.rows > 0]
    if not live:
        raise StoreError(f"Epoch {info.epoch} of split {split!r} in {path} has no durable rows.")
    trailing = {tuple(s.y_true.shape[1:]) for s in live}
    if len(trailing) > 1:
        raise ValueError(f"The shards of {where} hold rows of different shapes {sorted(trailing)}; they cannot be combined.")
    with_ids = [s for s in live if "ids" in s.labels]
    if with_ids and len(with_ids) != len(live):
        raise ValueError(f"Some shards of {where} store sample ids and some do not; record ids on every rank or on none.")
    if len(stored) > 1 and not with_ids:
        raise ValueError(f"{where} has {len(stored)} shards recorded without sample ids: copies of a sample "
                         f"cannot be counted once. Record update(y_true, y_pred, ids=...).")
    ids = [np.asarray(s.labels["ids"][:s.info.rows], np.int64) if s.info.rows and "ids" in s.labels else None
           for s in stored]
    summaries = [None if x is None else summarize_ids(x) for x in ids]
    with_groups = groups and all("groups" in s.labels for s in live)
    out = []
    for k, s in enumerate(stored):
        if s.info.rows == 0:
            out.append((None, None))
            continue
        chunk_rows = int(s.y_true.chunks[0])
        drop = rows_by_block(plan_shard(ids[k], k, summaries)[1], chunk_rows) if ids[k] is not None else None
        g = s.labels.get("groups") if with_groups else None
        if g is not None and (g.ndim != 1 or g.shape[0] < s.info.rows):
            raise StoreError(
                f"{s.info.path / 'groups'} has shape {tuple(g.shape)}, expected ({s.info.rows},) or longer "
                f"(one group id per durable row); the epoch is damaged: record it again."
            )
        out.append((StepBlocks(s.y_true, s.y_pred, s.info.rows, chunk_rows, drop=drop), g))
    return out, info, next(iter(trailing)), all(s.info.complete for s in stored)


def analyze(
    path: str | Path, split: str, epoch: int | None = None, *, metrics: Iterable[str] | None = None,
    steps: bool | None = None, histogram: bool = True, groups: bool = True,
    split_every: int = SPLIT_EVERY, scheduler: Any = None, progress: bool = False,
) -> dict[str, Any]:
    """Per-step metrics, the |error| histogram and per-group metrics of a stored epoch, in one pass.

    The rows are those ``compute_stored`` counts: every durable row of every shard (DDP rank), each
    sample id once. ``steps``: None computes the per-step breakdown when the data are (rows, steps,
    outputs) and skips it otherwise; True requires it (ValueError for other shapes). ``groups``:
    per-group metrics if the epoch stores a ``groups`` array (else ``"per_group": None``).

    Returns ``{"split", "epoch", "n_rows", "shape", "metrics", "complete"}`` plus, as computed,
    ``"steps", "outputs", "per_step", "per_step_overall", "per_step_pooled"`` (see :func:`per_step`),
    ``"abs_error_histogram"`` (see :func:`error_histogram`) and ``"per_group"`` (see :func:`per_group`).
    Values are NumPy arrays; :func:`to_json` makes the dict strict JSON.
    """
    names = _decomposable(metrics)
    shards, info, trailing, complete = _open_shards(path, split, epoch, groups)
    n_rows = sum(b.kept_rows for b, _ in shards if b is not None)
    shape = (n_rows, *trailing)
    if steps is None:
        steps = len(shape) == 3
    if steps and len(shape) != 3:
        raise ValueError(
            f"A per-step breakdown needs data of shape (rows, steps, outputs), but epoch {info.epoch} of split "
            f"{split!r} in {path} holds {shape}: no step axis. Use `python -m oocmetrics compute` for "
            f"per-output metrics."
        )
    J = int(shape[-1]) if len(shape) > 1 else 1
    per_row = int(np.prod(shape[1:-1], dtype=np.int64)) if len(shape) > 2 else 1
    has_groups = groups and any(g is not None for _, g in shards)
    P, counts, gparts = _one_pass(
        shards, n_columns=J * per_row, steps=bool(steps), hist=histogram, groups=has_groups, J=J,
        split_every=split_every, scheduler=scheduler, progress=progress,
    )
    out: dict[str, Any] = {
        "split": split, "epoch": info.epoch, "n_rows": n_rows, "shape": list(shape), "metrics": list(names),
        "complete": complete,
    }
    if steps:
        S = int(shape[1])
        out.update({"steps": S, "outputs": J, **_step_result(P, names, n_rows, S, J)})
    if histogram:
        out["abs_error_histogram"] = _histogram_result(counts)
    if groups:
        out["per_group"] = _group_result(gparts, names, per_row) if has_groups else None
    return out


def per_step(
    path: str | Path, split: str, epoch: int | None = None, *, metrics: Iterable[str] | None = None,
    histogram: bool = True, scheduler: Any = None, progress: bool = False, split_every: int = SPLIT_EVERY,
) -> dict[str, Any]:
    """Every decomposable metric per (step, output) of a stored (rows, steps, outputs) epoch, exactly,
    in one pass over the data (default epoch: the last).

    Returns ``{"steps": S, "outputs": J, "per_step": {key: (S, J)}, "per_step_overall": {metric: (S,)},
    "per_step_pooled": {"n", "mse", "rmse", "mae", "max_error": (S,)}, "abs_error_histogram": ...}``
    plus ``split, epoch, n_rows, shape, metrics``. ``per_step`` is keyed like
    ``EpochMetrics.per_output`` and ``per_step_overall`` like ``EpochMetrics.overall``: the same rule
    over the outputs of one step (the uniform mean; max for ``max_error``; variance-weighted for
    ``r2_variance_weighted``). ``per_step_pooled``: all outputs of a step as one set of values
    (e.g. rmse = sqrt(sum of squared errors / count)). ValueError for data without a step axis.
    """
    return analyze(path, split, epoch, metrics=metrics, steps=True, histogram=histogram, groups=False,
                   split_every=split_every, scheduler=scheduler, progress=progress)


def per_group(
    path: str | Path, split: str, epoch: int | None = None, *, metrics: Iterable[str] | None = None,
    scheduler: Any = None, progress: bool = False, split_every: int = SPLIT_EVERY,
) -> dict[str, Any] | None:
    """Every decomposable metric of each group of rows (the epoch's ``groups`` array), exactly, in one
    pass; None if the epoch stores no groups.

    Returns ``{"groups": (G,) ids ascending, "rows": (G,), "overall": {metric: (G,)},
    "per_output": {key: (G, J)}}``: row g is what :func:`oocmetrics.compute_stored` would give for the
    rows of group ``groups[g]`` alone.
    """
    return analyze(path, split, epoch, metrics=metrics, steps=False, histogram=False, groups=True,
                   split_every=split_every, scheduler=scheduler, progress=progress)["per_group"]


def error_histogram(
    path: str | Path, split: str, epoch: int | None = None, *, scheduler: Any = None, progress: bool = False,
) -> dict[str, Any]:
    """Log-spaced histogram of |y_true - y_pred| over every finite pair of a stored epoch, one pass.

    Returns ``{"edges": (B+1,) float64, "counts": (B,) int64, "zero", "inf", "n", "bins_per_octave"}``:
    ``counts[b]`` values lie in [edges[b], edges[b+1]); the bins are the non-empty range of a fixed
    grid of ``2**HIST_SUB_BITS`` bins per octave. ``zero``: pairs with |e| == 0; ``inf``: finite pairs
    whose difference overflowed; ``n``: all finite pairs (``EpochMetrics.n_values``).
    """
    return analyze(path, split, epoch, steps=False, histogram=True, groups=False,
                   scheduler=scheduler, progress=progress)["abs_error_histogram"]


def _json_value(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    if isinstance(v, np.ndarray):
        return _json_value(v.tolist())
    if isinstance(v, (np.integer, np.bool_)):
        return v.item()
    if isinstance(v, (float, np.floating)):
        f = float(v)
        if math.isnan(f):
            return None
        return ("inf" if f > 0 else "-inf") if math.isinf(f) else f
    return v


def to_json(result: dict[str, Any]) -> dict[str, Any]:
    """A breakdown as strict JSON (``json.dumps(..., allow_nan=False)`` works): arrays become lists,
    NaN becomes None and +-inf the strings "inf" / "-inf", as ``EpochMetrics.to_dict`` writes them."""
    return _json_value(result)


def cli_by_step(args: Any) -> int:
    """``python -m oocmetrics compute STORE --by step|group``: the per-step or per-group breakdown as
    JSON (stdout, or ``--json`` with a one-line summary)."""
    by = getattr(args, "by", "step")
    if getattr(args, "quantiles", None):
        raise ValueError(f"--quantiles is not available with --by {by} (quantiles are per output); drop one of them.")
    if getattr(args, "source", "auto") == "partials":
        raise ValueError(f"--by {by} reads the data (stored partials are per chunk and output); "
                         f"drop --source partials.")
    from oocmetrics.__main__ import _scheduler  # --scheduler: local threads or a dask.distributed address

    with _scheduler(getattr(args, "scheduler", None)) as scheduler:
        if by == "group":
            result = per_group(args.path, args.split, args.epoch, metrics=args.metrics, progress=args.progress,
                               scheduler=scheduler)
            if result is None:
                raise ValueError(
                    f"--by group: epoch {args.epoch if args.epoch is not None else '(last)'} of split "
                    f"{args.split!r} stores no groups; record them with update(y_true, y_pred, groups=...)."
                )
        else:
            result = per_step(args.path, args.split, args.epoch, metrics=args.metrics, progress=args.progress,
                              scheduler=scheduler)
    text = json.dumps(to_json(result), allow_nan=False)
    if not args.json:
        print(text)
        return 0
    Path(args.json).write_text(text)
    if by == "group":
        print(f"{args.path} {args.split}: {len(result['groups'])} groups, rows per group from "
              f"{int(np.min(result['rows']))} to {int(np.max(result['rows']))}")
        print(f"wrote {args.json}")
        return 0
    rmse = result["per_step_pooled"]["rmse"]
    ok = np.flatnonzero(~np.isnan(rmse))
    where = ""
    if ok.size:
        lo, hi = ok[np.argmin(rmse[ok])], ok[np.argmax(rmse[ok])]
        where = f"; pooled rmse from {rmse[lo]:.6g} (step {lo}) to {rmse[hi]:.6g} (step {hi})"
    print(f"{args.path} {result['split']} epoch {result['epoch']}: {result['n_rows']} rows x "
          f"{result['steps']} steps x {result['outputs']} outputs{where}")
    print(f"wrote {args.json}")
    return 0
