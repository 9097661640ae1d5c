"""Confidence intervals for the decomposable metrics: a block bootstrap over per-chunk partials.

Method. An epoch's rows are cut into contiguous *blocks* (normally the stored chunks, whose partials
(:mod:`oocmetrics.kernels.moments`) were computed when each chunk was written). One bootstrap
replicate draws ``N`` blocks with replacement out of the ``N`` blocks (a non-overlapping block
bootstrap, Carlstein 1986: the moving-block bootstrap with one chunk per block), merges their
partials and finalizes the metrics exactly as :func:`~oocmetrics.metrics.finalize` does. A block
drawn ``w`` times enters as ``w`` copies: its extensive fields (n, m2_*, c_tp, sse, sae, skipped)
are scaled by ``w`` and the rest (means, max_ae, min_t, max_t) kept, which *is* the Chan merge of
``w`` identical copies; the scaled blocks are then merged with the engine's own Chan merge, in a
pairwise tree. So a replicate never reads data: with enough stored chunks the intervals cost no
pass over the data, only ``n_boot`` merges of ``N`` (K, J) arrays. Replicates are drawn from
``numpy.random.default_rng(seed)``: the same stack, seed and ``n_boot`` give the same bits.

Intervals: ``interval="percentile"`` (default) takes the ``(1 - level) / 2`` and ``(1 + level) / 2``
quantiles of the replicates (NumPy's linear rule). ``interval="bca"`` is Efron's bias-corrected and
accelerated interval: the bias correction comes from the share of replicates below the estimate and
the acceleration from a leave-one-block-out jackknife (computed from prefix and suffix merges of the
same partials, no data). BCa corrects the median bias and skew of nonlinear ratio statistics
(r2, rmse, pearson_r, nrmse); its second-order accuracy is a result for iid data, so with dependent
blocks treat it as a skew correction, not a guarantee. Both are reported per output and for each
metric's overall value (the uniform or variance-weighted mean over outputs, as ``finalize``).

Assumptions, and where they fail:
- Blocks stand for the population: the interval describes how the epoch's metric would vary if its
  blocks were drawn independently again from a population of such blocks. Dependence (autocorrelated,
  ordered rows: time series, frames of a video, windows of a sequence) is kept *within* a block but
  cut at block boundaries, so blocks must be much longer than the dependence; rows correlated across
  many chunks give intervals that are too narrow.
- Blocks must be exchangeable: if chunks differ systematically (data sorted by subject, site, date
  or label; a curriculum), each chunk is its own stratum and resampling chunks mixes strata that a
  new epoch would not mix: the interval is then not a sampling interval of anything. Shuffle the
  evaluation order, or compute intervals per stratum.
- Few blocks give narrow intervals: with N iid blocks the percentile interval behaves like a normal
  interval with an (N - 1)/N shrunk variance on N - 1 degrees of freedom, a nominal 95% covering
  about 90.4% at N = 10, 92.9% at N = 20, 94.2% at N = 50, 94.6% at N = 100. Hence the threshold
  :data:`MIN_BLOCKS` = 20: an epoch with fewer stored chunks makes ONE pass over the data instead,
  computing partials of :data:`FALLBACK_BLOCKS` (100) finer contiguous sub-blocks with the same
  kernel (``chunk_partials``), and bootstraps over those. Sub-blocks are shorter than chunks, so
  dependence longer than ``rows / 100`` rows is cut more often: lower ``fallback_blocks`` or record
  with smaller chunks if your rows are autocorrelated over long runs. Memory stays bounded: one chunk
  per reading thread and (blocks, K, J) float64 stacks; never the data.
- ``max_error`` is excluded (listed in ``"excluded"`` with the reason): a replicate's maximum can
  never exceed the observed one, and the observed maximum block is in ~63% of replicates, so the
  bootstrap distribution of a maximum is degenerate and says nothing about the population maximum
  (which, for unbounded errors, grows with the number of rows).
- ``nrmse`` divides by the range of y_true, an extreme statistic with the same problem; each replicate
  keeps the epoch's observed range as a fixed normaliser, so the nrmse interval is the rmse interval
  divided by that range (conditional on it).
- Order statistics (``median_absolute_error``) have no partials to resample and are refused.

Measured (``tests/test_intervals.py``, 200 simulated epochs each, nominal 95%): iid rows in 50
blocks: 92-95.5% (percentile), 91-95% (BCa) over mse, rmse, mae, r2, explained_variance, pearson_r,
overall and per output; AR(1) errors (phi = 0.8) in 50 blocks of 20 rows: 92-95.5%, where the iid
bootstrap over single rows covers 69-85%; 5 blocks of iid rows: 80-87%.

Every function returns a strict-JSON-ready dict (NaN as None, +-inf as "inf"/"-inf"), which
:attr:`oocmetrics.metrics.EpochMetrics.intervals` holds::

    res = oocmetrics.compute_stored("runs/exp1", "val")
    res.intervals = stored_intervals("runs/exp1", "val")
    res.intervals["overall"]["r2"]        # [low, high]
"""
from __future__ import annotations

