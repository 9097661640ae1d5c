"""The embedded default dataset: deterministic synthetic EMG-like recordings -> joint angles.

No download: the first run generates the recordings into ``<cache_dir>/synthetic-<hash>/`` in the
user-data format of ``trainer.data`` (``<name>_x.npy`` (T, C) float32 inputs, ``<name>_y.npy``
(T, J) float32 targets, ``split.json``), so the synthetic and the user path share one reader.

The model of the data, at 100 Hz: a few latent movement sources (sums of slow sinusoids with a slow
amplitude modulation) drive the joint angles (``tanh`` of a fixed linear mix, plus a per-subject
offset) and, about 50 ms earlier, the muscle activations seen by the sensors (``softplus`` of a
per-subject mix of the sources and their velocities, times a per-subject per-channel gain, with
multiplicative and additive noise and a slow per-channel drift). Subjects differ in gain, noise,
drift, electrode mix and offsets and recordings are ordered by subject, so the stream is
non-stationary like real data; train/val/test are split by subject.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from trainer.config import DataConfig

__all__ = ["ensure_synthetic", "synthetic_params", "FS_HZ"]

FS_HZ = 100.0  # sampling rate of the synthetic recordings
_LATENTS = 6  # latent movement sources
_LAG_STEPS = 5  # muscle activity leads movement by 50 ms
_VERSION = 2  # bump when the generator changes: old caches are then not reused


def synthetic_params(cfg: DataConfig) -> dict[str, int]:
    """The fields that determine the generated data (they name the cache directory)."""
    return {
        "version": _VERSION,
        "train_subjects": cfg.train_subjects, "val_subjects": cfg.val_subjects,
        "test_subjects": cfg.test_subjects, "recordings_per_subject": cfg.recordings_per_subject,
        "train_steps": cfg.train_steps, "eval_steps": cfg.eval_steps,
        "in_channels": cfg.in_channels, "joints": cfg.joints, "data_seed": cfg.data_seed,
    }


def ensure_synthetic(cfg: DataConfig) -> Path:
    """Return the synthetic dataset directory for ``cfg``, generating it on first use.

    Generation writes to a private temporary directory and renames it into place, so an interrupted
    or concurrent generation never leaves a half-written dataset behind.
    """
    params = synthetic_params(cfg)
    key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cfg.cache_dir)
    target = root / f"synthetic-{key}"
    if (target / "dataset.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _generate(tmp, params)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first (or a stale partial dir is in the way)
            if not (target / "dataset.json").is_file():
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _generate(out: Path, p: dict[str, int]) -> None:
    world = np.random.default_rng([p["data_seed"], 0])
    mix_joint = world.normal(0.0, 1.0 / np.sqrt(_LATENTS), size=(p["joints"], _LATENTS))
    mix_emg = world.normal(0.0, 1.0, size=(p["in_channels"], 2 * _LATENTS))
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    n_by_split = [("train", p["train_subjects"]), ("val", p["val_subjects"]), ("test", p["test_subjects"])]
    subject = 0
    for split, n_subjects in n_by_split:
        steps = p["train_steps"] if split == "train" else p["eval_steps"]
        for _ in range(n_subjects):
            subj = _subject(p, subject, mix_emg)
            for r in range(p["recordings_per_subject"]):
                name = f"s{subject:03d}_r{r:02d}"
                rng = np.random.default_rng([p["data_seed"], 2, subject, r])
                x, y = _recording(rng, steps, subj, mix_joint)
                np.save(out / f"{name}_x.npy", x)
                np.save(out / f"{name}_y.npy", y)
                splits[split].append(name)
            subject += 1
    (out / "split.json").write_text(json.dumps(splits, indent=1))
    meta = {"generator": "trainer.synthetic", "params": p, "fs_hz": FS_HZ,
            "inputs": "(T, C) float32 EMG-like envelopes", "targets": "(T, J) float32 joint angles (rad)"}
    (out / "dataset.json").write_text(json.dumps(meta, indent=1))


def _subject(p: dict[str, int], s: int, mix_emg: np.ndarray) -> dict[str, np.ndarray | float]:
    """Per-subject differences: electrode mix, gains, noise, drift, joint offsets."""
    rng = np.random.default_rng([p["data_seed"], 1, s])
    c = p["in_channels"]
    return {
        "mix_emg": mix_emg + 0.3 * rng.normal(size=mix_emg.shape),
        "bias": rng.normal(-0.5, 0.3, size=c),
        "gain": rng.lognormal(0.0, 0.25, size=c),
        "noise": float(rng.uniform(0.03, 0.25)),
        "drift": float(rng.uniform(0.0, 0.6)),
        "offset": rng.normal(0.0, 0.05, size=p["joints"]),
        "tempo": float(rng.uniform(0.7, 1.4)),
    }


def _latents(rng: np.random.Generator, t: np.ndarray, tempo: float) -> tuple[np.ndarray, np.ndarray]:
    """Movement sources z(t) and velocities dz/dt, each (T, K) float64."""
    z = np.zeros((t.size, _LATENTS))
    dz = np.zeros_like(z)
    for k in range(_LATENTS):
        f_mod = rng.uniform(0.005, 0.03)
        mod = 1.0 + 0.5 * np.sin(2 * np.pi * f_mod * t + rng.uniform(0, 2 * np.pi))
        for _ in range(3):
            f = tempo * rng.uniform(0.1, 1.5)
            a = rng.uniform(0.3, 1.0) / 1.5
            ph = 2 * np.pi * f * t + rng.uniform(0, 2 * np.pi)
            z[:, k] += a * np.sin(ph) * mod
            dz[:, k] += a * np.cos(ph) * mod * (2 * np.pi * f) / 4  # velocity, roughly unit scale
    return z, dz


def _recording(rng: np.random.Generator, steps: int, subj: dict, mix_joint: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    t = np.arange(steps + _LAG_STEPS) / FS_HZ
    z, dz = _latents(rng, t, subj["tempo"])
    y = 1.2 * np.tanh(z[:steps] @ mix_joint.T) + subj["offset"]
    drive = np.concatenate([z[_LAG_STEPS:], dz[_LAG_STEPS:]], axis=1) @ subj["mix_emg"].T + subj["bias"]
    act = np.logaddexp(0.0, drive)  # softplus: activations are non-negative
    c = act.shape[1]
    f_drift = rng.uniform(0.001, 0.01, size=c)
    drift = subj["drift"] * np.sin(2 * np.pi * f_drift * t[:steps, None] + rng.uniform(0, 2 * np.pi, size=c))
    mult = np.exp(0.15 * rng.standard_normal((steps, c), dtype=np.float32))
    add = subj["noise"] * rng.standard_normal((steps, c), dtype=np.float32)
    x = subj["gain"] * act * mult + add + drift
    return x.astype(np.float32), y.astype(np.float32)
