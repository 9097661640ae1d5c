"""Shared pieces of the benchmarks: the synthetic ordered epoch, an RSS sampler, output helpers.

Imported by ``run_memory.py`` and ``run_speed.py`` (run as scripts, so this directory is on
``sys.path``). NumPy and psutil only: the driver processes stay small.
"""

from __future__ import annotations

import json
import math
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

BATCH_SHAPE = (16, 500, 20)  # the seed trainer's (batch, time, outputs)
SEED_BATCHES = 11_014  # batches per epoch in the seed trainer
GB = 1e9
MB = 1e6


def batch_bytes(shape: tuple[int, ...] = BATCH_SHAPE) -> int:
    """Bytes of one float32 array of ``shape`` (one of y_true / y_pred)."""
    return int(np.prod(shape)) * 4


class SyntheticEpoch:
    """A deterministic, ordered epoch of float32 (y_true, y_pred) batches, generated on demand.

    Batch ``i`` depends only on ``(seed, i)`` and is never stored: the whole epoch is never
    materialised. Like real recordings the data are ordered: ``n_subjects`` subjects follow one
    another, each with its own per-output offset, gain and noise level, and the model's error grows
    over the epoch (noise and shrinkage towards the subject's offset). So the first batches are
    *not* a sample of the epoch. Noise comes from a fixed 16 MiB pool of standard normals, sliced at
    pseudo-random offsets per batch (about 0.3 ms a batch).
    """

    def __init__(
        self,
        n_batches: int,
        *,
        seed: int = 0,
        batch_shape: tuple[int, ...] = BATCH_SHAPE,
        n_subjects: int = 8,
        pool_values: int = 1 << 22,
    ) -> None:
        self.n_batches = int(n_batches)
        self.seed = int(seed)
        self.batch_shape = tuple(batch_shape)
        self.size = int(np.prod(batch_shape))
        self.n_subjects = int(n_subjects)
        j = batch_shape[-1]
        rng = np.random.default_rng([seed, 0xDA7A])
        self.pool_values = int(pool_values)
        self.pool = rng.standard_normal(self.pool_values + self.size, dtype=np.float32)
        f32 = np.float32
        self.offset = rng.normal(0.0, 2.0, (n_subjects, j)).astype(f32)
        self.gain = rng.uniform(0.5, 2.0, (n_subjects, j)).astype(f32)
        self.noise = rng.uniform(0.2, 0.8, (n_subjects, j)).astype(f32)
        self.bias = rng.normal(0.0, 0.5, (n_subjects, j)).astype(f32)

    @property
    def nbytes(self) -> int:
        """Bytes of y_true + y_pred over the whole epoch."""
        return 2 * 4 * self.size * self.n_batches

    def subject(self, i: int) -> int:
        return min(i * self.n_subjects // max(self.n_batches, 1), self.n_subjects - 1)

    def batch(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Fresh float32 arrays (y_true, y_pred) of ``batch_shape`` for batch ``i``."""
        if not 0 <= i < self.n_batches:
            raise IndexError(f"Expected a batch index in [0, {self.n_batches}), but got {i}.")
        s = self.subject(i)
        u = np.float32(i / max(self.n_batches - 1, 1))  # progress through the epoch, 0..1
        o1, o2 = np.random.default_rng([self.seed, i]).integers(0, self.pool_values, size=2)
        z1 = self.pool[o1 : o1 + self.size].reshape(self.batch_shape)
        z2 = self.pool[o2 : o2 + self.size].reshape(self.batch_shape)
        y_true = z1 * self.gain[s]
        y_true += self.offset[s]
        shrink = np.float32(1.0) - np.float32(0.3) * u
        y_pred = y_true * shrink
        y_pred += (np.float32(1.0) - shrink) * self.offset[s] + u * self.bias[s]
        y_pred += z2 * (self.noise[s] * (np.float32(0.3) + np.float32(1.5) * u))
        return y_true, y_pred

    def __iter__(self):
        for i in range(self.n_batches):
            yield self.batch(i)

    def __len__(self) -> int:
        return self.n_batches


class RSSSampler:
    """Samples this process's RSS every ``interval`` s in a daemon thread; peak per phase.

    ``phase(name)`` starts a new phase (its peak starts at the current RSS). The kernel's
    high-water mark (VmHWM, via ``ru_maxrss_bytes``; it catches spikes shorter than the interval) is
    read separately.
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self._proc = psutil.Process()
        self._lock = threading.Lock()
        self._phase = "start"
        self.peaks: dict[str, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def rss(self) -> int:
        return self._proc.memory_info().rss

    def _record(self) -> None:
        r = self.rss()
        with self._lock:
            self.peaks[self._phase] = max(self.peaks.get(self._phase, 0), r)
            self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._record()

    def start(self) -> "RSSSampler":
        self._record()
        self._thread.start()
        return self

    def phase(self, name: str) -> None:
        with self._lock:
            self._phase = name
        self._record()

    def stop(self) -> dict[str, int]:
        self._record()
        self._stop.set()
        self._thread.join()
        return dict(self.peaks)


def ru_maxrss_bytes() -> int:
    """The process's own peak RSS as the kernel counts it (VmHWM; see oocmetrics.peak_rss_bytes)."""
    from oocmetrics.memory import peak_rss_bytes

    return peak_rss_bytes()


def code_version() -> str:
    """``git describe`` of the checkout, with "-dirty" when oocmetrics/ has uncommitted changes."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "oocmetrics"], cwd=root, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "no-commit") + ("-dirty" if dirty else "")


def machine_info() -> dict[str, Any]:
    vm = psutil.virtual_memory()
    return {
        "code": code_version(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "mem_total_gb": round(vm.total / GB, 2),
        "mem_available_gb_at_start": round(vm.available / GB, 2),
        "numpy": np.__version__,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def rel_error(value: float, ref: float) -> float:
    """|value - ref| / |ref| (absolute error when ref == 0; 0 when both are NaN)."""
    if math.isnan(ref) or math.isnan(value):
        return 0.0 if math.isnan(ref) and math.isnan(value) else math.inf
    d = abs(value - ref)
    return d / abs(ref) if ref != 0 else d


def write_json(path: Path, obj: Any) -> None:
    """JSON with NaN/inf written as null / strings so any parser reads it."""

    def clean(x: Any) -> Any:
        if isinstance(x, float):
            if math.isnan(x):
                return None
            if math.isinf(x):
                return "inf" if x > 0 else "-inf"
            return x
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        if isinstance(x, np.generic):
            return clean(x.item())
        if isinstance(x, np.ndarray):
            return clean(x.tolist())
        return x

    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(clean(obj), indent=2) + "\n")
    os.replace(tmp, path)


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / GB:.2f} GB" if n >= GB else f"{n / MB:.0f} MB"