import math
from pathlib import Path
from statistics import NormalDist
from typing import Any, Iterable, Literal

import dask
import numpy as np

from oocmetrics._numba import njit
from oocmetrics.compute import RowBlocks, usable_partials
from oocmetrics.errors import StoreError
from oocmetrics.kernels.moments import (
    C_TP, K, M2_E, M2_P, M2_T, MAX_T, MIN_T, N, SAE, SKIPPED, SSE, _merge, _tree, chunk_partials,
    tree_combine,
)
from oocmetrics.metrics import (
    _REGISTRY, _json_float, _max, _mean, _variance_weighted, finalize, resolve_metrics,
)
from oocmetrics.store import open_epoch_partials

__all__ = [
    "MIN_BLOCKS", "FALLBACK_BLOCKS", "EXCLUDED", "Interval",
    "weighted_merge", "bootstrap_replicates", "bootstrap_partials", "stored_intervals", "intervals_of_arrays",
]

MIN_BLOCKS = 20
"""Fewest stored chunks bootstrapped as they are; below it, one data pass makes finer sub-blocks."""
FALLBACK_BLOCKS = 100
"""Sub-blocks (contiguous row runs, about ``rows / 100`` rows each) of the fallback data pass."""
EXCLUDED: dict[str, str] = {
    "max_error": (
        "a bootstrap of a maximum is degenerate: no replicate exceeds the observed maximum, which "
        "recurs in ~63% of replicates, so the interval would not cover the population maximum"
    ),
}
"""Metrics left out of the intervals, with the reason (reported under ``"excluded"``)."""

Interval = Literal["percentile", "bca"]

_EXTENSIVE = np.array([N, M2_T, M2_P, C_TP, M2_E, SSE, SAE, SKIPPED], dtype=np.int64)
_BATCH_VALUES = 1 << 20  # block draws per batch of replicates (8 MiB per array); the batches depend on N only


# ------------------------------------------------------------------------------------------ kernels
@njit(cache=True, nogil=True)
def _resample_into(stack, counts, extensive, out):
    """out[b] = merge over blocks i of counts[b, i] copies of stack[i] (scaled, then a pairwise tree)."""
    nb, kk, J = stack.shape
    scratch = np.empty((nb, kk, J))
    for b in range(counts.shape[0]):
        m = 0
        for i in range(nb):
            w = counts[b, i]
            if w > 0.0:
                scratch[m] = stack[i]
                if w != 1.0:
                    for f in extensive:
                        for j in range(J):
                            scratch[m, f, j] *= w
                m += 1
        if m == 0:  # all weights zero: the partials of no data
            for f in range(kk):
                for j in range(J):
                    out[b, f, j] = 0.0
            for j in range(J):
                out[b, MIN_T, j] = np.inf
                out[b, MAX_T, j] = -np.inf
        else:
            out[b] = _tree(scratch[:m])


