"""Exact order statistics of |y_true - y_pred| by radix select over float64 bit patterns.

For non-negative floats the uint64 bit pattern is ordered like the value, and its sign bit is 0, so
the k-th smallest |e| can be found digit by digit in a 63-bit *key*: a pass builds a histogram of the
next ``width`` bits (16 at most) among the values that share the digits found so far, and the
cumulative count picks the next digit. Histograms merge by addition, so each pass is one chunked
reduction. Once few candidates remain (``GATHER_MAX`` in all), one last pass gathers them and a sort
finishes. The pass plan (digit widths, when to gather) is in
:func:`oocmetrics.compute.select_order_statistics`.

Queries and targets. Every wanted order statistic is a *query* (owner, rank): owner ``j < J`` is
output j, owner ``J`` is the *pooled* set of all values of all outputs (one extra "output" row, so
pooled ranks share the same passes). Queries whose digits found so far agree share one histogram row,
a *target* (owner, prefix). Targets are sorted by owner; ``starts[o]:starts[o + 1]`` are owner o's
targets (CSR), and a value matches at most one target of its output and one pooled target.

Kernels. Every value costs one histogram increment. The first pass (no digit known) counts the top
digit of every value per *output* (:func:`owner_histogram_into`); the pooled row is the sum of the
output rows. Later passes (:func:`row_histogram_into`) count per (output, prefix) *row*, a row for
each of an output's own targets and for its share of each pooled target (the pooled rows are sums
again, :class:`RowPlan`); a value finds its row in a :class:`TargetTable` indexed by its output and
its key's top bits, without a branch (a value of no target is counted in a spare row). They also
record each row's smallest and largest key, so a bucket that holds copies of one value (heavy ties)
is resolved without more passes; and they can append the values of given digits of each row (the
second pass's likely buckets). When the table would be too large to be exact, a value is looked up
for its output's target and its pooled target in two stages (candidates without branches, then a
comparison for the few: :func:`histogram_into`). The gather pass (:func:`gather_chunk`) looks each
value up once, in the table of the rows, and compares the few candidates. Keys are computed into a
small buffer per block of rows (the loop vectorises), then counted. Histograms are accumulated *in
place* (``out += counts``), so one array per task folds any number of chunks. Every kernel releases
the GIL: tasks on threads run in parallel.

|e| is taken in float64 (exact for float32 inputs); pairs where y_true or y_pred is not finite are
left out, as in every other metric. A finite pair whose |e| overflows to +inf is kept (it is counted
in ``n`` by the partials too) and orders last.
"""
from __future__ import annotations

import numpy as np

from oocmetrics._numba import njit

KEY_BITS = 63  # |e| >= 0: the sign bit of its float64 pattern is always 0
DIGIT_BITS = 16  # widest digit (narrower when the histograms would not fit the memory budget)
BINS = 1 << DIGIT_BITS
MIN_DIGIT_BITS = 6
GATHER_MAX = 1 << 20  # candidates gathered in RAM at most, over all targets (8 MiB of key + 8 of index)
TABLE_MAX = 1 << 18  # entries of a TargetTable at most (1 MiB of int32)
_BUFFER = 4096  # keys computed per block of rows (32 KiB: stays in L1)
_INF_KEY = 0x7FF0000000000000  # the key of +inf; NaN keys are larger
_NO_VALUE = float(np.array([0xFFF8000000000000], np.uint64).view(np.float64)[0])  # -NaN: sign bit set


@njit(cache=True, nogil=True, inline="always")
def _keys_into(ts, ps, vals):
    """|e| of ts, ps (slices: indexing a slice from 0 lets the loop vectorise, 3.5x) into vals as
    float64; for a non-finite pair a NaN with the sign bit set, whose key is above every 63-bit key."""
    for i in range(ts.size):
        t = np.float64(ts[i])
        p = np.float64(ps[i])
        ok = (t - t == 0.0) & (p - p == 0.0)
        vals[i] = abs(t - p) if ok else _NO_VALUE


