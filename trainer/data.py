"""Recordings on disk -> train/val/test batches of fixed-length windows, read lazily.

On-disk format (the synthetic dataset is written in it too; see docs/TRAINER.md):

* a directory holding, per recording ``<name>``, ``<name>_x.npy`` with inputs of shape (T, C) and
  ``<name>_y.npy`` with targets of shape (T, J) (any real dtype; batches are float32); T may differ
  between recordings, C and J may not;
* optionally ``split.json``: ``{"train": [names], "val": [names], "test": [names]}`` (recordings
  not listed are not used). Without it, recordings are sorted by name and the last
  ``--test-fraction`` go to test, the ``--val-fraction`` before them to val, the rest to train (name
  recordings ``<subject>_<n>`` to keep subjects together).

Arrays are opened with ``np.load(mmap_mode="r")``; a window is copied out only when its batch is
built, so memory does not grow with the dataset (the mapped pages are page cache the OS can drop).
Each recording gives ``(T - window) // stride + 1`` windows; trailing steps that do not fill a
window are not used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from trainer.config import DataConfig
from trainer.synthetic import ensure_synthetic

__all__ = ["DataError", "Recording", "Splits", "load_splits", "scan_dir", "WindowDataset", "Indexed", "make_loader"]

SPLITS = ("train", "val", "test")
_FORMAT = "a directory of <name>_x.npy (T, C) / <name>_y.npy (T, J) pairs (see docs/TRAINER.md)"


class DataError(ValueError):
    """The dataset on disk is unusable; the message names the file and the fix."""


@dataclass(frozen=True)
class Recording:
    """One recording: its two .npy files and their shapes (read from the headers only)."""

    name: str
    x_path: Path
    y_path: Path
    steps: int
    in_channels: int
    joints: int


@dataclass(frozen=True)
class Splits:
    """The recordings of each split, all with the same channel counts."""

    root: Path
    train: tuple[Recording, ...]
    val: tuple[Recording, ...]
    test: tuple[Recording, ...]
    in_channels: int
    joints: int

    def __getitem__(self, split: str) -> tuple[Recording, ...]:
        return getattr(self, split)


def load_splits(cfg: DataConfig) -> Splits:
    """The user's ``--data`` directory, or the synthetic dataset (generated on first use)."""
    if cfg.data is not None:
        return scan_dir(Path(cfg.data), window=cfg.window, val_fraction=cfg.val_fraction,
                        test_fraction=cfg.test_fraction)
    return scan_dir(ensure_synthetic(cfg), window=cfg.window)