@njit(cache=True, nogil=True)
def _leave_one_out(stack):
    """(N, K, J): the merge of every block but block i, from prefix and suffix merges (O(N))."""
    nb, kk, J = stack.shape
    prefix = np.empty((nb + 1, kk, J))
    suffix = np.empty((nb + 1, kk, J))
    prefix[0] = 0.0
    suffix[nb] = 0.0
    for j in range(J):
        prefix[0, MIN_T, j] = np.inf
        prefix[0, MAX_T, j] = -np.inf
        suffix[nb, MIN_T, j] = np.inf
        suffix[nb, MAX_T, j] = -np.inf
    for i in range(nb):
        _merge(prefix[i], stack[i], prefix[i + 1])
    for i in range(nb - 1, -1, -1):
        _merge(stack[i], suffix[i + 1], suffix[i])
    out = np.empty((nb, kk, J))
    for i in range(nb):
        _merge(prefix[i], suffix[i + 1], out[i])
    return out


# --------------------------------------------------------------------------------------- validation
def _check_stack(stack: Any, name: str = "stack") -> np.ndarray:
    if not isinstance(stack, np.ndarray):
        raise TypeError(f"{name} is a {type(stack).__name__}; expected a NumPy array of partials (blocks, {K}, J).")
    if stack.ndim != 3 or stack.shape[1] != K or stack.shape[2] < 1:
        raise ValueError(
            f"Expected {name} to have shape (blocks, {K}, J) (per-block partials, see "
            f"oocmetrics.kernels.chunk_partials), but got {stack.shape}."
        )
    if stack.shape[0] < 2:
        raise ValueError(
            f"{name} holds {stack.shape[0]} block(s); a block bootstrap needs at least 2 (at least "
            f"{MIN_BLOCKS} for a usable interval). Cut the rows into more blocks."
        )
    return np.ascontiguousarray(stack, dtype=np.float64)


def _check_options(level: Any, n_boot: Any, seed: Any, interval: Any) -> None:
    if isinstance(level, bool) or not isinstance(level, (int, float, np.floating)) or not 0.0 < float(level) < 1.0:
        raise ValueError(f"level={level!r}; expected a number strictly between 0 and 1, e.g. 0.95.")
    if interval not in ("percentile", "bca"):
        raise ValueError(f"interval={interval!r}; expected 'percentile' or 'bca'.")
    _check_draws(n_boot, seed)


def _check_draws(n_boot: Any, seed: Any) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot={n_boot!r}; expected an int >= 1 (1000 or more for a 95% interval).")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r}; expected an int >= 0 (the same seed gives the same interval).")


def _check_metrics(metrics: Iterable[str] | str | None) -> tuple[tuple[str, ...], dict[str, str]]:
    """(names to bootstrap, {excluded name: reason}) of a selection; order statistics are refused."""
    names = resolve_metrics(metrics)
    order = [m for m in names if _REGISTRY[m].order_statistic]
    if order:
        raise ValueError(
            f"{order} are order statistics: they have no per-chunk partials to resample. Ask intervals "
            f"of decomposable metrics only, e.g. metrics=None for {[m for m in names if m not in order] or 'all'}."
        )
    excluded = {m: EXCLUDED[m] for m in names if m in EXCLUDED}
    return tuple(m for m in names if m not in EXCLUDED), excluded


def _check_int(value: Any, name: str, low: int, example: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name}={value!r}; expected an int >= {low}, e.g. {example}.")
    return int(value)


