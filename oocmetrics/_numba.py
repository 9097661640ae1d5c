"""numba set-up: a writable on-disk cache so compiled kernels survive between processes.

Without a cache every process pays ~5 s of compilation (FIGURES.md); with one, ~0.5 s. numba reads
NUMBA_CACHE_DIR when it is first imported, so this module must be imported before numba is.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _cache_dir() -> str:
    candidates = [
        os.environ.get("NUMBA_CACHE_DIR"),
        os.path.join(os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")), "oocmetrics", "numba"),
        os.path.join(tempfile.gettempdir(), f"oocmetrics-numba-{os.getuid()}"),
    ]
    for cand in candidates:
        if not cand:
            continue
        try:
            os.makedirs(cand, exist_ok=True)
            if os.access(cand, os.W_OK):
                return cand
        except OSError:
            continue
    return ""


_dir = _cache_dir()
if _dir:
    os.environ["NUMBA_CACHE_DIR"] = _dir

import numba  # noqa: E402  (must come after NUMBA_CACHE_DIR is set)

njit = numba.njit
