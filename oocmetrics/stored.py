"""Reading stored epochs after the fact: metrics over durable rows, with no lock (readers never block writers)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from oocmetrics.compute import Source, compute_store_arrays
from oocmetrics.errors import StoreError
from oocmetrics.metrics import EpochMetrics, resolve_metrics
from oocmetrics.store import (
    META, EpochInfo, check_split_name, open_epoch_arrays, open_epoch_partials, open_root, read_json, scan_split,
)

__all__ = ["compute_stored", "open_stored_epoch", "split_dir", "splits"]


def split_dir(path: str | Path, split: str) -> Path:
    """The directory of ``split`` in the store at ``path`` (StoreError naming what is missing)."""
    root = open_root(path, create=False)
    check_split_name(split)
    d = root / split
    if not (d / "zarr.json").exists():
        raise StoreError(f"No split {split!r} in {path}; stored splits: {splits(root)}.")
    read_json(d / "zarr.json")
    return d


def splits(root: Path) -> list[str]:
    """Names of the splits in a store root."""
    return sorted(e.name for e in root.iterdir()
                  if e.is_dir() and e.name != META and (e / "zarr.json").exists())


def open_stored_epoch(path: str | Path, split: str, epoch: int | None = None) -> tuple[Any, Any, EpochInfo]:
    """(y_true, y_pred, info) of a stored epoch (default: the last) for reading ``info.rows`` rows.

    A damaged epoch is a StoreError naming its file, also when it is the last one: never a silent
    fall-back to an older epoch.
    """
    d = split_dir(path, split)
    stored, bad = scan_split(d)
    damaged = {int(name.split("=", 1)[1]): why for name, why in bad.items()}
    if not stored and not damaged:
        raise StoreError(f"Split {split!r} in {path} holds no epochs.")
    if epoch is None:
        epoch = max([*stored, *damaged])
    epoch = int(epoch)
    if epoch in damaged:
        raise StoreError(f"Epoch {epoch} of split {split!r} in {path} cannot be read: {damaged[epoch]}")
    return open_epoch_arrays(d, epoch)


def compute_stored(
    path: str | Path, split: str, epoch: int | None = None, *, metrics: Sequence[str] | None = None,
    progress: bool = False, scheduler: object = None, source: Source = "auto", quantiles: object = None,
) -> EpochMetrics:
    """Exact metrics over the durable rows of a stored epoch (default: the last) of ``split``.

    Takes no lock: it works while a recorder writes the split, and on the store of a crashed run.
    ``source``: "auto" merges the partials stored with each chunk when they cover the durable rows,
    else reads the data; "data" always recomputes from the data (the same bits); "partials" requires them.
    ``quantiles``: also exact quantiles of |e| (per output and pooled) in ``result.quantiles``.
    """
    metrics = resolve_metrics(metrics)
    y_true, y_pred, info = open_stored_epoch(path, split, epoch)
    epoch = info.epoch
    if info.rows == 0:
        raise StoreError(f"Epoch {epoch} of split {split!r} in {path} has no durable rows.")
    result = compute_store_arrays(
        y_true, y_pred, info.rows, partials=open_epoch_partials(info), source=source, metrics=metrics,
        progress=progress, scheduler=scheduler, epoch=epoch, split=split, quantiles=quantiles,
    )
    result.extra.update({"batches": info.batches, "complete": info.complete})
    return result
