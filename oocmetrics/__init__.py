"""oocmetrics: exact regression metrics over an on-disk prediction store, with bounded memory.

    rec = oocmetrics.Recorder("runs/exp1", split="val")
    for x, y in loader:
        rec.update(y, model(x))      # (y_true, y_pred)
    result = rec.compute()           # exact, over every row of the epoch
    rec.reset()                      # next epoch
"""
from oocmetrics import _numba  # noqa: F401  (numba.njit for the kernels; sets no process-wide state)
from oocmetrics.compute import compute_arrays
from oocmetrics.memory import peak_rss_bytes
from oocmetrics.metrics import ALL_METRICS, METRICS, ORDER_METRICS, EpochMetrics, resolve_metrics
from oocmetrics.errors import LockedError, StoreError, WriterError
from oocmetrics.recorder import Recorder
from oocmetrics.stored import compute_stored
from oocmetrics.xarray_view import open_epoch  # imports xarray (an optional extra) only when called

__all__ = [
    "Recorder", "EpochMetrics", "METRICS", "ORDER_METRICS", "ALL_METRICS", "compute_arrays",
    "compute_stored", "resolve_metrics", "open_epoch", "StoreError", "WriterError", "LockedError", "peak_rss_bytes",
]
__version__ = "0.1.0"
