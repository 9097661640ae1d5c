"""One writer per split: an OS file lock (``filelock``) next to the store, with the holder written down.

The lock file ``<store>/.oocmetrics/<split>.lock`` is held with ``flock`` from the moment a :class:`Recorder`
opens a split until it is closed; the kernel drops it when the holder dies, even by SIGKILL, so a
crashed run never leaves a stale lock. Who holds it (host, pid, run id, since when) is written to
``<store>/.oocmetrics/<split>.lock.json`` after the lock is taken, so a second writer's error can name the holder.
Readers (``compute_stored``, the CLI) never take the lock: they read only durable rows.

flock does not exclude writers on different NFS clients; use one store per machine there.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import socket
from pathlib import Path
from typing import Any

import filelock

from oocmetrics.errors import LockedError

__all__ = ["SplitLock", "LockedError"]

def _holder_text(info_path: Path) -> str:
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError):
        return "another process (holder unknown)"
    text = (f"process {info.get('pid')} on host {info.get('host')!r} (run {info.get('run_id')}, "
            f"since {info.get('since')})")
    if info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
        text += (" - that is THIS process: an earlier Recorder on this split was not closed (call its "
                 "close(), or use `with oocmetrics.Recorder(...) as rec:`)")
    return text


class SplitLock:
    """The exclusive write lock of one split of a store."""

    def __init__(self, store: str | os.PathLike[str], lock_dir: str | os.PathLike[str], split: str, run_id: str) -> None:
        self.store = Path(store)
        self.path = Path(lock_dir) / f"{split}.lock"
        self.info_path = Path(lock_dir) / f"{split}.lock.json"
        self.split = split
        self.run_id = run_id
        # thread_local=False: close() may run on another thread than the constructor.
        self._lock = filelock.FileLock(str(self.path), thread_local=False)

    def acquire(self, timeout: float = 0.0) -> None:
        """Take the lock, waiting up to ``timeout`` seconds (0: try once); raise LockedError naming the holder."""
        try:
            self._lock.acquire(timeout=timeout)
        except filelock.Timeout:
            raise LockedError(
                f"Split {self.split!r} of {self.store} is being written by "
                f"{_holder_text(self.info_path)}. Two writers on one split would corrupt both runs' "
                f"metrics: close that recorder first, use another split or path, or pass "
                f"lock_timeout=<seconds> to wait for it. Reading (compute_stored, `python -m oocmetrics "
                f"compute`) needs no lock."
            ) from None
        info: dict[str, Any] = {
            "host": socket.gethostname(), "pid": os.getpid(), "run_id": self.run_id,
            "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        tmp = self.info_path.with_name(self.info_path.name + f".{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(info))
            os.replace(tmp, self.info_path)
        except OSError:  # the holder note is a courtesy; a full disk must not stop the run here
            tmp.unlink(missing_ok=True)

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release(force=True)

    @property
    def held(self) -> bool:
        return bool(self._lock.is_locked)
