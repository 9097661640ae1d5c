"""Reading stored epochs after the fact: metrics over durable rows, with no lock (readers never block writers).

A split is either one directory ``<root>/<split>`` (one writer) or, for a DDP run, one shard per rank
``<root>/<split>.rank<r>`` (each rank writes its own: no file is shared between writers); readers
combine the shards of an epoch, each sample id counted once (see :mod:`oocmetrics.shards`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from oocmetrics.compute import Source
from oocmetrics.errors import StoreError
from oocmetrics.metrics import EpochMetrics, resolve_metrics
from oocmetrics.shards import Shard, compute_shards
from oocmetrics.store import (
    META, EpochInfo, check_split_name, open_epoch_arrays, open_epoch_labels, open_epoch_partials, open_root,
    read_json, scan_split,
)

__all__ = ["compute_stored", "open_stored_epoch", "open_stored_shards", "StoredShard", "split_dir", "splits",
           "shard_split_name", "logical_splits"]

_SHARD_RE = re.compile(r"^(?P<split>.+)\.rank(?P<rank>0|[1-9][0-9]*)$")


def shard_split_name(split: str, rank: int) -> str:
    """The directory name of rank ``rank``'s shard of ``split`` in a DDP run: ``<split>.rank<r>``."""
    return f"{split}.rank{rank}"


def splits(root: Path) -> list[str]:
    """Names of the split directories in a store root (DDP shards listed as their own directories)."""
    return sorted(e.name for e in root.iterdir()
                  if e.is_dir() and e.name != META and (e / "zarr.json").exists())


def logical_splits(root: Path) -> dict[str, list[str]]:
    """``{split: [its directories]}``: a plain split is one directory, a DDP split its shards in rank order."""
    out: dict[str, list[tuple[int, str]]] = {}
    for name in splits(root):
        m = _SHARD_RE.match(name)
        key, rank = (m.group("split"), int(m.group("rank"))) if m else (name, -1)
        out.setdefault(key, []).append((rank, name))
    return {k: [n for _, n in sorted(v)] for k, v in sorted(out.items())}


def split_dir(path: str | Path, split: str) -> Path:
    """The directory of ``split`` (one writer) in the store at ``path`` (StoreError naming what is missing)."""
    root = open_root(path, create=False)
    check_split_name(split)
    d = root / split
    if not (d / "zarr.json").exists():
        raise StoreError(f"No split {split!r} in {path}; stored splits: {sorted(logical_splits(root))}.")
    read_json(d / "zarr.json")
    return d


def _pick_epoch(d: Path, path: str | Path, split: str, epoch: int | None) -> int:
    stored, bad = scan_split(d)
    damaged = {int(name.split("=", 1)[1]): why for name, why in bad.items()}
    if not stored and not damaged:
        raise StoreError(f"Split {split!r} in {path} holds no epochs.")
    if epoch is None:
        epoch = max([*stored, *damaged])
    epoch = int(epoch)
    if epoch in damaged:
        raise StoreError(f"Epoch {epoch} of split {split!r} in {path} cannot be read: {damaged[epoch]}")
    return epoch


def open_stored_epoch(path: str | Path, split: str, epoch: int | None = None) -> tuple[Any, Any, EpochInfo]:
    """(y_true, y_pred, info) of a stored epoch (default: the last) of a one-writer split, for
    reading ``info.rows`` rows. For a DDP split use :func:`open_stored_shards`.

    A damaged epoch is a StoreError naming its file, also when it is the last one: never a silent
    fall-back to an older epoch.
    """
    root = open_root(path, create=False)
    check_split_name(split)
    if not (root / split / "zarr.json").exists() and len(logical_splits(root).get(split, [])) > 0:
        raise StoreError(
            f"Split {split!r} in {path} was written by a DDP run, one shard per rank "
            f"({logical_splits(root)[split]}); open it with oocmetrics.stored.open_stored_shards."
        )
    d = split_dir(path, split)
    return open_epoch_arrays(d, _pick_epoch(d, path, split, epoch))


