"""The on-disk layout: a zarr v3 store ``<root>/<split>/epoch=<k>/{y_true, y_pred}``, and its writer.

Any zarr, xarray or dask reader reads it right: a finished epoch's arrays hold exactly ``rows`` rows,
and the arrays carry ``dimension_names``. ``rows`` in the epoch's attributes is the *durable* row
count: it is advanced only after both arrays' chunk is written, so after a crash a chunk is either
fully written and counted or not counted at all (an epoch whose run crashed may hold up to one
uncounted chunk beyond ``rows``).

Every change a crash could cut in half is made atomic:
- zarr 3 writes each file (chunk or ``zarr.json``) to a temporary name and renames it into place;
- an epoch group appears at once: it is built in ``<root>/.oocmetrics/tmp/<split>/`` and renamed
  into its split; it is deleted by renaming it there first, then removing it;
- an epoch rebuilt in another chunk grid is swapped in by two renames, rolled forward on the next
  open if a crash fell between them.
Leftovers in ``.oocmetrics/tmp`` are cleaned by the next writer of the split (under the split lock).

Writes are chunk-aligned: rows are buffered until a chunk is full and each chunk is written once,
whole (``Array.append`` and partial-chunk writes re-read and rewrite chunks).
"""
from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import queue
import re
import shutil
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zarr

from oocmetrics.errors import StoreError, WriterError
from oocmetrics.location import is_url, location

__all__ = [
    "StoreError", "WriterError", "EpochInfo", "EpochStore", "ChunkWriter", "open_root", "check_split_name",
    "list_epochs", "scan_split", "epoch_info", "open_epoch_arrays", "open_epoch_partials", "remove_epochs",
    "META", "meta_dir", "PARTIALS", "LABELS", "open_epoch_labels",
]

FORMAT = 1
ARRAYS = ("y_true", "y_pred")
PARTIALS = "partials"  # (chunks, fields, outputs) float64: each chunk's partials, computed as it was written
LABELS = ("ids", "groups")  # optional int64 per-row arrays: sample ids (deduplication) and group ids
META = ".oocmetrics"  # a zarr group of its own (so zarr lists it without warnings): locks and tmp
_TAG = "oocmetrics"
_EPOCH_RE = re.compile(r"^epoch=(0|[1-9][0-9]*)$")
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,99}$")
_REQUIRED = ("epoch", "rows", "batches", "complete", "run_id", "trailing_shape", "chunk_rows")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def epoch_name(epoch: int) -> str:
    return f"epoch={epoch}"


_SHARD_SUFFIX_RE = re.compile(r"\.rank[0-9]+$")


def check_split_name(split: Any, *, shard: bool = False) -> str:
    """A split name that is one safe directory name: letters, digits, ``_ . -``; not ``zarr.json``.

    Names ending in ``.rank<digits>`` are the directories of DDP shards (``shard=True``), not splits.
    """
    if not isinstance(split, str) or not _SPLIT_RE.match(split) or split == "zarr.json" or split.endswith(".json") \
            or (not shard and _SHARD_SUFFIX_RE.search(split)):
        raise ValueError(
            f"split={split!r} is not a valid name: use letters, digits, '_', '.' or '-' (not starting "
            f"with '.' or '-', at most 100 characters, not ending in '.json' or '.rank<digits>', which "
            f"names DDP shards), e.g. 'train', 'val', 'test'."
        )
    return split


def read_json(path: Path) -> dict[str, Any]:
    """A metadata file's JSON; a clear StoreError naming the file if it is unreadable."""
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path} is damaged and cannot be read ({exc}); restore or delete it.") from exc
    if not isinstance(data, dict):
        raise StoreError(f"{path} is damaged: expected a JSON object, got {type(data).__name__}.")
    return data


