"""Helpers that dask.distributed workers import (tests/test_cluster.py): a reader that kills its worker."""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from oocmetrics.compute import RowBlocks


class KillOnceBlocks(RowBlocks):
    """RowBlocks whose read of block ``victim`` SIGKILLs the worker process, the first time only
    (a marker file records that it happened): dask must run the task again elsewhere."""

    def __init__(self, *args: Any, marker: str, victim: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.marker, self.victim = marker, victim

    def read(self, i: int, **kwargs: Any):
        if i == self.victim and not Path(self.marker).exists():
            Path(self.marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return super().read(i, **kwargs)