@dataclass
class StoredShard:
    """One shard of a stored epoch: its arrays, info, stored partials and label arrays (ids, groups)."""

    y_true: Any
    y_pred: Any
    info: EpochInfo
    partials: Any
    labels: dict[str, Any]

    def as_shard(self) -> Shard:
        return Shard(self.y_true, self.y_pred, self.info.rows, self.partials, self.labels.get("ids"),
                     name=str(self.info.path))


def open_stored_shards(path: str | Path, split: str, epoch: int | None = None) -> list[StoredShard]:
    """The shards of a stored epoch (default: the last), in rank order: one for a one-writer split.

    For a DDP split, epoch ``k`` is read from every rank's shard of the run that wrote rank 0's
    epoch ``k``; a missing rank, or a shard left by another run, is a StoreError naming it.
    """
    root = open_root(path, create=False)
    check_split_name(split)
    dirs = logical_splits(root).get(split, [])
    if not dirs or (len(dirs) == 1 and dirs[0] == split):
        y_true, y_pred, info = open_stored_epoch(path, split, epoch)
        return [StoredShard(y_true, y_pred, info, open_epoch_partials(info), open_epoch_labels(info))]
    if split in dirs:
        raise StoreError(
            f"{root} holds split {split!r} both as one directory and as DDP shards {dirs}; move one away."
        )
    first = root / dirs[0]
    if dirs[0] != shard_split_name(split, 0):
        raise StoreError(f"Split {split!r} in {path} has shards {dirs} but no rank 0 ({first.parent / shard_split_name(split, 0)}).")
    epoch = _pick_epoch(first, path, dirs[0], epoch)
    y_true, y_pred, info = open_epoch_arrays(first, epoch)
    shard = info.shard or {}
    world, run = shard.get("world_size"), shard.get("run")
    if not isinstance(world, int) or world < 1:
        raise StoreError(f"{info.path / 'zarr.json'} does not say the DDP world size of its run (attribute 'shard').")
    out = [StoredShard(y_true, y_pred, info, open_epoch_partials(info), open_epoch_labels(info))]
    for rank in range(1, world):
        d = root / shard_split_name(split, rank)
        if not (d / "zarr.json").exists():
            raise StoreError(
                f"Epoch {epoch} of split {split!r} was written by {world} ranks, but rank {rank}'s shard "
                f"{d} is missing."
            )
        t, p, inf = open_epoch_arrays(d, epoch)
        other = inf.shard or {}
        if other.get("run") != run or other.get("rank") != rank or other.get("world_size") != world:
            raise StoreError(
                f"{inf.path} is not rank {rank}'s shard of the run that wrote {info.path} (its 'shard' "
                f"attribute: {other}; expected run {run!r}, world size {world})."
            )
        out.append(StoredShard(t, p, inf, open_epoch_partials(inf), open_epoch_labels(inf)))
    return out


def compute_stored(
    path: str | Path, split: str, epoch: int | None = None, *, metrics: Sequence[str] | None = None,
    progress: bool = False, scheduler: object = None, source: Source = "auto", quantiles: object = None,
) -> EpochMetrics:
    """Exact metrics over the durable rows of a stored epoch (default: the last) of ``split``.

    Takes no lock: it works while a recorder writes the split, and on the store of a crashed run.
    A DDP split's shards are combined, each sample id counted once (the same bits as the run's
    ``compute()``). ``source``: "auto" merges the partials stored with each chunk when they cover the
    durable rows, else reads the data; "data" always recomputes from the data (the same bits);
    "partials" requires them. ``quantiles``: also exact quantiles of |e| (per output and pooled) in
    ``result.quantiles``. ``scheduler``: a dask scheduler, e.g. a ``distributed.Client`` (its workers
    must see the store at the same path).
    """
    metrics = resolve_metrics(metrics)
    shards = open_stored_shards(path, split, epoch)
    info = shards[0].info
    if all(s.info.rows == 0 for s in shards):
        raise StoreError(f"Epoch {info.epoch} of split {split!r} in {path} has no durable rows.")
    result = compute_shards(
        [s.as_shard() for s in shards], source=source, metrics=metrics, progress=progress, scheduler=scheduler,
        epoch=info.epoch, split=split, quantiles=quantiles,
    )
    result.extra.update({"batches": sum(s.info.batches for s in shards),
                         "complete": all(s.info.complete for s in shards)})
    return result