def _attrs(path: Path) -> dict[str, Any]:
    return dict(read_json(path / "zarr.json").get("attributes") or {})


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_root(path: Any, *, create: bool) -> Path:
    """Check (or create) the store root, refusing a directory that is not an oocmetrics store.

    For reading (``create=False``) ``path`` may be an fsspec URL (see :mod:`oocmetrics.location`).
    """
    if is_url(path) and create:
        raise StoreError(
            f"{path} is a URL: a Recorder writes to a local path (it needs atomic renames and file "
            f"locks). Record locally (or on a shared mount) and read the store from the URL."
        )
    p = location(path)
    if p.exists() and not p.is_dir():
        raise StoreError(f"{p} is a file, not a store directory; pass another path.")
    meta = p / "zarr.json"
    if p.is_dir() and not meta.exists() and any(p.iterdir()):
        raise StoreError(
            f"{p} exists and holds other files but is not an oocmetrics store (no zarr.json); "
            f"pass an empty or new directory."
        )
    if not meta.exists():
        if not create:
            raise StoreError(f"No oocmetrics store at {p}; record one with oocmetrics.Recorder first.")
        p.mkdir(parents=True, exist_ok=True)
        # One write of zarr.json, attributes included: a crash leaves no untagged root behind.
        try:
            zarr.open_group(str(p), mode="a", zarr_format=3, attributes={_TAG: {"format": FORMAT, "created": _now()}})
            return p
        except zarr.errors.ContainsGroupError:
            pass  # another process created it a moment ago: check what it wrote
    doc = read_json(meta)
    tag = (doc.get("attributes") or {}).get(_TAG)
    if tag is None and doc.get("zarr_format") == 3 and not doc.get("attributes") and create and \
            {e.name for e in p.iterdir()} <= {"zarr.json", META}:
        # an empty, untagged root: what an older version left when killed while creating the store
        zarr.open_group(str(p), mode="r+").attrs[_TAG] = {"format": FORMAT, "created": _now()}
        return p
    if doc.get("zarr_format") != 3 or not isinstance(tag, dict) or tag.get("format") != FORMAT:
        raise StoreError(
            f"{p} is a zarr store written by another program or format ({meta}: attributes[{_TAG!r}] = "
            f"{tag!r}, expected format {FORMAT}); pass another path."
        )
    return p


def ensure_split(root: Path, split: str) -> Path:
    """The split's directory, created as a zarr group if missing."""
    d = root / split
    if not (d / "zarr.json").exists():
        zarr.open_group(str(root), mode="r+").create_group(split, attributes={_TAG: {"format": FORMAT, "split": split}})
    else:
        read_json(d / "zarr.json")  # damaged metadata: say so now, naming the file
    return d


def meta_dir(root: Path) -> Path:
    """``<root>/.oocmetrics``: a zarr group of our own for lock files and tmp dirs (zarr lists it quietly)."""
    meta = root / META
    if not (meta / "zarr.json").exists():
        zarr.open_group(str(root), mode="r+").require_group(META)
    return meta


def tmp_dir(root: Path, split: str) -> Path:
    """``<root>/.oocmetrics/tmp/<split>``: staging and trash of one split's writer."""
    d = meta_dir(root) / "tmp" / split
    d.mkdir(parents=True, exist_ok=True)
    return d


