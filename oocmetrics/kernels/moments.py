"""Fused float64 partials of the regression suite over one chunk, and their pairwise merge.

Data of shape (rows, *trailing) is viewed as (M, J): J outputs on the last axis, M values per output.
For each output j the partials are (a (K, J) float64 array, rows named by ``FIELDS``):

- ``n``: values counted (pairs where y_true and y_pred are both finite); ``skipped``: pairs left out
- ``mean_t_hi + mean_t_lo, m2_t`` / ``mean_p_*, m2_p`` / ``mean_e_*, m2_e``: count, mean and M2 of
  y_true, y_pred and e = y_true - y_pred; each mean is a double-double (hi, lo) pair;
  ``c_tp``: co-moment sum((t - mean_t) * (p - mean_p))
- ``sse = sum(e^2)``, ``sae = sum(|e|)``, ``max_ae = max(|e|)``, ``min_t``, ``max_t`` (of raw y_true)

Everything is computed from the *raw* values (float64 of the float32/float64 input): e = t - p is
taken before any centring, so sse, sae and max_ae carry every digit of e whatever the magnitude of
t and p and whatever the row order, and the finiteness test (``ok``) is on raw t and p. An e that
overflows (t = 1.7e308, p = -1.7e308) is counted and gives inf, not NaN. There is no global shift.

Within a chunk, values are taken in blocks of ``BLOCK`` rows of the (M, J) view. Each block is reduced
in two passes from cache: pass 1 gives counts, sums (hence a rough mean c of t, p and e), sse, sae,
max_ae and the extremes; pass 2 accumulates the deviations d = x - c, and the corrected two-pass
formula (Chan, Golub & LeVeque) gives M2 = sum(d^2) - sum(d)^2/n, C_tp = sum(dt*dp) - sum(dt)*sum(dp)/n
and mean = c + sum(d)/n, the latter kept exactly as a double-double (error-free two-sum). No
``sum(x^2) - n*mean^2`` cancellation occurs, and because the means carry ~106 bits, Chan's merges see
the exact difference of two means, (hi_b - hi_a) + (lo_b - lo_a), even on 1e8 + 1e-3 noise or with a
1e10 outlier in one block. Blocks, and then chunks, are merged in a pairwise tree over their index:
the order depends only on the data layout, never on threads, so results are reproducible bit for bit.

Hot loops keep ``LANES`` consecutive rows x J outputs as independent float64 accumulators so that they
vectorise without fastmath (`python benchmarks/run_speed.py` measures the kernel against NumPy).
"""
from __future__ import annotations

import numpy as np

from oocmetrics._numba import njit

FIELDS = (
    "n",
    "mean_t_hi", "mean_t_lo", "m2_t",
    "mean_p_hi", "mean_p_lo", "m2_p",
    "c_tp",
    "mean_e_hi", "mean_e_lo", "m2_e",
    "sse", "sae", "max_ae", "min_t", "max_t", "skipped",
)
K = len(FIELDS)
(N,
 MEAN_T_HI, MEAN_T_LO, M2_T,
 MEAN_P_HI, MEAN_P_LO, M2_P,
 C_TP,
 MEAN_E_HI, MEAN_E_LO, M2_E,
 SSE, SAE, MAX_AE, MIN_T, MAX_T, SKIPPED) = range(K)

BLOCK = 4096  # rows of the (M, J) view per block: 2 x 4096 x 20 x 4 B = 640 KB, stays in L2 for pass 2
LANES = 16    # rows per accumulator group: 16 x 20 outputs = 320 independent float64 lanes
_SCALE_DOWN = 2.0 ** -600  # rough mean of values whose plain sum overflows (see _scaled_mean)
_SCALE_UP = 2.0 ** 600


def empty_partials(n_outputs: int) -> np.ndarray:
    """Partials of no data: the identity of :func:`combine`."""
    out = np.zeros((K, n_outputs), dtype=np.float64)
    out[MAX_AE] = 0.0
    out[MIN_T] = np.inf
    out[MAX_T] = -np.inf
    return out


@njit(cache=True, nogil=True, inline="always")
def _two_sum(a, b):
    """Error-free transformation: s + err == a + b exactly, s = fl(a + b) (Knuth)."""
    s = a + b
    bb = s - a
    err = (a - (s - bb)) + (b - bb)
    return s, err


