"""Finite checks for the ingest path: a read-only pass, cheaper than the copy that follows it."""
from __future__ import annotations

import numpy as np

from oocmetrics._numba import njit

_EXP32 = np.uint32(0x7F800000)
_EXP64 = np.uint64(0x7FF0000000000000)


@njit(cache=True, nogil=True)
def _max_exponent(bits, mask):
    # Integer max over (bits & exponent mask) vectorises without fastmath; it equals the mask iff some
    # value has an all-ones exponent, i.e. is NaN or +-Inf.
    acc = bits.dtype.type(0)
    for i in range(bits.size):
        v = bits[i] & mask
        acc = v if v > acc else acc
    return acc


def is_all_finite(x: np.ndarray) -> bool:
    """True when ``x`` (any float dtype, any shape) holds no NaN or Inf."""
    if x.size == 0:
        return True
    if x.dtype == np.float32 and x.flags.c_contiguous:
        return bool(_max_exponent(x.reshape(-1).view(np.uint32), _EXP32) != _EXP32)
    if x.dtype == np.float64 and x.flags.c_contiguous:
        return bool(_max_exponent(x.reshape(-1).view(np.uint64), _EXP64) != _EXP64)
    return bool(np.isfinite(x).all())


def count_nonfinite(x: np.ndarray) -> int:
    """Number of NaN/Inf values in ``x`` (error path only, so plain NumPy)."""
    return int(x.size - np.count_nonzero(np.isfinite(x)))