# ------------------------------------------------------------------------------------------ reading
@dataclass(frozen=True)
class EpochInfo:
    """What an epoch's attributes say about it."""

    epoch: int
    rows: int
    batches: int
    complete: bool
    run_id: str
    trailing_shape: tuple[int, ...]
    chunk_rows: int
    created: str
    updated: str
    path: Path = field(compare=False)
    labels: tuple[str, ...] = ()  # which of LABELS the epoch stores, row for row with the data
    shard: dict[str, Any] | None = field(default=None, compare=False)  # under DDP: split, rank, world_size, run

    @classmethod
    def from_dir(cls, path: Path) -> "EpochInfo":
        """Read ``path/zarr.json``; StoreError if it is damaged or not an oocmetrics epoch."""
        attrs = _attrs(path)
        missing = [k for k in _REQUIRED if k not in attrs]
        if missing or not all((path / a / "zarr.json").exists() for a in ARRAYS):
            raise StoreError(
                f"{path} is not an epoch written by oocmetrics (attributes {missing} or arrays "
                f"{list(ARRAYS)} missing); move it out of the split or delete it."
            )
        try:
            return cls(
                epoch=int(attrs["epoch"]), rows=int(attrs["rows"]), batches=int(attrs["batches"]),
                complete=bool(attrs["complete"]), run_id=str(attrs["run_id"]),
                trailing_shape=tuple(int(v) for v in attrs["trailing_shape"]),
                chunk_rows=int(attrs["chunk_rows"]), created=str(attrs.get("created", "")),
                updated=str(attrs.get("updated", "")), path=path,
                labels=tuple(str(v) for v in attrs.get("labels", ()) if v in LABELS),
                shard=attrs.get("shard") if isinstance(attrs.get("shard"), dict) else None,
            )
        except (TypeError, ValueError) as exc:
            raise StoreError(f"{path / 'zarr.json'} has malformed oocmetrics attributes ({exc}).") from exc


def scan_split(split_dir: Path) -> tuple[dict[int, EpochInfo], dict[str, str]]:
    """The split's epochs: ``({k: info}, {name: why unusable})`` for every ``epoch=<k>`` directory."""
    good: dict[int, EpochInfo] = {}
    bad: dict[str, str] = {}
    try:
        entries = sorted(split_dir.iterdir(), key=lambda e: e.name)
    except FileNotFoundError:
        return good, bad
    for entry in entries:
        m = _EPOCH_RE.match(entry.name)
        if not m or not entry.is_dir():
            continue
        try:
            good[int(m.group(1))] = EpochInfo.from_dir(entry)
        except FileNotFoundError:
            bad[entry.name] = "no zarr.json (not a zarr group)"
        except StoreError as exc:
            bad[entry.name] = str(exc)
    return dict(sorted(good.items())), bad


def list_epochs(split_dir: Path) -> list[int]:
    """Epoch numbers stored by oocmetrics in a split, ascending (foreign or damaged groups left out)."""
    return list(scan_split(split_dir)[0])


def epoch_info(split_dir: Path, epoch: int) -> EpochInfo:
    path = split_dir / epoch_name(epoch)
    if not path.is_dir():
        raise StoreError(f"No epoch {epoch} in {split_dir}; stored epochs: {list_epochs(split_dir)}.")
    try:
        return EpochInfo.from_dir(path)
    except FileNotFoundError:
        raise StoreError(f"{path} is not a zarr group (no zarr.json); move it out of the split.") from None


def open_epoch_partials(info: EpochInfo) -> zarr.Array | None:
    """An epoch's stored per-chunk partials, or None (a store written before they existed, or damaged)."""
    try:
        read_json(info.path / PARTIALS / "zarr.json")
        return zarr.open_array(str(info.path / PARTIALS), mode="r")
    except Exception:  # missing or damaged: the data are still there to compute from
        return None


def open_epoch_labels(info: EpochInfo) -> dict[str, zarr.Array]:
    """The per-row label arrays (``ids``, ``groups``) a stored epoch holds, by name."""
    out = {}
    for name in info.labels:
        read_json(info.path / name / "zarr.json")
        try:
            out[name] = zarr.open_array(str(info.path / name), mode="r")
        except Exception as exc:  # zarr's own errors for metadata it cannot use
            raise StoreError(f"{info.path / name / 'zarr.json'} cannot be opened by zarr ({exc}).") from exc
    return out


