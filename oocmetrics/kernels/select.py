"""Exact order statistics of |y_true - y_pred| per output by radix select over float64 bit patterns.

For non-negative floats the uint64 bit pattern is ordered like the value, so the k-th smallest |e| can
be found digit by digit: a pass builds a 65,536-bin histogram of the next 16 bits among the values
that share the digits found so far, and the cumulative count picks the next digit. Histograms merge by
addition, so each pass is one chunked reduction. Once few candidates remain (``GATHER_MAX``), one last
pass gathers them and a sort finishes. On continuous data that is 2 histogram passes + 1 gather pass;
heavily tied data may need up to 4 histogram passes and then needs no gather (all 64 bits known).

|e| is taken in float64 (exact for float32 inputs); pairs where y_true or y_pred is not finite are
left out, as in every other metric.
"""
from __future__ import annotations

import numpy as np

from oocmetrics._numba import njit

DIGIT_BITS = 16
BINS = 1 << DIGIT_BITS
LEVELS = 64 // DIGIT_BITS
GATHER_MAX = 1 << 22  # candidates gathered in RAM at most (32 MiB of float64)
_BLOCK = 8192


@njit(cache=True, nogil=True)
def _abs_err_keys(tf, pf, lo, hi, vals):
    """|e| of elements [lo, hi) into vals[:hi-lo] as float64; non-finite pairs give NaN or Inf."""
    for i in range(hi - lo):
        t = np.float64(tf[lo + i])
        p = np.float64(pf[lo + i])
        vals[i] = abs(t - p)


@njit(cache=True, nogil=True)
def _histogram(tf, pf, J, level, prefix, out):
    """out[j, r, digit] += 1 for every finite |e| of output j whose higher digits equal prefix[j, r]."""
    R = prefix.shape[1]
    shift = 64 - DIGIT_BITS * (level + 1)
    vals = np.empty(_BLOCK * J)
    keys = vals.view(np.uint64)
    size = tf.size
    for lo in range(0, size, _BLOCK * J):
        hi = min(size, lo + _BLOCK * J)
        _abs_err_keys(tf, pf, lo, hi, vals)
        for i in range(hi - lo):
            v = vals[i]
            if not (v - v == 0.0):  # NaN or Inf: a non-finite pair
                continue
            j = (lo + i) % J
            key = keys[i]
            digit = (key >> np.uint64(shift)) & np.uint64(BINS - 1)
            for r in range(R):
                if level == 0 or (key >> np.uint64(shift + DIGIT_BITS)) == prefix[j, r]:
                    out[j, r, digit] += 1


@njit(cache=True, nogil=True)
def _gather(tf, pf, J, bits, prefix):
    """Values |e| whose top ``bits`` bits equal prefix[j, r]: (values, j * R + r) arrays."""
    R = prefix.shape[1]
    shift = np.uint64(64 - bits)
    vals = np.empty(_BLOCK * J)
    keys = vals.view(np.uint64)
    size = tf.size
    out_v = np.empty(1024)
    out_i = np.empty(1024, np.int64)
    m = 0
    for lo in range(0, size, _BLOCK * J):
        hi = min(size, lo + _BLOCK * J)
        _abs_err_keys(tf, pf, lo, hi, vals)
        for i in range(hi - lo):
            v = vals[i]
            if not (v - v == 0.0):
                continue
            j = (lo + i) % J
            for r in range(R):
                if (keys[i] >> shift) == prefix[j, r]:
                    if m == out_v.size:
                        out_v = np.concatenate((out_v, np.empty(out_v.size)))
                        out_i = np.concatenate((out_i, np.empty(out_i.size, np.int64)))
                    out_v[m] = v
                    out_i[m] = j * R + r
                    m += 1
    return out_v[:m].copy(), out_i[:m].copy()


def _flat2(t: np.ndarray, p: np.ndarray, J: int) -> tuple[np.ndarray, np.ndarray]:
    def flat(x: np.ndarray) -> np.ndarray:
        if x.dtype not in (np.float32, np.float64):
            x = x.astype(np.float32)
        return np.ascontiguousarray(x).reshape(-1)

    return flat(t), flat(p)


def histogram_chunk(t: np.ndarray, p: np.ndarray, J: int, level: int, prefix: np.ndarray) -> np.ndarray:
    """(J, R, BINS) int64 counts of digit ``level`` of |e| among values matching ``prefix`` (J, R)."""
    out = np.zeros((J, prefix.shape[1], BINS), np.int64)
    if t.size:
        tf, pf = _flat2(t, p, J)
        _histogram(tf, pf, J, level, np.ascontiguousarray(prefix, np.uint64), out)
    return out


def gather_chunk(t: np.ndarray, p: np.ndarray, J: int, bits: int, prefix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Candidates |e| whose top ``bits`` bits equal prefix[j, r], with their flat (j, r) index."""
    if not t.size:
        return np.empty(0), np.empty(0, np.int64)
    tf, pf = _flat2(t, p, J)
    return _gather(tf, pf, J, bits, np.ascontiguousarray(prefix, np.uint64))


def narrow(hist: np.ndarray, prefix: np.ndarray, rank: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One radix step: from merged counts (J, R, BINS), the next prefix, rank within it, and its count."""
    cum = np.cumsum(hist, axis=2)
    digit = np.argmax(cum > rank[..., None], axis=2)  # first bin whose cumulative count passes rank
    before = np.take_along_axis(cum, digit[..., None], axis=2)[..., 0] - np.take_along_axis(
        hist, digit[..., None], axis=2)[..., 0]
    count = np.take_along_axis(hist, digit[..., None], axis=2)[..., 0]
    new_prefix = (prefix.astype(np.uint64) << np.uint64(DIGIT_BITS)) | digit.astype(np.uint64)
    return new_prefix, rank - before, count


def key_to_value(key: np.ndarray) -> np.ndarray:
    """uint64 bit patterns back to float64 values."""
    return np.ascontiguousarray(key, dtype=np.uint64).view(np.float64)
