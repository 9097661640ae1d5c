"""Exact order statistics of |y_true - y_pred| by radix select over float64 bit patterns.

For non-negative floats the uint64 bit pattern is ordered like the value, so the k-th smallest |e| can
be found digit by digit: a pass builds a 65,536-bin histogram of the next 16 bits among the values
that share the digits found so far, and the cumulative count picks the next digit. Histograms merge by
addition, so each pass is one chunked reduction. Once few candidates remain (``GATHER_MAX`` in all),
one last pass gathers them and a sort finishes. On continuous data that is 1 or 2 histogram passes + 1
gather pass; heavily tied data may need up to 4 histogram passes and then needs no gather (all 64 bits
known).

Queries and targets. Every wanted order statistic is a *query* (owner, rank): owner ``j < J`` is
output j, owner ``J`` is the *pooled* set of all values of all outputs (one extra "output" row, so
pooled ranks share the same passes). Queries whose digits found so far agree share one histogram row,
a *target* (owner, prefix): level 0 has one target per owner whatever the number of ranks, and later
levels only as many as distinct prefixes. Targets are sorted by owner; ``starts[o]:starts[o + 1]`` are
owner o's targets (CSR), and a value matches at most one target of its output and one pooled target.

Histograms are accumulated *in place* (``out += counts``), so one array can fold any number of
chunks: memory is a few (targets, 65,536) arrays whatever the number of chunks (see
:func:`oocmetrics.compute.abs_error_order_statistics`).

|e| is taken in float64 (exact for float32 inputs); pairs where y_true or y_pred is not finite are
left out, as in every other metric. A finite pair whose |e| overflows to +inf is kept (it is counted
in ``n`` by the partials too) and orders last.
"""
from __future__ import annotations

import numpy as np

from oocmetrics._numba import njit

DIGIT_BITS = 16  # digit width when the histograms fit the memory budget (narrower digits otherwise)
BINS = 1 << DIGIT_BITS
LEVELS = 64 // DIGIT_BITS
MIN_DIGIT_BITS = 6
GATHER_MAX = 1 << 20  # candidates gathered in RAM at most, over all targets (16 MiB of value + index)
_BLOCK = 8192


@njit(cache=True, nogil=True)
def _abs_err_keys(tf, pf, lo, hi, vals):
    """|e| of elements [lo, hi) into vals[:hi-lo] as float64; NaN for a non-finite pair."""
    for i in range(hi - lo):
        t = np.float64(tf[lo + i])
        p = np.float64(pf[lo + i])
        if (t - t == 0.0) and (p - p == 0.0):
            vals[i] = abs(t - p)
        else:
            vals[i] = np.nan


@njit(cache=True, nogil=True)
def _histogram(tf, pf, J, shift, width, starts, tprefix, out):
    """out[k, digit] += 1 for each finite |e| whose bits above ``shift + width`` equal tprefix[k], for
    the targets k of its output (starts[j]:starts[j+1]) and the pooled targets (starts[J]:starts[J+1]);
    digit: the ``width`` bits of the key from bit ``shift`` up."""
    vals = np.empty(_BLOCK * J)
    keys = vals.view(np.uint64)
    size = tf.size
    top = shift + width
    mask = np.uint64((1 << width) - 1)
    p0, p1 = starts[J], starts[J + 1]
    for lo in range(0, size, _BLOCK * J):
        hi = min(size, lo + _BLOCK * J)
        _abs_err_keys(tf, pf, lo, hi, vals)
        j = 0  # lo is a multiple of J
        for i in range(hi - lo):
            v = vals[i]
            jj = j
            j += 1
            if j == J:
                j = 0
            if v != v:  # a non-finite pair
                continue
            key = keys[i]
            digit = (key >> np.uint64(shift)) & mask
            head = np.uint64(0) if top >= 64 else key >> np.uint64(top)
            for k in range(starts[jj], starts[jj + 1]):
                if tprefix[k] == head:
                    out[k, digit] += 1
                    break
            for k in range(p0, p1):
                if tprefix[k] == head:
                    out[k, digit] += 1
                    break


@njit(cache=True, nogil=True)
def _gather(tf, pf, J, shift, starts, tprefix):
    """Values |e| whose bits above ``shift`` equal a target's prefix: (values, target index) arrays."""
    vals = np.empty(_BLOCK * J)
    keys = vals.view(np.uint64)
    size = tf.size
    out_v = np.empty(1024)
    out_i = np.empty(1024, np.int64)
    m = 0
    p0, p1 = starts[J], starts[J + 1]
    for lo in range(0, size, _BLOCK * J):
        hi = min(size, lo + _BLOCK * J)
        _abs_err_keys(tf, pf, lo, hi, vals)
        j = 0
        for i in range(hi - lo):
            v = vals[i]
            jj = j
            j += 1
            if j == J:
                j = 0
            if v != v:
                continue
            head = keys[i] >> np.uint64(shift)
            for pooled in range(2):
                a, b = (starts[jj], starts[jj + 1]) if pooled == 0 else (p0, p1)
                for k in range(a, b):
                    if tprefix[k] == head:
                        if m == out_v.size:
                            out_v = np.concatenate((out_v, np.empty(out_v.size)))
                            out_i = np.concatenate((out_i, np.empty(out_i.size, np.int64)))
                        out_v[m] = v
                        out_i[m] = k
                        m += 1
                        break
    return out_v[:m].copy(), out_i[:m].copy()