def open_epoch_arrays(split_dir: Path, epoch: int) -> tuple[zarr.Array, zarr.Array, EpochInfo]:
    """The y_true/y_pred arrays of a stored epoch for reading, with its info (read ``info.rows`` rows)."""
    info = epoch_info(split_dir, epoch)
    arrays = []
    for name in ARRAYS:
        read_json(info.path / name / "zarr.json")
        try:
            arrays.append(zarr.open_array(str(info.path / name), mode="r"))
        except Exception as exc:  # zarr's own errors for metadata it cannot use
            raise StoreError(f"{info.path / name / 'zarr.json'} cannot be opened by zarr ({exc}).") from exc
    return arrays[0], arrays[1], info


# ------------------------------------------------------------------------------ crash-safe changes
def _discard(path: Path, trash: Path) -> None:
    """Remove a directory so that a crash leaves it either whole in place or gone from the split."""
    dest = trash / f"trash-{uuid.uuid4().hex}"
    os.rename(path, dest)
    shutil.rmtree(dest, ignore_errors=True)


def remove_epochs(root: Path, split: str, epochs: list[int]) -> None:
    """Delete epochs, newest first: a crash part-way leaves the older ones as an unbroken run."""
    trash = tmp_dir(root, split)
    for e in sorted(epochs, reverse=True):
        path = root / split / epoch_name(e)
        if path.exists():
            _discard(path, trash)


_STALE_S = 60.0  # a root-level zarr temporary file this old is a crash leftover, not a write in flight
_PARTIAL_RE = re.compile(r"\.[0-9a-f]{32}\.partial$")


def recover_split(root: Path, split: str) -> None:
    """Finish what a crashed writer of this split left behind (caller holds the split lock).

    Rolls an interrupted swap forward, empties the split's tmp dir, and removes the temporary files
    of zarr writes that a kill cut short (``*.<uuid>.partial``; zarr's listings warn about them).
    The store root is shared with the writers of other splits (zarr may rewrite the root's
    ``zarr.json`` while one creates its split): there only leftovers older than a minute go.
    """
    now = time.time()
    for entry in os.scandir(root):
        if entry.is_file() and _PARTIAL_RE.search(entry.name):
            try:
                if now - entry.stat().st_mtime > _STALE_S:
                    os.unlink(entry.path)
            except FileNotFoundError:  # renamed into place by its writer meanwhile
                pass
    for dirpath, _, files in os.walk(root / split):
        for name in files:
            if _PARTIAL_RE.search(name):
                os.unlink(os.path.join(dirpath, name))
    tmp = tmp_dir(root, split)
    for entry in sorted(os.scandir(tmp), key=lambda e: e.name):
        path = Path(entry.path)
        m = re.match(r"^swap-(epoch=\d+)-[0-9a-f]+$", entry.name)
        if m and not (root / split / m.group(1)).exists():
            os.rename(path, root / split / m.group(1))  # roll the interrupted swap forward
        else:
            shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class EpochSpec:
    """What the writer needs to create an epoch on disk."""

    root: Path
    split: str
    epoch: int
    trailing: tuple[int, ...]
    dtypes: tuple[np.dtype, np.dtype]
    compressors: Any
    run_id: str
    fsync: bool = False
    attrs: dict[str, Any] = field(default_factory=dict)
    partial_fields: tuple[str, ...] = ()  # names of the partials' fields; () stores no partials
    labels: tuple[str, ...] = ()  # int64 per-row arrays stored beside the data (see LABELS)


def _dimension_names(ndim: int) -> tuple[str, ...]:
    if ndim == 1:
        return ("row",)
    middle = ("step",) if ndim == 3 else tuple(f"axis{i}" for i in range(1, ndim - 1))
    return ("row", *middle, "output")