@njit(cache=True, nogil=True, inline="always")
def _dd_add(hi, lo, x):
    """Double-double (hi, lo) plus double x, renormalised."""
    s, err = _two_sum(hi, x)
    err += lo
    return _two_sum(s, err)


@njit(cache=True, nogil=True, inline="always")
def _nonneg(x):
    """max(x, 0) that keeps NaN."""
    return 0.0 if x < 0.0 else x


@njit(cache=True, nogil=True)
def _merge(a, b, out):
    """Chan et al. merge of two (K, J) partials into ``out`` (which may alias ``a``)."""
    for j in range(a.shape[1]):
        na = a[N, j]
        nb = b[N, j]
        n = na + nb
        skipped = a[SKIPPED, j] + b[SKIPPED, j]  # read before ``out`` (maybe ``a``) is written
        if nb == 0.0:
            for f in range(a.shape[0]):
                out[f, j] = a[f, j]
        elif na == 0.0:
            for f in range(a.shape[0]):
                out[f, j] = b[f, j]
        else:
            w = na * nb / n
            fb = nb / n
            # differences of double-double means: exact when the means are close (Sterbenz)
            dt = (b[MEAN_T_HI, j] - a[MEAN_T_HI, j]) + (b[MEAN_T_LO, j] - a[MEAN_T_LO, j])
            dp = (b[MEAN_P_HI, j] - a[MEAN_P_HI, j]) + (b[MEAN_P_LO, j] - a[MEAN_P_LO, j])
            de = (b[MEAN_E_HI, j] - a[MEAN_E_HI, j]) + (b[MEAN_E_LO, j] - a[MEAN_E_LO, j])
            m2_t = a[M2_T, j] + b[M2_T, j] + dt * dt * w
            m2_p = a[M2_P, j] + b[M2_P, j] + dp * dp * w
            m2_e = a[M2_E, j] + b[M2_E, j] + de * de * w
            c_tp = a[C_TP, j] + b[C_TP, j] + dt * dp * w
            t_hi, t_lo = _dd_add(a[MEAN_T_HI, j], a[MEAN_T_LO, j], dt * fb)
            p_hi, p_lo = _dd_add(a[MEAN_P_HI, j], a[MEAN_P_LO, j], dp * fb)
            e_hi, e_lo = _dd_add(a[MEAN_E_HI, j], a[MEAN_E_LO, j], de * fb)
            out[MEAN_T_HI, j] = t_hi
            out[MEAN_T_LO, j] = t_lo
            out[MEAN_P_HI, j] = p_hi
            out[MEAN_P_LO, j] = p_lo
            out[MEAN_E_HI, j] = e_hi
            out[MEAN_E_LO, j] = e_lo
            out[M2_T, j] = m2_t
            out[M2_P, j] = m2_p
            out[M2_E, j] = m2_e
            out[C_TP, j] = c_tp
            out[N, j] = n
            out[SSE, j] = a[SSE, j] + b[SSE, j]
            out[SAE, j] = a[SAE, j] + b[SAE, j]
            out[MIN_T, j] = min(a[MIN_T, j], b[MIN_T, j])
            out[MAX_T, j] = max(a[MAX_T, j], b[MAX_T, j])
            out[MAX_AE, j] = max(a[MAX_AE, j], b[MAX_AE, j])
        out[SKIPPED, j] = skipped


@njit(cache=True, nogil=True)
def _tree(stack):
    """Pairwise merge of stack[0..n) in place, (0,1), (2,3), ... then again: returns stack[0]."""
    n = stack.shape[0]
    step = 1
    while step < n:
        i = 0
        while i + step < n:
            _merge(stack[i], stack[i + step], stack[i])
            i += 2 * step
        step *= 2
    return stack[0].copy()