def _flat2(t: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    def flat(x: np.ndarray) -> np.ndarray:
        if x.dtype not in (np.float32, np.float64):
            x = x.astype(np.float32)  # float16 and narrower: exact in float32
        return np.ascontiguousarray(x).reshape(-1)

    return flat(t), flat(p)


def histogram_into(
    t: np.ndarray, p: np.ndarray, J: int, bits: int, width: int, starts: np.ndarray, tprefix: np.ndarray,
    out: np.ndarray,
) -> None:
    """Add to ``out`` (targets, 2**width) int64 the counts of the ``width`` bits of |e| that follow the
    top ``bits`` bits (the targets' prefixes), over a (rows, J) chunk."""
    if t.size:
        tf, pf = _flat2(t, p)
        _histogram(tf, pf, J, 64 - bits - width, width, starts, tprefix, out)


def gather_chunk(
    t: np.ndarray, p: np.ndarray, J: int, bits: int, starts: np.ndarray, tprefix: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Candidates |e| of a (rows, J) chunk whose top ``bits`` bits equal a target's prefix, with its index."""
    if not t.size:
        return np.empty(0), np.empty(0, np.int64)
    tf, pf = _flat2(t, p)
    return _gather(tf, pf, J, 64 - bits, starts, tprefix)


def targets_of(owner: np.ndarray, prefix: np.ndarray, n_owners: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct (owner, prefix) pairs of the queries, sorted: (starts (n_owners + 1,), tprefix, target of each query)."""
    pairs = np.stack([owner.astype(np.uint64), prefix.astype(np.uint64)], axis=1)
    uniq, inverse = np.unique(pairs, axis=0, return_inverse=True)
    starts = np.searchsorted(uniq[:, 0], np.arange(n_owners + 1, dtype=np.uint64)).astype(np.int64)
    return starts, np.ascontiguousarray(uniq[:, 1]), inverse.reshape(-1).astype(np.int64)


def narrow(
    hist: np.ndarray, target: np.ndarray, prefix: np.ndarray, rank: np.ndarray, width: int = DIGIT_BITS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One radix step for every query from merged counts (targets, BINS): the next prefix, the rank
    within it and the count of its bucket. ``hist`` is overwritten with its cumulative sums."""
    cum = np.cumsum(hist, axis=1, out=hist)
    new_prefix = np.empty_like(prefix)
    new_rank = np.empty_like(rank)
    count = np.empty_like(rank)
    for q in range(rank.size):
        row = cum[target[q]]
        d = int(np.searchsorted(row, rank[q], side="right"))  # first bin whose cumulative count passes rank
        before = int(row[d - 1]) if d else 0
        new_prefix[q] = (np.uint64(prefix[q]) << np.uint64(width)) | np.uint64(d)
        new_rank[q] = rank[q] - before
        count[q] = int(row[d]) - before
    return new_prefix, new_rank, count


def key_to_value(key: np.ndarray) -> np.ndarray:
    """uint64 bit patterns back to float64 values."""
    return np.ascontiguousarray(key, dtype=np.uint64).view(np.float64)


def quantile_ranks(n: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NumPy's ``method="linear"`` positions for sample sizes ``n`` (...,) and quantiles ``q`` (Q,).

    Returns (lower rank, upper rank, gamma), each (Q, ...): exactly what ``np.quantile`` computes
    (virtual index ``(n - 1) * q``, both ranks ``n - 1`` at or past the end, gamma = index - lower,
    with the lower index as NumPy stores it, -1 at the end). Ranks are -1 where n == 0.
    """
    n = np.asarray(n, dtype=np.int64)
    q = np.asarray(q, dtype=np.float64).reshape((-1,) + (1,) * n.ndim)
    vi = (n - 1) * q  # int64 * float64 -> float64, as NumPy's (values_count - 1) * quantiles
    prev = np.floor(vi)
    nxt = prev + 1
    above = vi >= n - 1
    prev = np.where(above, -1.0, prev)
    nxt = np.where(above, -1.0, nxt)
    below = vi < 0
    prev = np.where(below, 0.0, prev)
    nxt = np.where(below, 0.0, nxt)
    prev_i = prev.astype(np.intp)
    nxt_i = nxt.astype(np.intp)
    gamma = vi - prev_i
    nn = np.broadcast_to(n, prev_i.shape)
    lo = np.where(prev_i < 0, prev_i + nn, prev_i)
    hi = np.where(nxt_i < 0, nxt_i + nn, nxt_i)
    lo = np.where(nn > 0, lo, -1)
    hi = np.where(nn > 0, hi, -1)
    return lo.astype(np.int64), hi.astype(np.int64), gamma


def lerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """NumPy's ``_lerp`` (numpy/lib/_function_base_impl.py), bit for bit: ``a + (b - a) * t``, and
    ``b - (b - a) * (1 - t)`` where ``t >= 0.5``."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    diff = np.subtract(b, a)
    out = np.add(a, diff * t)
    np.subtract(b, diff * (1 - t), out=out, where=t >= 0.5)
    return out
