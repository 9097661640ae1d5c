"""Pure numeric kernels over NumPy chunks: no I/O, no state.

Every decomposable metric is computed from one set of float64 *partials* per output
(see :mod:`oocmetrics.kernels.moments`): ``chunk`` -> partials, ``combine`` merges partials in a fixed
pairwise order (Chan et al.), and :mod:`oocmetrics.metrics` finalizes them into metric values.
"""
from oocmetrics.kernels.moments import (
    FIELDS,
    chunk_partials,
    combine,
    empty_partials,
    tree_combine,
)
from oocmetrics.kernels.checks import count_nonfinite, is_all_finite

__all__ = [
    "FIELDS",
    "chunk_partials",
    "combine",
    "empty_partials",
    "tree_combine",
    "count_nonfinite",
    "is_all_finite",
]