@njit(cache=True, nogil=True)
def _scaled_mean(tf, pf, J, j, which, cnt):
    """Rough mean of t (0), p (1) or e (2) of output j when the plain sum overflowed (|x| ~ 1e308).

    Rare path: values are summed scaled by 2**-600, so the mean is finite whenever every value is.
    Returns 0.0 when it is still not finite (e itself overflowed): any finite centre will do.
    """
    s = 0.0
    for i in range(j, tf.size, J):
        t = np.float64(tf[i])
        p = np.float64(pf[i])
        if (t - t == 0.0) and (p - p == 0.0):
            x = t if which == 0 else (p if which == 1 else t - p)
            s += x * _SCALE_DOWN
    c = (s / cnt) * _SCALE_UP
    return c if c - c == 0.0 else 0.0


@njit(cache=True, nogil=True)
def _block(tf, pf, J, out):
    """Exact two-pass partials of one block: tf, pf are flat C-order views of (b, J) values."""
    L = LANES * J
    size = tf.size
    n = np.zeros(L)
    st = np.zeros(L)
    sp = np.zeros(L)
    se = np.zeros(L)
    sse = np.zeros(L)
    sae = np.zeros(L)
    mae = np.zeros(L)
    mn = np.full(L, np.inf)
    mx = np.full(L, -np.inf)
    # Pass 1: counts, sums, and the statistics that need no mean, all from the raw values. A
    # non-finite pair becomes (0, 0) with weight 0, branch-free, so the loop still vectorises.
    for base in range(0, size, L):
        xt = tf[base:base + L]
        xp = pf[base:base + L]
        for k in range(xt.size):
            t = np.float64(xt[k])
            p = np.float64(xp[k])
            ok = (t - t == 0.0) & (p - p == 0.0)
            t = t if ok else 0.0
            p = p if ok else 0.0
            e = t - p
            a = abs(e)
            n[k] += 1.0 if ok else 0.0
            st[k] += t
            sp[k] += p
            se[k] += e
            sse[k] += e * e
            sae[k] += a
            mae[k] = a if a > mae[k] else mae[k]
            lo = t if ok else np.inf
            hi = t if ok else -np.inf
            mn[k] = lo if lo < mn[k] else mn[k]
            mx[k] = hi if hi > mx[k] else mx[k]
    cnt_j = np.zeros(J)
    c_t = np.zeros(J)
    c_p = np.zeros(J)
    c_e = np.zeros(J)
    for j in range(J):
        cnt = 0.0
        s_t = 0.0
        s_p = 0.0
        s_e = 0.0
        s_sse = 0.0
        s_sae = 0.0
        m_ae = 0.0
        lo = np.inf
        hi = -np.inf
        for r in range(LANES):
            k = r * J + j
            cnt += n[k]
            s_t += st[k]
            s_p += sp[k]
            s_e += se[k]
            s_sse += sse[k]
            s_sae += sae[k]
            m_ae = max(m_ae, mae[k])
            lo = min(lo, mn[k])
            hi = max(hi, mx[k])
        out[N, j] = cnt
        out[SKIPPED, j] = size // J - cnt
        out[SSE, j] = s_sse
        out[SAE, j] = s_sae
        out[MAX_AE, j] = m_ae
        out[MIN_T, j] = lo
        out[MAX_T, j] = hi
        cnt_j[j] = cnt
        if cnt > 0:
            c_t[j] = s_t / cnt
            c_p[j] = s_p / cnt
            c_e[j] = s_e / cnt
            if not (c_t[j] - c_t[j] == 0.0):
                c_t[j] = _scaled_mean(tf, pf, J, j, 0, cnt)
            if not (c_p[j] - c_p[j] == 0.0):
                c_p[j] = _scaled_mean(tf, pf, J, j, 1, cnt)
            if not (c_e[j] - c_e[j] == 0.0):
                c_e[j] = _scaled_mean(tf, pf, J, j, 2, cnt)
    # Pass 2 (from cache): deviations from the rough means, 0 for non-finite pairs.
    ct = np.empty(L)
    cp = np.empty(L)
    ce = np.empty(L)
    for k in range(L):
        ct[k] = c_t[k % J]
        cp[k] = c_p[k % J]
        ce[k] = c_e[k % J]
    sdt = np.zeros(L)
    sdp = np.zeros(L)
    sde = np.zeros(L)
    qt = np.zeros(L)
    qp = np.zeros(L)
    qe = np.zeros(L)
    ctp = np.zeros(L)
    for base in range(0, size, L):
        xt = tf[base:base + L]
        xp = pf[base:base + L]
        for k in range(xt.size):
            t = np.float64(xt[k])
            p = np.float64(xp[k])
            ok = (t - t == 0.0) & (p - p == 0.0)
            dt = (t - ct[k]) if ok else 0.0
            dp = (p - cp[k]) if ok else 0.0
            de = ((t - p) - ce[k]) if ok else 0.0
            sdt[k] += dt
            sdp[k] += dp
            sde[k] += de
            qt[k] += dt * dt
            qp[k] += dp * dp
            qe[k] += de * de
            ctp[k] += dt * dp
    for j in range(J):
        a_t = 0.0
        a_p = 0.0
        a_e = 0.0
        b_t = 0.0
        b_p = 0.0
        b_e = 0.0
        b_tp = 0.0
        for r in range(LANES):
            k = r * J + j
            a_t += sdt[k]
            a_p += sdp[k]
            a_e += sde[k]
            b_t += qt[k]
            b_p += qp[k]
            b_e += qe[k]
            b_tp += ctp[k]
        cnt = cnt_j[j]
        if cnt > 0:
            # corrected two-pass formula; M2 >= 0 in exact arithmetic (NaN, from overflow, stays NaN)
            out[M2_T, j] = _nonneg(b_t - a_t * (a_t / cnt))
            out[M2_P, j] = _nonneg(b_p - a_p * (a_p / cnt))
            out[M2_E, j] = _nonneg(b_e - a_e * (a_e / cnt))
            out[C_TP, j] = b_tp - a_t * (a_p / cnt)
            hi, lo = _two_sum(c_t[j], a_t / cnt)
            out[MEAN_T_HI, j] = hi
            out[MEAN_T_LO, j] = lo
            hi, lo = _two_sum(c_p[j], a_p / cnt)
            out[MEAN_P_HI, j] = hi
            out[MEAN_P_LO, j] = lo
            hi, lo = _two_sum(c_e[j], a_e / cnt)
            out[MEAN_E_HI, j] = hi
            out[MEAN_E_LO, j] = lo
        else:
            for f in (MEAN_T_HI, MEAN_T_LO, M2_T, MEAN_P_HI, MEAN_P_LO, M2_P, C_TP,
                      MEAN_E_HI, MEAN_E_LO, M2_E):
                out[f, j] = 0.0


