"""numba's ``njit``, the one decorator of the kernels (imported from here so there is one place to change it).

The kernels use ``@njit(cache=True)``: compiled machine code is written once and later processes load
it instead of compiling again. numba chooses where: ``$NUMBA_CACHE_DIR`` if the user set it, else
``__pycache__`` next to the kernel's source file, else (package directory not writable, e.g. a
system-wide install) a user-wide cache directory (``~/.cache/numba/...`` on Linux). This module does
not set ``NUMBA_CACHE_DIR`` or any other process-wide setting: importing a library must not change
how other libraries in the same process behave. To measure the cache, time a fresh process twice:

    python -c "import oocmetrics, numpy as np; oocmetrics.compute_arrays(np.ones((10, 3)), np.zeros((10, 3)))"

(on a 2-core machine: 4.5 s with an empty cache, then 1.4 s, of which ~1.0 s is the imports.)
"""
from __future__ import annotations

from numba import njit

__all__ = ["njit"]