def _build(spec: EpochSpec, chunk_rows: int, dest: Path) -> None:
    g = zarr.open_group(str(dest), mode="w", zarr_format=3)
    for name, dtype in zip(ARRAYS, spec.dtypes):
        g.create_array(
            name, shape=(0, *spec.trailing), chunks=(chunk_rows, *spec.trailing), dtype=dtype,
            compressors=spec.compressors, filters=None, fill_value=0.0,
            dimension_names=_dimension_names(1 + len(spec.trailing)),
            # Every chunk we write is real data: skip zarr's all-equal-to-fill scan, a full extra
            # pass over each chunk that measured 5x slower writes.
            config={"write_empty_chunks": True},
        )
    for name in spec.labels:
        g.create_array(
            name, shape=(0,), chunks=(chunk_rows,), dtype=np.int64, compressors=None, filters=None,
            fill_value=0, dimension_names=("row",), config={"write_empty_chunks": True},
        )
    if spec.partial_fields:
        J = spec.trailing[-1] if spec.trailing else 1
        g.create_array(
            PARTIALS, shape=(0, len(spec.partial_fields), J), chunks=(1, len(spec.partial_fields), J),
            dtype=np.float64, compressors=None, filters=None, fill_value=0.0,
            dimension_names=("chunk", "field", "output"), attributes={"fields": list(spec.partial_fields)},
            config={"write_empty_chunks": True},
        )
    now = _now()
    g.attrs.update({
        "epoch": spec.epoch, "rows": 0, "batches": 0, "complete": False, "run_id": spec.run_id,
        "trailing_shape": list(spec.trailing), "chunk_rows": chunk_rows, "created": now, "updated": now,
        "labels": list(spec.labels), **spec.attrs,
    })