def _header(path: Path, what: str) -> np.ndarray:
    """Open one .npy file memory-mapped (reads the header only) and check it is a 2-D real array."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: cannot be read as a .npy array ({e}); write it with np.save().") from e
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiu":
        raise DataError(f"{path}: {what} must be a real numeric array, but the dtype is "
                        f"{getattr(arr, 'dtype', type(arr))}; save it as float32.")
    if arr.ndim != 2:
        axes = "(T, C) = (time steps, channels)" if what == "inputs" else "(T, J) = (time steps, joints)"
        raise DataError(f"{path}: {what} must be 2-D {axes}, but have shape {arr.shape}; reshape it.")
    return arr


def _recording(root: Path, name: str, window: int) -> Recording:
    x_path, y_path = root / f"{name}_x.npy", root / f"{name}_y.npy"
    x, y = _header(x_path, "inputs"), _header(y_path, "targets")
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{x_path} has {x.shape[0]} time steps but {y_path.name} has {y.shape[0]}; "
                        "inputs and targets must be aligned step by step.")
    if x.shape[0] < window:
        raise DataError(f"{x_path}: {x.shape[0]} time steps is shorter than one window ({window}); "
                        "remove this recording or pass a smaller --window.")
    return Recording(name, x_path, y_path, int(x.shape[0]), int(x.shape[1]), int(y.shape[1]))


def _names(root: Path) -> list[str]:
    npz = sorted(root.glob("*.npz"))
    if npz:
        raise DataError(f"{npz[0]}: .npz archives cannot be memory-mapped; save each recording as "
                        f"<name>_x.npy and <name>_y.npy with np.save() instead.")
    xs = {p.name[: -len("_x.npy")] for p in root.glob("*_x.npy")}
    ys = {p.name[: -len("_y.npy")] for p in root.glob("*_y.npy")}
    for name in sorted(xs ^ ys):
        have, need = (f"{name}_x.npy", f"{name}_y.npy") if name in xs else (f"{name}_y.npy", f"{name}_x.npy")
        raise DataError(f"{root / have} has no matching {need}; add it or remove {have}.")
    if not xs:
        raise DataError(f"--data {root}: no recordings found; expected {_FORMAT}.")
    return sorted(xs)


def _split_names(root: Path, names: list[str], val_fraction: float, test_fraction: float
                 ) -> dict[str, list[str]]:
    split_file = root / "split.json"
    if split_file.is_file():
        try:
            split = json.loads(split_file.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{split_file}: not valid JSON ({e}).") from e
        if not isinstance(split, dict) or set(split) != set(SPLITS) or not all(
                isinstance(v, list) and all(isinstance(n, str) for n in v) for v in split.values()):
            raise DataError(f'{split_file}: expected {{"train": [names], "val": [names], "test": [names]}}.')
        seen: dict[str, str] = {}
        for s in SPLITS:
            if not split[s]:
                raise DataError(f"{split_file}: split {s!r} is empty; give it at least one recording.")
            for n in split[s]:
                if n not in names:
                    raise DataError(f"{split_file}: {s!r} lists {n!r}, but {root} has no "
                                    f"{n}_x.npy / {n}_y.npy.")
                if n in seen:
                    raise DataError(f"{split_file}: {n!r} is in both {seen[n]!r} and {s!r}; use it once.")
                seen[n] = s
        return {s: list(split[s]) for s in SPLITS}
    n = len(names)
    n_test, n_val = max(1, round(n * test_fraction)), max(1, round(n * val_fraction))
    if n - n_val - n_test < 1:
        raise DataError(f"--data {root}: {n} recording(s) cannot be split into train/val/test "
                        f"({n_val} val + {n_test} test leave none to train); add recordings or a split.json.")
    return {"train": names[: n - n_val - n_test], "val": names[n - n_val - n_test: n - n_test],
            "test": names[n - n_test:]}


def scan_dir(root: Path, *, window: int, val_fraction: float = 0.15, test_fraction: float = 0.15) -> Splits:
    """Validate a dataset directory and return its splits (reads headers only, not the data)."""
    if not root.exists():
        raise DataError(f"--data {root}: no such directory; pass {_FORMAT}.")
    if not root.is_dir():
        raise DataError(f"--data {root} is a file; pass {_FORMAT}.")
    names = _names(root)
    split = _split_names(root, names, val_fraction, test_fraction)
    recs = {s: tuple(_recording(root, n, window) for n in split[s]) for s in SPLITS}
    first = recs["train"][0]
    for r in (r for s in SPLITS for r in recs[s]):
        if r.in_channels != first.in_channels:
            raise DataError(f"{r.x_path} has {r.in_channels} input channels but {first.x_path.name} has "
                            f"{first.in_channels}; every recording needs the same channels.")
        if r.joints != first.joints:
            raise DataError(f"{r.y_path} has {r.joints} target columns but {first.y_path.name} has "
                            f"{first.joints}; every recording needs the same joints.")
    return Splits(root, recs["train"], recs["val"], recs["test"], first.in_channels, first.joints)


class WindowDataset(Dataset):
    """Windows of ``window`` steps every ``stride`` steps over a list of recordings.

    Item i is ``(x, y)``: float32 tensors of shape (window, C) and (window, J). Only a table of
    window counts lives in RAM; arrays are memory-mapped on first use.
    """

    def __init__(self, recordings: tuple[Recording, ...], *, window: int, stride: int) -> None:
        if not recordings:
            raise DataError("No recordings in this split; every split needs at least one.")
        self.recordings = recordings
        self.window, self.stride = window, stride
        counts = np.array([(r.steps - window) // stride + 1 for r in recordings], dtype=np.int64)
        self._ends = np.cumsum(counts)  # window index ends per recording
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return int(self._ends[-1])

    def _open(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        arrays = self._arrays.get(k)
        if arrays is None:
            r = self.recordings[k]
            arrays = self._arrays[k] = (np.load(r.x_path, mmap_mode="r"), np.load(r.y_path, mmap_mode="r"))
        return arrays

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range [0, {len(self)})")
        k = int(np.searchsorted(self._ends, i, side="right"))
        start = (i - (int(self._ends[k - 1]) if k else 0)) * self.stride
        x, y = self._open(k)
        sl = slice(start, start + self.window)
        # np.array copies the window out of the mapping (and casts to float32 if stored otherwise)
        return (torch.from_numpy(np.array(x[sl], dtype=np.float32)),
                torch.from_numpy(np.array(y[sl], dtype=np.float32)))


class Indexed(Dataset):
    """``ds`` whose item i is ``(x, y, i)``: the window's index is its sample id for oocmetrics."""

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        x, y = self.ds[i]
        return x, y, i


def make_loader(ds: WindowDataset, *, batch_size: int, shuffle: bool, seed: int = 0, workers: int = 0,
                pin_memory: bool = False, with_ids: bool = False,
                shard: tuple[int, int] | None = None) -> DataLoader:
    """Batches of (x, y) of shape (B, window, C), (B, window, J); shuffled by ``seed`` if asked.

    ``workers`` > 0 loads batches in that many processes; ``pin_memory`` (for a CUDA model) puts them
    in page-locked memory so the host-to-device copy can run asynchronously. ``with_ids``: batches
    are (x, y, ids), ids the windows' dataset indices. ``shard=(rank, world_size)``: this DDP rank's
    part of the data (``DistributedSampler``, which pads the last shards with copies of the first
    windows; their ids let oocmetrics count each window once).
    """
    data: Dataset = Indexed(ds) if with_ids else ds
    if shard is not None:
        sampler = DistributedSampler(data, num_replicas=shard[1], rank=shard[0], shuffle=shuffle, seed=seed)
        return DataLoader(data, batch_size=batch_size, sampler=sampler, num_workers=workers,
                          pin_memory=pin_memory, persistent_workers=False)
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=gen, num_workers=workers,
                      pin_memory=pin_memory, persistent_workers=False)
