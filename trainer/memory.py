"""Peak resident memory per phase (e.g. per epoch), measured while it runs.

The kernel's high-water mark (``oocmetrics.peak_rss_bytes``) is the maximum over the whole process
lifetime, so it cannot say which epoch peaked. ``RssSampler`` reads the current RSS (psutil) in a background thread every
``interval`` seconds and on every explicit ``sample()`` (the loops call it every few batches), and
keeps the maximum since the last ``reset()``.

Note: RSS counts the pages of memory-mapped data files that were touched (the dataset windows),
although the OS can drop them at any time like any page cache. So the sampler also keeps the peak
of anonymous memory (RSS minus file-backed and shared pages: heap, buffers, tensors), which is
what would actually grow if something accumulated predictions.
"""

from __future__ import annotations

import threading

import oocmetrics
import psutil

__all__ = ["RssSampler", "lifetime_max_rss_mb"]

_MB = 1024.0 * 1024.0


def lifetime_max_rss_mb() -> float:
    """The process's own peak RSS so far (oocmetrics.peak_rss_bytes: VmHWM, not ru_maxrss)."""
    return oocmetrics.peak_rss_bytes() / _MB


class RssSampler:
    """Background sampler of current RSS; ``with RssSampler() as rss: ... rss.reset(); rss.peak_mb``."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self._proc = psutil.Process()
        self._lock = threading.Lock()
        self._peak = 0
        self._peak_anon = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> RssSampler:
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def __enter__(self) -> RssSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> int:
        """Read the current RSS now (bytes) and fold it into the peak."""
        info = self._proc.memory_info()
        with self._lock:
            self._peak = max(self._peak, info.rss)
            self._peak_anon = max(self._peak_anon, info.rss - getattr(info, "shared", 0))
        return info.rss

    def reset(self) -> None:
        """Start a new phase: the peak restarts from the current RSS."""
        info = self._proc.memory_info()
        with self._lock:
            self._peak = info.rss
            self._peak_anon = info.rss - getattr(info, "shared", 0)

    @property
    def peak_mb(self) -> float:
        """Peak RSS in MiB since the last reset (takes one more sample first)."""
        self.sample()
        with self._lock:
            return self._peak / _MB

    @property
    def peak_anon_mb(self) -> float:
        """Peak anonymous RSS (RSS minus file-backed/shared pages) in MiB since the last reset."""
        self.sample()
        with self._lock:
            return self._peak_anon / _MB