@njit(cache=True, nogil=True)
def _chunk(tf, pf, J):
    size = tf.size
    step = BLOCK * J
    nblocks = max(1, (size + step - 1) // step)
    stack = np.zeros((nblocks, K, J))
    for b in range(nblocks):
        lo = b * step
        hi = min(size, lo + step)
        _block(tf[lo:hi], pf[lo:hi], J, stack[b])
    return _tree(stack)


def _flat(x: np.ndarray) -> np.ndarray:
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float32)
    return np.ascontiguousarray(x).reshape(-1)


def n_outputs(shape: tuple[int, ...]) -> int:
    """Outputs J of data shaped (rows, *trailing): the last axis, or 1 for 1-D data."""
    return int(shape[-1]) if len(shape) > 1 else 1


def chunk_partials(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Partials (K, J) of one chunk of rows; y_true and y_pred share a shape (rows, *trailing).

    Partials of any chunks of the same outputs merge with :func:`combine` / :func:`tree_combine`.
    """
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has shape {y_true.shape} but y_pred has {y_pred.shape}")
    J = n_outputs(y_true.shape)
    if y_true.size == 0:
        return empty_partials(J)
    return _chunk(_flat(y_true), _flat(y_pred), J)


def combine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Merge two partials (K, J) into a new array: a then b (Chan et al.)."""
    out = np.empty_like(a)
    _merge(a, b, out)
    return out


def tree_combine(stack: np.ndarray) -> np.ndarray:
    """Merge partials stacked as (n, K, J) in a fixed pairwise tree over their index."""
    if stack.ndim != 3 or stack.shape[1] != K:
        raise ValueError(f"expected partials stacked as (n, {K}, J), got shape {stack.shape}")
    if stack.shape[0] == 0:
        return empty_partials(stack.shape[2])
    return _tree(np.array(stack, dtype=np.float64, copy=True))