# ------------------------------------------------------------------------------------------- core
def weighted_merge(stack: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Merged partials of ``counts[i]`` copies of each block ``stack[i]`` (stack: (N, K, J)).

    ``counts`` (N,) gives one (K, J) result; (B, N) gives (B, K, J), one per row. Integer counts are
    exact copies (equal to ``tree_combine`` of the repeated blocks up to rounding); other non-negative
    values act as frequency weights.
    """
    if not isinstance(stack, np.ndarray) or stack.ndim != 3 or stack.shape[1] != K:
        raise ValueError(f"Expected stack to have shape (blocks, {K}, J), but got {np.shape(stack)}.")
    c = np.asarray(counts, dtype=np.float64)
    single = c.ndim == 1
    c2 = c[None] if single else c
    if c2.ndim != 2 or c2.shape[1] != stack.shape[0]:
        raise ValueError(
            f"Expected counts of shape ({stack.shape[0]},) or (B, {stack.shape[0]}) for {stack.shape[0]} "
            f"blocks, but got {c.shape}."
        )
    if not np.all(np.isfinite(c2) & (c2 >= 0)):
        raise ValueError("counts must be finite and >= 0 (how many copies of each block to merge).")
    out = np.empty((c2.shape[0], K, stack.shape[2]))
    _resample_into(np.ascontiguousarray(stack, dtype=np.float64), np.ascontiguousarray(c2), _EXTENSIVE, out)
    return out[0] if single else out


def _draw_counts(rng: np.random.Generator, n_blocks: int, n_rep: int) -> np.ndarray:
    """(n_rep, n_blocks) float64: how often each block is drawn in each replicate (N draws each)."""
    idx = rng.integers(0, n_blocks, size=(n_rep, n_blocks))
    flat = (idx + np.arange(n_rep)[:, None] * n_blocks).ravel()
    return np.bincount(flat, minlength=n_rep * n_blocks).reshape(n_rep, n_blocks).astype(np.float64)


def _replicate_values(
    stack: np.ndarray, names: tuple[str, ...], n_boot: int, seed: int,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Metric values of ``n_boot`` bootstrap replicates of the blocks of ``stack``, drawn and merged in
    batches whose size depends on the number of blocks only (so the bits depend on the seed only)."""
    nb, _, J = stack.shape
    rng = np.random.default_rng(seed)
    batch = max(1, _BATCH_VALUES // nb)
    overall: list[dict[str, np.ndarray]] = []
    per: list[dict[str, np.ndarray]] = []
    for lo in range(0, n_boot, batch):
        reps = np.empty((min(n_boot, lo + batch) - lo, K, J))
        _resample_into(stack, _draw_counts(rng, nb, reps.shape[0]), _EXTENSIVE, reps)
        _fix_range(reps, stack)
        o, p = _metric_values(reps, names)
        overall.append(o)
        per.append(p)
    return ({m: np.concatenate([o[m] for o in overall]) for m in overall[0]},
            {k: np.concatenate([p[k] for p in per]) for k in per[0]})


def _metric_values(P: np.ndarray, names: tuple[str, ...]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """finalize() of many partials at once: P (B, K, J) -> ({name: (B,)}, {per-output key: (B, J)})."""
    Pk = np.moveaxis(P, 1, 0)  # (K, B, J): every per-output rule is elementwise in the fields
    overall: dict[str, np.ndarray] = {}
    per: dict[str, np.ndarray] = {}
    with np.errstate(all="ignore"):
        for name in names:
            spec = _REGISTRY[name]
            key = spec.per_output_key
            if key not in per:
                per[key] = np.asarray(spec.per_output(Pk), dtype=np.float64).reshape(P.shape[0], P.shape[2])
            v = per[key]
            if spec.overall is _mean:
                overall[name] = np.mean(v, axis=-1)
            elif spec.overall is _max:
                overall[name] = np.max(v, axis=-1)
            elif spec.overall is _variance_weighted:
                w = Pk[M2_T]
                weighted = np.multiply(v, w).sum(axis=-1) / w.sum(axis=-1)
                overall[name] = np.where(np.any(w != 0.0, axis=-1), weighted, np.mean(v, axis=-1))
            else:  # a rule added later: call it row by row
                overall[name] = np.array([spec.overall(v[b], P[b]) for b in range(P.shape[0])])
    return overall, per


def bootstrap_replicates(
    stack: np.ndarray, metrics: Iterable[str] | str | None = None, *, n_boot: int = 1000, seed: int = 0,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The bootstrap distribution itself: ``({metric: (n_boot,)}, {per-output key: (n_boot, J)})``.

    Each replicate resamples the N blocks of ``stack`` (N, K, J) with replacement and finalizes the
    merged partials as :func:`~oocmetrics.metrics.finalize` would (nrmse keeps the full-stack range
    of y_true as its normaliser). ``max_error`` is computed if named (its distribution is degenerate:
    see the module docstring). Seeded and deterministic.
    """
    names = resolve_metrics(metrics)
    if any(_REGISTRY[m].order_statistic for m in names):
        raise ValueError(f"{names}: order statistics have no partials to resample; pass decomposable metrics.")
    _check_draws(n_boot, seed)
    return _replicate_values(_check_stack(stack), names, int(n_boot), int(seed))


def _fix_range(reps: np.ndarray, stack: np.ndarray) -> None:
    """Hold nrmse's normaliser at the full stack's observed range of y_true in every replicate."""
    with np.errstate(all="ignore"):
        reps[:, MIN_T] = np.min(stack[:, MIN_T], axis=0)
        reps[:, MAX_T] = np.max(stack[:, MAX_T], axis=0)


def _sorted_quantiles(sorted_reps: np.ndarray, defined: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Per column c, NumPy's linear-rule quantile q[c] of the first defined[c] rows of sorted_reps."""
    C = sorted_reps.shape[1]
    ok = (defined > 0) & np.isfinite(q)
    pos = np.where(ok, q, 0.0) * np.maximum(defined - 1, 0)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, np.maximum(defined - 1, 0))
    cols = np.arange(C)
    a = sorted_reps[np.clip(lo, 0, None), cols]
    b = sorted_reps[np.clip(hi, 0, None), cols]
    g = pos - lo
    with np.errstate(all="ignore"):
        out = np.where(g == 0.0, a, a + (b - a) * g)  # no inf - inf when both ends are the same inf
    return np.where(ok, out, np.nan)


def _bca_levels(reps: np.ndarray, est: np.ndarray, jack: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """BCa's adjusted quantile levels (a1, a2) per column; NaN where it is undefined."""
    nd = NormalDist()
    z_lo, z_hi = nd.inv_cdf((1 - level) / 2), nd.inv_cdf((1 + level) / 2)
    a1 = np.full(est.shape, np.nan)
    a2 = np.full(est.shape, np.nan)
    with np.errstate(all="ignore"):
        for c in range(est.size):
            r = reps[:, c]
            r = r[~np.isnan(r)]
            th = jack[:, c]
            if r.size == 0 or np.isnan(est[c]) or np.isnan(th).any() or not np.isfinite(th).all():
                continue
            share = (np.sum(r < est[c]) + 0.5 * np.sum(r == est[c])) / r.size
            if not 0.0 < share < 1.0:
                continue  # every replicate on one side of the estimate: the bias correction is infinite
            z0 = nd.inv_cdf(float(share))
            d = th.mean() - th
            ss = float(np.sum(d * d))
            acc = float(np.sum(d ** 3)) / (6.0 * ss ** 1.5) if ss > 0.0 else 0.0
            levels = []
            for z in (z_lo, z_hi):
                den = 1.0 - acc * (z0 + z)
                levels.append(nd.cdf(z0 + (z0 + z) / den) if den > 0.0 else math.nan)
            a1[c], a2[c] = levels
    return a1, a2


def _bootstrap(
    stack: np.ndarray, names: tuple[str, ...], excluded: dict[str, str], *, level: float, n_boot: int,
    seed: int, interval: str, method: str,
) -> dict[str, Any]:
    J = stack.shape[2]
    nb = stack.shape[0]
    point = finalize(tree_combine(stack), names, n_rows=0) if names else None
    result: dict[str, Any] = {
        "level": float(level), "interval": interval, "method": method, "n_boot": int(n_boot), "seed": int(seed),
        "blocks": int(nb), "estimate": {}, "overall": {}, "per_output": {}, "excluded": dict(excluded), "notes": [],
    }
    if not names:
        return result
    assert point is not None
    r_over, r_per = _replicate_values(stack, names, n_boot, seed)
    keys = list(r_per)
    # one matrix of columns: each metric's overall value, then each per-output key's J values
    R = np.concatenate([r_over[m][:, None] for m in names] + [r_per[k] for k in keys], axis=1)
    est = np.concatenate([[point.overall[m] for m in names]] + [np.asarray(point.per_output[k]) for k in keys])
    undefined = np.isnan(R).sum(axis=0)
    defined = n_boot - undefined
    S = np.sort(R, axis=0)  # NaN sorts last: the first defined[c] rows are the defined replicates
    if interval == "percentile":
        q_lo = np.full(est.shape, (1 - level) / 2)
        q_hi = np.full(est.shape, (1 + level) / 2)
    else:
        loo = _leave_one_out(stack)
        _fix_range(loo, stack)
        j_over, j_per = _metric_values(loo, names)
        jack = np.concatenate([j_over[m][:, None] for m in names] + [j_per[k] for k in keys], axis=1)
        q_lo, q_hi = _bca_levels(R, est, jack, level)
        n_bad = int(np.sum(np.isnan(q_lo) & ~np.isnan(est)))
        if n_bad:
            result["notes"].append(
                f"BCa is undefined for {n_bad} value(s) (every replicate on one side of the estimate, or an "
                f"undefined jackknife value): reported as null; interval='percentile' gives them."
            )
    low = _sorted_quantiles(S, defined, q_lo)
    high = _sorted_quantiles(S, defined, q_hi)
    low[np.isnan(est)] = np.nan
    high[np.isnan(est)] = np.nan

    for c, m in enumerate(names):
        result["estimate"][m] = _json_float(est[c])
        result["overall"][m] = [_json_float(low[c]), _json_float(high[c])]
    base = len(names)
    for i, k in enumerate(keys):
        sl = slice(base + i * J, base + (i + 1) * J)
        result["per_output"][k] = [[_json_float(x) for x in low[sl]], [_json_float(x) for x in high[sl]]]

    notes = result["notes"]
    if "nrmse" in names:
        notes.append("nrmse: every replicate divides by the epoch's observed range of y_true (held fixed).")
    if nb < MIN_BLOCKS:
        notes.append(
            f"only {nb} blocks (fewer than {MIN_BLOCKS}): intervals are too narrow (on iid data a nominal "
            f"95% percentile interval covers about 90% with 10 blocks, 85% with 5); use more, shorter blocks."
        )
    tail = n_boot * (1 - level) / 2
    if tail < 5:
        notes.append(f"n_boot={n_boot} leaves {tail:.1f} replicates beyond each end: the ends are noisy; use more.")
    if undefined.any():
        bad = {lab: int(u) for lab, u in zip(_labels(names, keys, J), undefined) if u}
        notes.append(f"replicates where a value is undefined (NaN), left out of its interval: {bad}")
    return result


def _labels(names: tuple[str, ...], keys: list[str], J: int) -> list[str]:
    return list(names) + [f"{k}[{j}]" for k in keys for j in range(J)]


def bootstrap_partials(
    stack: np.ndarray, metrics: Iterable[str] | str | None = None, *, level: float = 0.95,
    n_boot: int = 1000, seed: int = 0, interval: Interval = "percentile",
) -> dict[str, Any]:
    """Block-bootstrap intervals from per-block partials ``stack`` (N, K, J): no data needed.

    Returns ``{"level", "interval", "method", "n_boot", "seed", "blocks", "estimate": {metric: value},
    "overall": {metric: [low, high]}, "per_output": {key: [[low]*J, [high]*J]}, "excluded":
    {metric: reason}, "notes": [...]}``, strict-JSON ready. ``per_output`` is keyed as
    ``EpochMetrics.per_output`` (``r2_variance_weighted`` shares ``r2``).
    """
    _check_options(level, n_boot, seed, interval)
    names, excluded = _check_metrics(metrics)
    stack = _check_stack(stack)
    return _bootstrap(
        stack, names, excluded, level=float(level), n_boot=int(n_boot), seed=int(seed), interval=interval,
        method=f"block bootstrap over {stack.shape[0]} blocks",
    )


# ------------------------------------------------------------------------------- data sub-blocks
def _sub_block_partials(blocks: RowBlocks, sub_rows: int, per_row: int, scheduler: Any) -> np.ndarray:
    """One pass: partials (n, K, J) of runs of ``sub_rows`` rows inside each stored chunk, in row order."""

    def task(i: int) -> np.ndarray:
        t, p = blocks.read(i)  # (values, J): rows of the chunk times per_row values each
        rows = t.shape[0] // per_row
        runs = [slice(a * per_row, min(rows, a + sub_rows) * per_row) for a in range(0, rows, sub_rows)]
        return np.stack([chunk_partials(t[r], p[r]) for r in runs])

    parts = dask.compute(*[dask.delayed(task, pure=False)(i) for i in range(blocks.n_blocks)], scheduler=scheduler)
    return np.concatenate(parts, axis=0)


def stored_intervals(
    path: str | Path, split: str, epoch: int | None = None, *, metrics: Iterable[str] | None = None,
    level: float = 0.95, n_boot: int = 1000, seed: int = 0, interval: Interval = "percentile",
    min_blocks: int = MIN_BLOCKS, fallback_blocks: int = FALLBACK_BLOCKS, scheduler: Any = None,
) -> dict[str, Any]:
    """Block-bootstrap intervals of a stored epoch (default: the last) of ``split``.

    With at least ``min_blocks`` stored chunks whose partials cover the durable rows, the chunks are
    the blocks and no data is read. Otherwise one pass over the data computes partials of about
    ``fallback_blocks`` contiguous sub-blocks (each inside one chunk) and bootstraps those. The result
    is :func:`bootstrap_partials`'s dict plus ``"source"`` ("stored partials" or "data pass"),
    ``"block_rows"``, ``"epoch"`` and ``"split"``. ``"estimate"`` is ``compute_stored``'s value up to
    float64 rounding of the merge order. A DDP split's shards are resampled together, and sample ids
    count once, as in ``compute_stored``.
    """
    from oocmetrics.shards import block_stacks
    from oocmetrics.stored import open_stored_shards

    _check_options(level, n_boot, seed, interval)
    names, excluded = _check_metrics(metrics)
    min_blocks = _check_int(min_blocks, "min_blocks", 2, MIN_BLOCKS)
    fallback_blocks = _check_int(fallback_blocks, "fallback_blocks", 2, FALLBACK_BLOCKS)
    shards = open_stored_shards(path, split, epoch)
    info = shards[0].info
    rows = sum(s.info.rows for s in shards)
    where = f"Epoch {info.epoch} of split {split!r} in {path}"
    if rows == 0:
        raise StoreError(f"{where} has no durable rows.")
    if rows < 2:
        raise ValueError(
            f"{where} has {rows} row: a bootstrap needs at least 2 rows (blocks); record more rows."
        )
    chunk_rows = int(shards[0].y_true.chunks[0])
    trailing = tuple(shards[0].y_true.shape[1:])
    planned = block_stacks([s.as_shard() for s in shards], scheduler=scheduler)  # each sample id once
    n_chunks = sum(b.n_blocks for _, b in planned)
    kept = sum(b.kept_rows for _, b in planned)
    if all(stack is not None for stack, _ in planned) and n_chunks >= min_blocks:
        stack = np.concatenate([st for st, _ in planned])
        source, block_rows = "stored partials", chunk_rows
        method = f"block bootstrap over {n_chunks} stored chunks of {chunk_rows} rows (no pass over the data)"
    else:
        if n_chunks >= min_blocks:  # partials missing (an older store): the chunks, from the data
            block_rows = chunk_rows
        else:
            per_chunk = -(-fallback_blocks // n_chunks)  # sub-blocks per chunk
            block_rows = max(1, -(-min(chunk_rows, rows) // per_chunk))
        per_row = int(np.prod(trailing[:-1], dtype=np.int64)) if len(trailing) > 1 else 1
        stack = np.concatenate([_sub_block_partials(b, block_rows, per_row, scheduler) for _, b in planned])
        source = "data pass"
        why = (f"the epoch has {n_chunks} stored chunk(s), fewer than min_blocks={min_blocks}"
               if n_chunks < min_blocks else "its stored partials do not cover its rows")
        method = (f"block bootstrap over {stack.shape[0]} sub-blocks of up to {block_rows} contiguous rows, "
                  f"computed in one pass over the data ({why})")
    out = _bootstrap(
        stack, names, excluded, level=float(level), n_boot=int(n_boot), seed=int(seed), interval=interval,
        method=method,
    )
    out.update({"source": source, "block_rows": int(block_rows), "epoch": info.epoch, "split": split})
    if kept != rows:
        out["notes"].append(f"sample ids: {rows - kept} duplicate rows left out (each id counted once).")
    if len(shards) > 1:
        out["notes"].append(f"blocks of {len(shards)} DDP shards, resampled together.")
    return out


def intervals_of_arrays(
    y_true: Any, y_pred: Any, metrics: Iterable[str] | None = None, *, block_rows: int | None = None,
    level: float = 0.95, n_boot: int = 1000, seed: int = 0, interval: Interval = "percentile",
    nonfinite: Literal["raise", "skip"] = "raise",
) -> dict[str, Any]:
    """Block-bootstrap intervals of in-memory arrays (rows, *trailing): blocks of ``block_rows``
    contiguous rows (default: ``FALLBACK_BLOCKS`` blocks); see :func:`bootstrap_partials`."""
    from oocmetrics.validation import check_batch

    _check_options(level, n_boot, seed, interval)
    names, excluded = _check_metrics(metrics)
    if nonfinite not in ("raise", "skip"):
        raise ValueError(f"nonfinite={nonfinite!r}; expected 'raise' or 'skip'.")
    t, p = check_batch(y_true, y_pred, trailing=None, batch_index=0, row_offset=0, nonfinite=nonfinite)
    rows = t.shape[0]
    if rows < 2:
        raise ValueError(f"y_true has {rows} row(s); a bootstrap needs at least 2 rows (blocks).")
    if block_rows is None:
        block_rows = max(1, -(-rows // FALLBACK_BLOCKS))
    block_rows = _check_int(block_rows, "block_rows", 1, max(1, rows // FALLBACK_BLOCKS))
    if -(-rows // block_rows) < 2:
        raise ValueError(
            f"block_rows={block_rows} makes 1 block of the {rows} rows; a bootstrap needs at least 2 "
            f"(pass block_rows <= {rows // 2})."
        )
    stack = np.stack([chunk_partials(t[a:a + block_rows], p[a:a + block_rows]) for a in range(0, rows, block_rows)])
    return _bootstrap(
        stack, names, excluded, level=float(level), n_boot=int(n_boot), seed=int(seed), interval=interval,
        method=f"block bootstrap over {stack.shape[0]} blocks of {block_rows} contiguous rows",
    ) | {"block_rows": int(block_rows)}