# numba notes, measured: index with unsigned integers (a signed index pays a negative-index check:
# -30%), and keep branches that depend on the data out of the loops over values (a mispredicted
# branch per value costs more than the work: the first lookup kernels were 4x slower).


@njit(cache=True, nogil=True)
def _owner_histogram(tf, pf, J, j0, j1, shift, out):
    """out[j - j0, key >> shift] += 1 for each finite |e| of the outputs j0 <= j < j1."""
    step = max(1, _BUFFER // J) * J
    vals = np.empty(step)
    keys = vals.view(np.uint64)
    counts = out.reshape(-1)
    B = np.uint64(out.shape[1])
    sh = np.uint64(shift)
    inf = np.uint64(_INF_KEY)
    for lo in range(0, tf.size, step):
        hi = min(tf.size, lo + step)
        _keys_into(tf[lo:hi], pf[lo:hi], vals)
        for r in range(0, hi - lo, J):
            for j in range(j0, j1):
                key = keys[np.uint64(r + j)]
                if key <= inf:
                    counts[np.uint64(j - j0) * B + (key >> sh)] += 1


@njit(cache=True, nogil=True)
def _fill_table(starts, tprefix, down, vmin, width, flat):
    for o in range(starts.size - 1):
        for k in range(starts[o + 1] - 1, starts[o] - 1, -1):  # backwards: the first target wins
            flat[o * width + np.int64((tprefix[k] >> down) - vmin)] = k


@njit(cache=True, nogil=True, inline="always")
def _slot(owner, key, vm, tsh, span, W):
    """Index in a TargetTable's ``flat`` of a key of ``owner``: the empty last column of the owner's
    row for a key out of the table's range (below ``vm`` the difference wraps to a huge number) or a
    non-finite pair's (its key's sign bit puts it above the range)."""
    idx = (key >> tsh) - vm
    return owner * W + (idx if idx < span else span)


@njit(cache=True, nogil=True)
def _row_histogram(tf, pf, J, flat, W, vmin, tshift, dshift, mask, dump, out, lo_key, hi_key, win, got_k, got_r, m):
    """out[row, digit] += 1 for each |e|, row = the table's entry for a value of output j: every
    value costs one increment, without branches (a value of no row goes to row ``dump``; only values
    of a row take the branch that updates lo_key/hi_key[row], the row's smallest/largest key).
    A value of a row whose digit is in one of the row's two windows ``win[row]`` = (first, length,
    first, length) is also appended to got_k/got_r (key, row) from position m; returns the new m, or
    -1 once they are full (nothing more is appended then)."""
    step = max(1, _BUFFER // J) * J
    vals = np.empty(step)
    keys = vals.view(np.uint64)
    vm, tsh, ds, mk = np.uint64(vmin), np.uint64(tshift), np.uint64(dshift), np.uint64(mask)
    uW, span = np.uint64(W), np.uint64(W - 1)
    B = np.uint64(out.shape[1])
    counts = out.reshape(-1)
    for lo in range(0, tf.size, step):
        hi = min(tf.size, lo + step)
        _keys_into(tf[lo:hi], pf[lo:hi], vals)
        for r in range(0, hi - lo, J):
            for j in range(J):
                key = keys[np.uint64(r + j)]
                row = np.uint64(flat[_slot(np.uint64(j), key, vm, tsh, span, uW)])
                d = (key >> ds) & mk
                counts[row * B + d] += 1
                if row != dump:
                    lo_key[row] = min(lo_key[row], key)
                    hi_key[row] = max(hi_key[row], key)
                    if (d - win[row, 0] < win[row, 1]) | (d - win[row, 2] < win[row, 3]):  # unsigned: d < first wraps
                        if m >= 0:
                            if m < got_k.size:
                                got_k[m] = key
                                got_r[m] = row
                                m += 1
                            else:
                                m = -1
    return m


@njit(cache=True, nogil=True, inline="always")
def _candidates(keys, J, pooled, flat, W, vm, tsh, cand_i, cand_k):
    """Stage 1, without branches: for each value (``keys`` holds whole rows), for its output and, if
    ``pooled``, for the pooled owner, the first target whose prefix has the key's top bits, appended
    to (position, target) only if there is one. Returns the count."""
    uW, span, uJ = np.uint64(W), np.uint64(W - 1), np.uint64(J)
    c = np.uint64(0)
    for r in range(0, keys.size, J):
        for j in range(J):
            i = np.uint64(r + j)
            key = keys[i]
            k = flat[_slot(np.uint64(j), key, vm, tsh, span, uW)]
            cand_i[c] = i
            cand_k[c] = k
            c += np.uint64(k >= 0)
            if pooled:
                k = flat[_slot(uJ, key, vm, tsh, span, uW)]
                cand_i[c] = i
                cand_k[c] = k
                c += np.uint64(k >= 0)
    return c


@njit(cache=True, nogil=True, inline="always")
def _match(tprefix, ends, k, head):
    """Stage 2: the target from k on (up to ``ends[k]``, the end of its owner's) whose prefix is
    ``head``, or -1 (an owner's prefixes are sorted)."""
    end = ends[k]
    while k < end and tprefix[k] <= head:
        if tprefix[k] == head:
            return k
        k += 1
    return -1


@njit(cache=True, nogil=True)
def _target_histogram(tf, pf, J, hshift, dshift, mask, pooled, ends, tprefix, flat, W, vmin, tshift, out, lo_key,
                      hi_key):
    """out[k, digit] += 1 for each finite |e| whose key >> hshift equals tprefix[k], for the targets k
    of its output and (if ``pooled``) the pooled targets; digit: the key's bits from ``dshift`` up,
    under ``mask``. lo_key/hi_key[k]: smallest/largest key seen."""
    step = max(1, _BUFFER // J) * J
    vals = np.empty(step)
    keys = vals.view(np.uint64)
    cand_i = np.empty(2 * step, np.uint64)
    cand_k = np.empty(2 * step, np.int64)
    hs, ds, mk = np.uint64(hshift), np.uint64(dshift), np.uint64(mask)
    vm, tsh = np.uint64(vmin), np.uint64(tshift)
    for lo in range(0, tf.size, step):
        hi = min(tf.size, lo + step)
        _keys_into(tf[lo:hi], pf[lo:hi], vals)
        c = _candidates(keys[:hi - lo], J, pooled, flat, W, vm, tsh, cand_i, cand_k)
        for e in range(c):
            key = keys[cand_i[e]]
            k = _match(tprefix, ends, cand_k[e], key >> hs)
            if k >= 0:
                out[k, (key >> ds) & mk] += 1
                lo_key[k] = min(lo_key[k], key)
                hi_key[k] = max(hi_key[k], key)


@njit(cache=True, nogil=True)
def _gather(tf, pf, J, hshift, pooled, ends, tprefix, flat, W, vmin, tshift):
    """Keys of the finite |e| whose key >> hshift equals a target's prefix: (keys, target index)."""
    step = max(1, _BUFFER // J) * J
    vals = np.empty(step)
    keys = vals.view(np.uint64)
    cand_i = np.empty(2 * step, np.uint64)
    cand_k = np.empty(2 * step, np.int64)
    hs = np.uint64(hshift)
    vm, tsh = np.uint64(vmin), np.uint64(tshift)
    out_k = np.empty(256, np.uint64)
    out_t = np.empty(256, np.int64)
    m = 0
    for lo in range(0, tf.size, step):
        hi = min(tf.size, lo + step)
        _keys_into(tf[lo:hi], pf[lo:hi], vals)
        c = _candidates(keys[:hi - lo], J, pooled, flat, W, vm, tsh, cand_i, cand_k)
        for e in range(c):
            key = keys[cand_i[e]]
            k = _match(tprefix, ends, cand_k[e], key >> hs)
            if k >= 0:
                if m == out_k.size:
                    grown_k = np.empty(2 * m, np.uint64)
                    grown_t = np.empty(2 * m, np.int64)
                    grown_k[:m] = out_k
                    grown_t[:m] = out_t
                    out_k, out_t = grown_k, grown_t
                out_k[m] = key
                out_t[m] = k
                m += 1
    return out_k[:m].copy(), out_t[:m].copy()


@njit(cache=True)
def _narrow(cum, rows, prefix, rank, width, new_prefix, new_rank, count):
    for q in range(rank.size):
        row = cum[rows[q]]
        r = rank[q]
        lo, hi = 0, row.size  # first bin whose cumulative count passes r
        while lo < hi:
            mid = (lo + hi) // 2
            if row[mid] > r:
                hi = mid
            else:
                lo = mid + 1
        if lo == row.size:
            raise ValueError("an order statistic's rank is past the number of values counted")
        before = row[lo - 1] if lo else 0
        new_prefix[q] = (prefix[q] << np.uint64(width)) | np.uint64(lo)
        new_rank[q] = r - before
        count[q] = row[lo] - before


def _flat2(t: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    def flat(x: np.ndarray) -> np.ndarray:
        if x.dtype not in (np.float32, np.float64):
            x = x.astype(np.float32)  # float16 and narrower: exact in float32
        return np.ascontiguousarray(x).reshape(-1)

    return flat(t), flat(p)


def owner_histogram_into(t: np.ndarray, p: np.ndarray, J: int, j0: int, j1: int, width: int, out: np.ndarray) -> None:
    """Add to ``out`` (j1 - j0, 2**width) int64 the counts of the top ``width`` key bits of the |e| of
    outputs j0..j1-1 of a (rows, J) chunk (the first pass: no digit known yet)."""
    if t.size:
        tf, pf = _flat2(t, p)
        _owner_histogram(tf, pf, J, j0, j1, KEY_BITS - width, out)


class TargetTable:
    """Where a value's target is, as a flat int32 table: ``flat[o * W + (key >> tshift) - vmin]`` is the
    first target of owner o whose prefix starts with the key's top ``top`` bits (``missing`` if none),
    over the range of top bits the targets span; column ``W - 1`` is empty (keys out of that range).
    ``top`` is the whole prefix, up to 16 bits, when the table has at most ``TABLE_MAX`` entries
    (usually a few thousand): then it is ``exact``, one entry per target. Otherwise fewer bits, and
    the targets that share an entry are compared. ``ends[k]``: the end of target k's owner's targets."""

    def __init__(self, starts: np.ndarray, tprefix: np.ndarray, bits: int, missing: int = -1) -> None:
        starts = np.asarray(starts, np.int64)
        tprefix = np.ascontiguousarray(tprefix, np.uint64)
        owners = starts.size - 1
        top = min(bits, DIGIT_BITS)
        while True:
            down = bits - top
            tops = tprefix >> np.uint64(down)
            vmin = int(tops.min()) if tops.size else 0
            span = int(tops.max()) - vmin + 1 if tops.size else 1
            if owners * span <= max(TABLE_MAX, owners) or top == 0:
                break
            top -= 1
        self.W = span + 1
        self.flat = np.full(owners * self.W, missing, np.int32)
        _fill_table(starts, tprefix, np.uint64(down), np.uint64(vmin), self.W, self.flat)
        self.vmin, self.tshift, self.exact = vmin, KEY_BITS - bits + down, down == 0
        self.tprefix = tprefix
        self.ends = np.repeat(starts[1:], np.diff(starts))
        self.pooled = bool(starts[-1] > starts[-2])


class RowPlan:
    """Rows for a later pass in which each value is looked up once, for its output only: for every
    output j, one row per distinct prefix among its own targets' and the pooled targets' prefixes;
    a pooled target's values are the union of every output's row of its prefix (``pooled_sources``).
    ``of_target[k]``: target k's row, for the outputs' targets. For a histogram the rows are followed
    by a row for values of no row (``dump``), then one row per pooled target (``of_target``), filled
    after the pass with the sum of its sources: ``n_rows`` in all. ``table`` (:class:`TargetTable`,
    ``missing`` = ``dump``, or -1 with ``dump=False``): the row of each (output, prefix)."""

    def __init__(self, starts: np.ndarray, tprefix: np.ndarray, bits: int, *, dump: bool = True) -> None:
        J = starts.size - 2
        n_own = int(starts[J])
        P = np.asarray(tprefix[n_own:], np.uint64)
        own_owner = np.repeat(np.arange(J), np.diff(starts[:J + 1]))
        pairs_owner = np.concatenate([own_owner, np.repeat(np.arange(J), P.size)])
        pairs_prefix = np.concatenate([np.asarray(tprefix[:n_own], np.uint64), np.tile(P, J)])
        row_starts, self.prefix, where = targets_of(pairs_owner, pairs_prefix, J + 1)
        self.dump = self.prefix.size
        self.n_rows = self.dump + 1 + P.size
        self.of_target = np.concatenate([where[:n_own], self.dump + 1 + np.arange(P.size)])
        self.pooled_sources = where[n_own:].reshape(J, P.size).T.copy()
        self.table = TargetTable(row_starts, self.prefix, bits, missing=self.dump if dump else -1)

    def to_targets(self, keys: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Gathered (keys, rows) as (keys, target): a key of a row that is both an output's target
        and part of a pooled target is listed for both."""
        n_own = self.of_target.size - self.pooled_sources.shape[0]
        own = np.full(self.dump, -1, np.int64)
        own[self.of_target[:n_own]] = np.arange(n_own)
        pooled = np.full(self.dump, -1, np.int64)
        for i, sources in enumerate(self.pooled_sources):
            pooled[sources] = n_own + i
        a, b = own[rows], pooled[rows]
        return np.concatenate([keys[a >= 0], keys[b >= 0]]), np.concatenate([a[a >= 0], b[b >= 0]])


def row_histogram_into(
    t: np.ndarray, p: np.ndarray, J: int, bits: int, width: int, table: TargetTable, out: np.ndarray,
    lo_key: np.ndarray, hi_key: np.ndarray, win: np.ndarray, got_k: np.ndarray, got_r: np.ndarray, m: int,
) -> int:
    """Add to ``out`` (rows, 2**width) int64 the counts of the ``width`` key bits of |e| after the top
    ``bits``, row by ``table`` (exact, its entries rows of ``out``, a value of no row counted in the
    last row); lower ``lo_key`` / raise ``hi_key`` (rows,) uint64 to each row's smallest / largest key.
    ``win`` (rows, 4) uint64: two windows of digits (first, length) per row (length 0: none); the
    keys of a row whose digit is in one are appended with their row to ``got_k`` / ``got_r`` from
    position ``m``. Returns the new ``m``, -1 if they filled up (or ``m`` was already -1)."""
    if t.size:
        tf, pf = _flat2(t, p)
        return int(_row_histogram(tf, pf, J, table.flat, table.W, table.vmin, table.tshift, KEY_BITS - bits - width,
                                  (1 << width) - 1, np.uint64(out.shape[0] - 1), out, lo_key, hi_key, win, got_k,
                                  got_r, m))
    return m


def histogram_into(
    t: np.ndarray, p: np.ndarray, J: int, bits: int, width: int, table: TargetTable, out: np.ndarray,
    lo_key: np.ndarray, hi_key: np.ndarray,
) -> None:
    """Add to ``out`` (targets, 2**width) int64 the counts of the ``width`` key bits of |e| that follow
    the top ``bits`` bits (the prefixes of ``table``'s targets; ``bits >= 1``), over a (rows, J)
    chunk, for each value its output's target and its pooled target; lower ``lo_key`` / raise
    ``hi_key`` (targets,) uint64 to the smallest / largest key of each target."""
    if t.size:
        tf, pf = _flat2(t, p)
        _target_histogram(tf, pf, J, KEY_BITS - bits, KEY_BITS - bits - width, (1 << width) - 1, table.pooled,
                          table.ends, table.tprefix, table.flat, table.W, table.vmin, table.tshift, out, lo_key, hi_key)


def gather_chunk(t: np.ndarray, p: np.ndarray, J: int, bits: int, table: TargetTable) -> tuple[np.ndarray, np.ndarray]:
    """Keys (uint64) of the |e| of a (rows, J) chunk whose top ``bits`` bits equal the prefix of one of
    ``table``'s targets, with that target's index (a key matching its output's and a pooled target
    is listed twice)."""
    if not t.size:
        return np.empty(0, np.uint64), np.empty(0, np.int64)
    tf, pf = _flat2(t, p)
    return _gather(tf, pf, J, KEY_BITS - bits, table.pooled, table.ends, table.tprefix, table.flat, table.W,
                   table.vmin, table.tshift)


def targets_of(owner: np.ndarray, prefix: np.ndarray, n_owners: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct (owner, prefix) pairs of the queries, sorted: (starts (n_owners + 1,), tprefix, target of each query)."""
    prefix = np.asarray(prefix, np.uint64)
    order = np.lexsort((prefix, owner))
    o, pr = owner[order], prefix[order]
    new = np.ones(order.size, bool)
    new[1:] = (o[1:] != o[:-1]) | (pr[1:] != pr[:-1])
    target = np.empty(order.size, np.int64)
    target[order] = np.cumsum(new) - 1
    starts = np.searchsorted(o[new], np.arange(n_owners + 1)).astype(np.int64)
    return starts, np.ascontiguousarray(pr[new]), target


def narrow(
    hist: np.ndarray, rows: np.ndarray, prefix: np.ndarray, rank: np.ndarray, width: int = DIGIT_BITS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One radix step for every query from merged counts (targets, 2**width), query q reading row
    ``rows[q]``: the next prefix, the rank within it and the count of its bucket. ``hist`` is
    overwritten with its cumulative sums."""
    cum = np.cumsum(hist, axis=1, out=hist)
    new_prefix = np.empty(rank.size, np.uint64)
    new_rank = np.empty(rank.size, np.int64)
    count = np.empty(rank.size, np.int64)
    _narrow(cum, np.asarray(rows, np.int64), np.asarray(prefix, np.uint64), np.asarray(rank, np.int64), width,
            new_prefix, new_rank, count)
    return new_prefix, new_rank, count


def pick(keys: np.ndarray, index: np.ndarray, bits: int, tprefix: np.ndarray, target: np.ndarray,
         rank: np.ndarray) -> np.ndarray:
    """The key of the ``rank[q]``-th smallest of the gathered ``keys`` of target ``target[q]``, for every
    query q (``index``: each key's target; the keys of target k have their top ``bits`` bits equal to
    ``tprefix[k]``)."""
    n_targets = tprefix.size
    low_bits = KEY_BITS - bits
    if n_targets <= 1 << (64 - low_bits):  # target index and the key's low bits fit one uint64: one sort
        low = np.uint64((1 << low_bits) - 1)
        packed = (index.astype(np.uint64) << np.uint64(low_bits)) | (keys & low)
        packed.sort()
        begin = np.searchsorted(packed, np.arange(n_targets, dtype=np.uint64) << np.uint64(low_bits))
        return (tprefix[target] << np.uint64(low_bits)) | (packed[begin[target] + rank] & low)
    order = np.lexsort((keys, index))  # by target, then by key
    keys, index = keys[order], index[order]
    begin = np.searchsorted(index, np.arange(n_targets))
    return keys[begin[target] + rank]


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