class EpochStore:
    """The two arrays of one epoch being written, and its durable row count."""

    def __init__(self, spec: EpochSpec, path: Path):
        self.spec = spec
        self.path = path
        self.group = zarr.open_group(str(path), mode="r+")
        # write_empty_chunks is a runtime setting, not stored with the array: set it on every open.
        # Without it zarr scans each chunk for fill values and skips writing an all-zero chunk,
        # which a reader would then find missing.
        def member(name: str) -> zarr.Array:
            return self.group[name].with_config({"write_empty_chunks": True})

        self.arrays = {name: member(name) for name in ARRAYS}
        self.labels = {name: member(name) for name in spec.labels}
        self.partials = member(PARTIALS) if spec.partial_fields else None
        attrs = dict(self.group.attrs)
        self.chunk_rows = int(attrs["chunk_rows"])
        self.rows = int(attrs["rows"])
        self.shape0 = int(self.arrays["y_true"].shape[0])

    @classmethod
    def create(cls, spec: EpochSpec, chunk_rows: int) -> "EpochStore":
        """Build the epoch in the split's tmp dir, then rename it into place (atomic)."""
        dest = spec.root / spec.split / epoch_name(spec.epoch)
        if dest.exists():
            raise StoreError(f"{dest} already exists; it is not this recorder's to overwrite.")
        staging = tmp_dir(spec.root, spec.split) / f"new-{uuid.uuid4().hex}"
        _build(spec, chunk_rows, staging)
        os.rename(staging, dest)
        if spec.fsync:
            _fsync_path(dest.parent)
        return cls(spec, dest)

    def rebuild(
        self, chunk_rows: int, t: np.ndarray, p: np.ndarray, n: int, batches: int, partials: "np.ndarray | Future[np.ndarray] | None",
        labels: dict[str, np.ndarray] | None = None,
    ) -> "EpochStore":
        """The same epoch in another chunk grid, holding rows [0, n) of (t, p), swapped in atomically."""
        tmp = tmp_dir(self.spec.root, self.spec.split)
        staging = tmp / f"swap-{epoch_name(self.spec.epoch)}-{uuid.uuid4().hex}"
        _build(self.spec, chunk_rows, staging)
        new = EpochStore(self.spec, staging)
        new.write_chunk(0, t, p, n, batches=batches, partials=partials, labels=labels)
        _discard(self.path, tmp)  # a crash here leaves the swap dir, rolled forward by recover_split
        os.rename(staging, self.path)
        if self.spec.fsync:
            _fsync_path(self.path.parent)
        return EpochStore(self.spec, self.path)

    def check_present(self) -> None:
        """StoreError if the epoch's directory was deleted or replaced behind our back."""
        try:
            attrs = _attrs(self.path)
        except FileNotFoundError:
            raise StoreError(
                f"{self.path} vanished while this recorder was writing it (deleted by another program?); "
                f"{self.rows} rows were durable there. Nothing more can be written to it."
            ) from None
        if attrs.get("run_id") != self.spec.run_id or int(attrs.get("rows", -1)) != self.rows:
            raise StoreError(
                f"{self.path} was replaced or changed by another writer (run {attrs.get('run_id')}, "
                f"rows {attrs.get('rows')}; this recorder wrote run {self.spec.run_id}, rows {self.rows})."
            )

    def _chunk_files(self, index: int) -> list[Path]:
        arrays = {**self.arrays, **self.labels, **({PARTIALS: self.partials} if self.partials is not None else {})}
        return [self.path / name / chunk_key(arr, index) for name, arr in arrays.items()]

    def write_chunk(
        self, index: int, t: np.ndarray, p: np.ndarray, n: int, *, batches: int,
        partials: "np.ndarray | Future[np.ndarray] | None" = None, labels: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Store rows [index*chunk_rows, +n) of both arrays, their labels (ids, groups) and the chunk's
        partials, then advance the durable row count (so all of them survive a crash with the rows).

        The arrays are first sized to exactly the rows written so far, so a chunk is always written
        whole (a full chunk, or the edge chunk) and never read back.
        """
        self.check_present()
        start = index * self.chunk_rows
        end = start + n
        if end != self.shape0:
            for arr in (*self.arrays.values(), *self.labels.values()):
                arr.resize((end, *arr.shape[1:]))
            self.shape0 = end
        for name, buf in zip(ARRAYS, (t, p)):
            self.arrays[name][start:end] = buf[:n]
        for name, arr in self.labels.items():
            if labels is None or name not in labels:
                raise StoreError(f"chunk {index} of {self.path} came without its {name!r}; this is a bug.")
            arr[start:end] = labels[name][:n]
        if self.partials is not None and partials is not None:
            if isinstance(partials, Future):  # computed while the data above was being written
                partials = partials.result()
            if self.partials.shape[0] != index + 1:
                self.partials.resize((index + 1, *self.partials.shape[1:]))
            self.partials[index] = partials
        if self.spec.fsync:
            for f in self._chunk_files(index):
                _fsync_path(f)
        self._set_attrs(rows=max(self.rows, end), batches=batches, complete=False)
        self.rows = max(self.rows, end)

    def mark_complete(self, batches: int) -> None:
        self.check_present()
        self._set_attrs(batches=batches, complete=True)

    def _set_attrs(self, **values: Any) -> None:
        self.group.attrs.update({**values, "updated": _now()})
        if self.spec.fsync:
            _fsync_path(self.path / "zarr.json")
            _fsync_path(self.path)


def chunk_key(arr: zarr.Array, index: int) -> str:
    """The store key of row-chunk ``index`` of an array chunked along rows only (e.g. ``c/3/0/0``)."""
    return arr.metadata.encode_chunk_key((index,) + (0,) * (arr.ndim - 1))


def describe_oserror(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk is full ({exc})"
    return f"{type(exc).__name__}: {exc}"


# ------------------------------------------------------------------------------------------ writer
@dataclass
class Job:
    """One unit of the writer's work, done in submission order."""

    kind: str  # "chunk" or "complete"
    index: int = 0
    t: np.ndarray | None = None
    p: np.ndarray | None = None
    n: int = 0
    batches: int = 0
    seal: bool = False  # a partial last chunk (flush): the buffer stays with the recorder
    recycle: bool = True  # hand the buffers back to the pool once written
    labels: dict[str, np.ndarray] | None = None  # per-row label buffers (ids, groups), part of the buffer set
    # A chunk staged on a device (``oocmetrics.capture.ReadyChunk``): the writer calls ``ready.wait()``
    # before reading t/p/labels (it blocks on the copy's event, and raises NonFiniteBatchError for a
    # chunk holding NaN/Inf), and ``ready.release()`` once the chunk is written. Never recycled.
    ready: Any = None

    def buffers(self) -> tuple[np.ndarray, ...]:
        """The buffer set this job writes from, as :meth:`ChunkWriter.acquire` handed it out."""
        return (self.t, self.p, *(self.labels or {}).values())  # type: ignore[return-value]


class ChunkWriter:
    """Background thread that creates the epoch on disk and writes its chunks in order.

    The caller takes a free buffer set with :meth:`acquire` (which blocks while every buffer is in
    flight: backpressure) and hands jobs to :meth:`submit`. Jobs may instead carry a device-staged
    chunk (``Job.ready``, with ``make_buffers=None``): its buffers belong to the stager, which gets
    them back by ``ready.release()`` after the write. The epoch is created on disk by
    ``open_store(chunk_rows)`` at the first job, so an epoch with no rows never appears. After a
    failure the thread keeps the failed job and everything after it and waits; :meth:`retry` starts
    again from the failed job. The thread ends only at :meth:`close`.
    """

    def __init__(
        self, open_store: Callable[[int], EpochStore], chunk_rows: int,
        make_buffers: Callable[[], tuple[np.ndarray, ...]] | None, n_buffers: int,
        reduce: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    ):
        self.store: EpochStore | None = None
        self._reduce = reduce  # partials of a chunk's rows, computed here while it is in memory
        self._reducer: ThreadPoolExecutor | None = None
        self.chunk_rows = chunk_rows
        self._open_store = open_store
        self._make_buffers = make_buffers
        self._n_buffers = n_buffers
        self._made = 0
        self._free: queue.SimpleQueue[tuple[np.ndarray, ...]] = queue.SimpleQueue()
        self._jobs: list[Job] = []
        self._cv = threading.Condition()
        self._busy = False
        self.error: BaseException | None = None
        self.failed_job: Job | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="oocmetrics-writer", daemon=True)
        self._thread.start()

    @property
    def durable_rows(self) -> int:
        return self.store.rows if self.store is not None else 0

    # -- training-thread side -------------------------------------------------------------------
    def acquire(self, held: int = 0) -> tuple[np.ndarray, ...]:
        """A free chunk buffer set (y_true, y_pred[, ids][, groups]); waits while all are in flight (backpressure).

        ``held``: buffers the caller holds and has not submitted. When no buffer is in flight (all
        are held: a batch spans more chunks than the pool), or the writer has failed, one more pair
        is made rather than wait for ever; extra pairs are dropped again once written.
        """
        if self._make_buffers is None:
            raise RuntimeError(
                "ChunkWriter.acquire() on a writer built with make_buffers=None (device-staged chunks bring "
                "their own buffers in Job.ready); pass make_buffers to use acquire()."
            )
        while True:
            try:
                return self._free.get_nowait()
            except queue.Empty:
                pass
            with self._cv:
                make = self._made < self._n_buffers or self._made <= held or self.error is not None
                if make:
                    self._made += 1
            if make:
                return self._make_buffers()
            try:
                return self._free.get(timeout=0.05)
            except queue.Empty:
                continue

    def release(self, bufs: tuple[np.ndarray, ...]) -> None:
        """Give back a buffer pair taken with :meth:`acquire` but not submitted."""
        self._free.put(bufs)

    def submit(self, jobs: list[Job]) -> None:
        """Queue jobs (all at once: an interrupted caller never queues half a batch)."""
        with self._cv:
            self._jobs.extend(jobs)
            self._cv.notify_all()

    def wait(self) -> None:
        """Block until every submitted job is done; return early if the writer has failed."""
        with self._cv:
            while (self._jobs or self._busy) and self.error is None:
                if not self._thread.is_alive():
                    raise StoreError("the oocmetrics writer thread stopped unexpectedly; this is a bug.")
                self._cv.wait(0.1)

    def retry(self) -> None:
        """Clear a failure and do the held jobs again, starting with the one that failed."""
        with self._cv:
            if self.error is None:
                return
            if self.failed_job is not None:
                self._jobs.insert(0, self.failed_job)
            self.failed_job = None
            self.error = None
            self._cv.notify_all()

    def discard(self) -> list[Job]:
        """Give up the failed job and every job queued after it; clear the failure. Returns them.

        For a failure that retrying cannot fix (a device chunk holding NaN/Inf): the caller has
        already dropped those rows. Buffers of recycled jobs go back to the pool; device chunks are
        not released (the stager's ``rewind`` discards them). RuntimeError when nothing has failed
        (the thread may be writing: jobs cannot be taken back then).
        """
        with self._cv:
            if self.error is None:
                raise RuntimeError(
                    "ChunkWriter.discard() with no failure to discard; use wait() to let the jobs finish."
                )
            dropped = ([self.failed_job] if self.failed_job is not None else []) + self._jobs
            self._jobs = []
            self.failed_job = None
            self.error = None
            for job in dropped:
                if job.kind == "chunk" and job.recycle and job.ready is None:
                    self._free.put(job.buffers())
            self._cv.notify_all()
            return dropped

    def drain_free(self) -> list[tuple[np.ndarray, ...]]:
        """The idle buffer pairs (for reuse by the next epoch)."""
        out = []
        while True:
            try:
                out.append(self._free.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        """Stop the thread (held jobs are dropped: call only once they are done or given up)."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join()
        if self._reducer is not None:
            self._reducer.shutdown(wait=True)
            self._reducer = None

    # -- writer-thread side ---------------------------------------------------------------------
    def _do(self, job: Job) -> None:
        if job.kind == "complete":
            if self.store is not None:
                self.store.mark_complete(job.batches)
            return
        assert job.t is not None and job.p is not None
        if job.ready is not None:
            job.ready.wait()  # the device copy has landed (and the chunk is finite): only now read t/p
        # An epoch that fits in one chunk is stored in a chunk grid of exactly its rows (a padded
        # 8 MiB chunk for a 40-row epoch would be 99% zeros); if it grows later it is rebuilt.
        want = job.n if (job.index == 0 and job.seal) else self.chunk_rows
        # The chunk's partials are computed on a second thread while its data is written (the numba
        # kernel and zarr's file writes both release the GIL); write_chunk waits for them before it
        # stores them and advances the row count.
        parts: Future | None = None
        if self._reduce is not None:
            if self._reducer is None:
                self._reducer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="oocmetrics-reduce")
            parts = self._reducer.submit(self._reduce, job.t[:job.n], job.p[:job.n])
        if self.store is None:
            self.store = self._open_store(want)
        elif job.index == 0 and self.store.chunk_rows != want:
            self.store = self.store.rebuild(want, job.t, job.p, job.n, job.batches, parts, job.labels)
            return
        self.store.write_chunk(job.index, job.t, job.p, job.n, batches=job.batches, partials=parts, labels=job.labels)

    def _run(self) -> None:
        while True:
            with self._cv:
                while (not self._jobs or self.error is not None) and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                job = self._jobs.pop(0)
                self._busy = True
            try:
                self._do(job)
            except BaseException as exc:  # surfaced on the training thread, never swallowed
                with self._cv:
                    self.error = exc
                    self.failed_job = job
                    self._busy = False
                    self._cv.notify_all()
                continue
            if job.ready is not None:
                job.ready.release()  # before _busy clears: wait() returning means every slot is back
            with self._cv:
                if job.kind == "chunk" and job.recycle and job.ready is None:
                    if self._made > self._n_buffers:
                        self._made -= 1  # an extra pair made for one big batch: let it go
                    else:
                        self._free.put(job.buffers())
                self._busy = False
                self._cv.notify_all()
