"""The library's exceptions: each message says what happened, which rows are safe and what to do."""
from __future__ import annotations

__all__ = ["StoreError", "WriterError", "LockedError"]


class StoreError(RuntimeError):
    """A store on disk is missing, foreign, damaged, or in the way."""


class LockedError(StoreError):
    """Another recorder (this process or another) is writing the same split."""


class WriterError(RuntimeError):
    """Writing to the store failed; the message says which rows are durable, which are held, and what to do."""
