"""The training-loop API: ``update`` per batch, ``compute`` at epoch end, ``reset`` for the next epoch.

The recorder validates each batch once, copies it into a chunk-sized buffer (the only copy on the
training thread), and hands full chunks to a background :class:`~oocmetrics.store.ChunkWriter`.
Memory is bounded by ``(queue_chunks + 1)`` chunk buffers per array, whatever the epoch size.

Guarantees (tested with real SIGKILLs, injected ENOSPC, two writers and Ctrl-C):
- a batch is recorded whole or not at all, whatever interrupts ``update``;
- rows are *durable* (survive a crash of the process) once their chunk is written: at every full
  chunk, and at ``flush``/``compute``/``reset``/``close``; ``fsync=True`` makes them survive power loss;
- a write failure loses nothing: the rows stay held in memory until ``retry()`` writes them;
- one writer per split (a file lock); readers need no lock;
- an epoch is marked complete only by ``reset()`` or ``close()``, never by an exception.

They hold on both paths a batch can take. NumPy arrays and CPU tensors are copied into host chunk
buffers as above. An epoch whose first batch is a pair of CUDA tensors is staged on the device
(:class:`~oocmetrics.capture.DeviceStager`): one device copy per batch, each full chunk leaves by one
non-blocking copy into pinned memory that the writer waits for, so ``update`` never syncs. There
the NaN/Inf check also runs on the device, per chunk: a bad batch is reported at the next chunk
boundary (see :class:`Recorder`, ``nonfinite``).
"""
from __future__ import annotations

import copy
import os
import signal
import sys
import threading
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, NoReturn

import numpy as np

from oocmetrics.compute import SPLIT_EVERY, Source, block_partials, check_quantiles
from oocmetrics.errors import StoreError, WriterError
from oocmetrics.exchange import Exchange, ddp_world
from oocmetrics.location import is_url
from oocmetrics.lock import SplitLock
from oocmetrics.kernels.moments import FIELDS
from oocmetrics.metrics import EpochMetrics, resolve_metrics
from oocmetrics.shards import Shard, compute_shards
from oocmetrics.store import (
    LABELS, ChunkWriter, EpochSpec, EpochStore, Job, check_split_name, describe_oserror, ensure_split,
    epoch_name, list_epochs, meta_dir, open_root, recover_split, remove_epochs, scan_split,
)
from oocmetrics.stored import shard_split_name
from oocmetrics.validation import NonFinite, check_batch, check_epoch_number, check_labels, store_dtype

Mode = Literal["create", "overwrite", "resume"]
_MB = 1 << 20

# Tests only: route CPU torch tensors through the device path (a DeviceStager on device="cpu") as if
# they were CUDA tensors, so that path runs on machines without a GPU. Set with monkeypatch.
_DEVICE_PATH_FOR_CPU_TENSORS = False


def _on_device(y_true: Any, y_pred: Any) -> bool:
    """Whether an epoch starting with this batch takes the device path (a CUDA tensor pair)."""
    torch = sys.modules.get("torch")  # torch is not a dependency: no torch loaded, no tensors
    if torch is None or not isinstance(y_true, torch.Tensor) or not isinstance(y_pred, torch.Tensor):
        return False
    if _DEVICE_PATH_FOR_CPU_TENSORS and y_true.device.type == y_pred.device.type == "cpu":
        return True
    if not (y_true.is_cuda and y_pred.is_cuda):
        return False
    from oocmetrics.capture import is_cuda_batch

    return is_cuda_batch(y_true, y_pred)


class _WriterFailed(Exception):
    """Raised by the stager's poll when the writer has failed: it will release no more chunk slots."""


@dataclass(frozen=True)
class _Pos:
    """Where the current epoch stands; replaced in one assignment, so an interrupt sees old or new."""

    rows: int = 0
    batches: int = 0
    fill: int = 0  # rows in the current buffer
    chunk_index: int = 0  # index of the chunk the current buffer will become
    buf: tuple[np.ndarray, ...] | None = None  # (y_true, y_pred, *labels) chunk buffers


class _DeferInterrupt:
    """Hold back SIGINT (Ctrl-C) for a few lines in the main thread; re-raise it afterwards."""

    def __enter__(self) -> "_DeferInterrupt":
        self._old = None
        self._hit = False
        if threading.current_thread() is threading.main_thread():
            try:
                self._old = signal.signal(signal.SIGINT, self._handler)
            except ValueError:  # not the main interpreter
                self._old = None
        return self

    def _handler(self, signum: int, frame: Any) -> None:
        self._hit = True

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            if self._hit:
                if callable(self._old):
                    self._old(signal.SIGINT, None)
                elif self._old == signal.SIG_DFL:
                    raise KeyboardInterrupt


class Recorder:
    """Record (y_true, y_pred) batches of an epoch to disk and compute exact metrics over all of them.

    Args:
        path: run directory (a zarr v3 store, created if missing); splits and epochs live inside it.
        split: name of this recorder's split, e.g. ``"train"``, ``"val"`` (letters, digits, ``_.-``).
        epoch: number of the first epoch recorded (default: 0, or where ``mode="resume"`` continues).
            Give it when your loop has its own epoch numbers (e.g. after resuming from a checkpoint).
        metrics: metric names (see :data:`oocmetrics.METRICS`); None computes the default suite.
        chunk_mb: target size of one stored chunk per array, in MiB. Rows are buffered until a chunk is
            full and each chunk is written once. Ignored when ``chunk_rows`` is given.
        chunk_rows: rows per chunk, instead of ``chunk_mb``.
        queue_chunks: chunks that may wait for the writer; when all are in flight ``update`` blocks
            (backpressure) rather than memory growing. Peak buffer memory is about
            ``2 * (queue_chunks + 1) * chunk_mb`` MiB (for a CUDA epoch: that much device memory,
            and as much pinned host memory).
        compressors: zarr v3 compressors for the arrays (e.g. ``numcodecs.zarr3.LZ4()``); default
            None: float predictions barely compress and compression slows writing.
        nonfinite: ``"raise"`` (default): a batch with NaN/Inf raises ValueError naming the batch and
            is not recorded. ``"skip"``: store it; pairs where y_true or y_pred is not finite are left
            out of every metric and counted in ``EpochMetrics.n_skipped``.
            For a CUDA epoch with ``"raise"`` the check runs on the device, without a sync, and is
            reported at the next chunk boundary: the ``update`` that fills the chunk holding the bad
            batch, or one after it, or ``flush``/``compute``/``reset``/``close``. The ValueError
            names the batch; that batch and every batch after it (the one passed to the raising
            ``update`` included) are dropped, earlier rows are kept, and recording continues (the
            next batch takes the bad batch's number). ``flush``/``compute``/``reset``/``close``
            raising it did nothing else: call them again. ``rows``/``batches`` count the staged
            batches, whose check may still be pending.
        keep_epochs: finished epochs of this split kept on disk besides the one being recorded (None
            keeps all). When an epoch is finished the newest ``max(keep_epochs, 1)`` stay; when the
            next epoch writes its first chunk, the newest ``keep_epochs`` stay. So 0 keeps only the
            epoch being written, and after ``close()`` the last epoch with rows is always on disk.
        mode: when the split already has epochs on disk: ``"create"`` raises, ``"overwrite"``
            deletes them, ``"resume"`` continues: after the last epoch if it is complete, else it
            replaces that (crashed) epoch. With ``epoch=k`` it replaces stored epochs >= k, when epoch
            k writes its first chunk (nothing is deleted before there is something to replace it).
        fsync: also ``fsync`` each chunk and the row count, so durable rows survive power loss,
            not only a process crash (costs a disk flush per chunk).
        lock_timeout: seconds to wait for another writer of this split to close (0: fail at once).
        scheduler: dask scheduler for ``compute`` (None: local threads; or a distributed Client).
        split_every: fan-in of the dask tree reduction.
        progress: show a dask progress bar during long ``compute`` calls.
        quantiles: exact quantiles of |y_true - y_pred| that every ``compute`` adds to
            ``result.quantiles`` (per output and pooled; True: 0.5, 0.9, 0.95, 0.99). They cost 2-3
            passes over the stored data; None (default) computes none.
        distributed: None (default): when ``torch.distributed`` is initialised with more than one
            rank, each rank writes its own shard of the split (``<split>.rank<r>``) and ``compute()``
            is a collective that returns every rank the same metrics over all ranks' rows, each
            sample id counted once (pass ``ids=`` to ``update``). False: this process records alone
            (give each rank its own path or split). True: require DDP.
        process_group: the torch.distributed group of the ranks that record together (default: all).

    CUDA batches: an epoch whose first batch is a pair of CUDA tensors is staged on that device
    (see :mod:`oocmetrics.capture`); its later batches must be tensors on the same device (a
    TypeError otherwise; the batch is not recorded). Give ``ids``/``groups`` as CPU tensors or NumPy
    arrays there: CUDA labels are copied to the host, a sync per batch. Building the device buffers
    at an epoch's first batch pins memory (one sync); the next epochs of the same layout reuse them.

    One thread at a time: a second thread calling in while one is inside raises RuntimeError.
    Under DDP every rank must construct the Recorder and call ``compute()`` together (collectives).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        split: str = "train",
        *,
        epoch: int | None = None,
        metrics: Iterable[str] | None = None,
        chunk_mb: float = 8.0,
        chunk_rows: int | None = None,
        queue_chunks: int = 2,
        compressors: Any = None,
        nonfinite: NonFinite = "raise",
        keep_epochs: int | None = 1,
        mode: Mode = "create",
        fsync: bool = False,
        lock_timeout: float = 0.0,
        scheduler: Any = None,
        split_every: int = SPLIT_EVERY,
        progress: bool = False,
        quantiles: Any = None,
        distributed: bool | None = None,
        process_group: Any = None,
    ) -> None:
        self._closed = True  # until the lock is held: close()/__del__ then have nothing to undo
        check_split_name(split)
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite={nonfinite!r}; expected 'raise' or 'skip'.")
        if mode not in ("create", "overwrite", "resume"):
            raise ValueError(f"mode={mode!r}; expected 'create', 'overwrite' or 'resume'.")
        if epoch is not None:
            check_epoch_number(epoch)
        if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows < 1):
            raise ValueError(f"chunk_rows={chunk_rows!r}; expected a positive int, or None to use chunk_mb.")
        if not chunk_mb > 0:
            raise ValueError(f"chunk_mb={chunk_mb!r}; expected a positive number of MiB, e.g. 16.")
        if not isinstance(queue_chunks, int) or queue_chunks < 1:
            raise ValueError(f"queue_chunks={queue_chunks!r}; expected an int >= 1.")
        if keep_epochs is not None and (not isinstance(keep_epochs, int) or keep_epochs < 0):
            raise ValueError(f"keep_epochs={keep_epochs!r}; expected an int >= 0, or None to keep all.")
        if not isinstance(split_every, int) or split_every < 2:
            raise ValueError(f"split_every={split_every!r}; expected an int >= 2.")
        if not lock_timeout >= 0:
            raise ValueError(f"lock_timeout={lock_timeout!r}; expected seconds >= 0.")
        if distributed not in (None, True, False):
            raise ValueError(f"distributed={distributed!r}; expected None (auto), True or False.")
        self.metrics = resolve_metrics(metrics)
        self.quantiles = check_quantiles(quantiles)
        if is_url(path):  # Path() would turn "s3://b/run" into a local directory "s3:/b/run"
            open_root(path, create=True)  # raises: a Recorder writes to a local path
        self.path = Path(path)
        self.split = split
        self._exchange: Exchange | None = None if distributed is False else ddp_world(process_group)
        if distributed is True and self._exchange is None:
            raise ValueError(
                "distributed=True, but torch.distributed is not initialised with more than one rank; "
                "call torch.distributed.init_process_group first (e.g. run under torchrun), or pass "
                "distributed=None."
            )
        ex = self._exchange
        self.rank = ex.rank if ex is not None else 0
        self.world_size = ex.size if ex is not None else 1
        # this writer's directory: the split itself, or under DDP this rank's shard of it
        self._dir_split = shard_split_name(split, self.rank) if ex is not None else split
        self.nonfinite: NonFinite = nonfinite
        self.keep_epochs = keep_epochs
        self.fsync = bool(fsync)
        self.scheduler = scheduler
        self.split_every = split_every
        self.progress = progress
        self._chunk_mb = float(chunk_mb)
        self._chunk_rows_opt = chunk_rows
        self._queue_chunks = queue_chunks
        self._compressors = compressors
        self._run_id = uuid.uuid4().hex[:12]
        self._busy = threading.Lock()
        self._spare: list[tuple[np.ndarray, ...]] = []
        self._spare_layout: tuple[Any, ...] | None = None
        self._spare_stager: Any = None  # the last CUDA epoch's DeviceStager, reset, for the next epoch
        self._last_finished: int | None = None
        self._shard_attrs: dict[str, Any] = {}
        if ex is not None:  # one run id for all ranks: readers combine only shards of the same run
            self._shard_attrs = {"split": split, "rank": self.rank, "world_size": self.world_size,
                                 "run": ex.gather(self._run_id)[0]}
        self._open(mode, epoch, lock_timeout)

    def _open(self, mode: Mode, epoch: int | None, lock_timeout: float) -> None:
        """Take the split's lock and decide the first epoch; under DDP all ranks agree or all raise."""
        ex = self._exchange
        if ex is None:
            self._open_local(mode, epoch, lock_timeout)
            return
        # rank 0 creates the store root first: no two ranks race to create it
        ex.call(lambda: meta_dir(open_root(self.path, create=True)) if ex.rank == 0 else None,
                f"creating the store at {self.path}", error=StoreError)
        try:
            ex.call(lambda: self._open_local(mode, epoch, lock_timeout), f"opening split {self.split!r}",
                    error=StoreError)
        except BaseException:
            if not self._closed:  # opened here, failed on another rank: give the lock back
                self._release()
            raise
        # a crash may leave ranks at different epochs: redo from the earliest on every rank
        start = min(ex.gather(self.epoch))
        if start != self.epoch:
            self.epoch = start
            if self._replace_from is not None:
                self._replace_from = min(self._replace_from, start)

    def _open_local(self, mode: Mode, epoch: int | None, lock_timeout: float) -> None:
        split = self._dir_split
        try:
            self._root = open_root(self.path, create=True)
            self._lock = SplitLock(self._root, meta_dir(self._root), split, self._run_id)
        except OSError as exc:  # e.g. a full disk or a read-only path: say which store and why
            raise StoreError(f"Cannot open the store at {self.path} for writing: {describe_oserror(exc)}.") from exc
        self._lock.acquire(lock_timeout)
        try:
            self._split_dir = ensure_split(self._root, split)
            recover_split(self._root, split)
            stored, _ = scan_split(self._split_dir)
            if stored and mode == "create":
                last = stored[max(stored)]
                raise StoreError(
                    f"{self._split_dir} already holds epoch(s) {list(stored)} (last: {last.rows} rows, "
                    f"{'complete' if last.complete else 'incomplete'}, written by run {last.run_id} at "
                    f"{last.updated}). Pass mode='overwrite' to delete them, mode='resume' to continue, "
                    f"or use another path."
                )
            if mode == "overwrite":
                remove_epochs(self._root, split, list(stored))
                stored = {}
            self._replace_from: int | None = None
            if mode == "resume":
                if epoch is None and stored:
                    last = stored[max(stored)]
                    epoch = last.epoch + 1 if last.complete else last.epoch  # replace a crashed epoch
                self._replace_from = epoch if epoch is not None else 0
        except OSError as exc:
            self._lock.release()
            raise StoreError(f"Cannot prepare split {split!r} of {self.path}: {describe_oserror(exc)}.") from exc
        except BaseException:
            self._lock.release()
            raise
        self._closed = False
        self.epoch: int = 0 if epoch is None else epoch
        self._new_epoch_state()

    # ------------------------------------------------------------------------------------ state
    def _new_epoch_state(self) -> None:
        self._writer: ChunkWriter | None = None
        self._trailing: tuple[int, ...] | None = None
        self._dtypes: tuple[np.dtype, np.dtype] | None = None
        self._labels: tuple[str, ...] = ()  # which per-row labels (ids, groups) this epoch stores
        self._chunk_rows = 0
        self._stager: Any = None  # a CUDA epoch's DeviceStager (oocmetrics.capture); None: host path
        self._pos = _Pos()
        self._sealed_rows = 0  # rows covered by the last flush of a partial chunk
        self._cached: tuple[tuple[Any, ...], EpochMetrics] | None = None

    @property
    def rows(self) -> int:
        """Rows recorded in the current epoch (durable or still held in memory)."""
        return self._pos.rows

    @property
    def batches(self) -> int:
        """Batches recorded in the current epoch."""
        return self._pos.batches

    @property
    def durable_rows(self) -> int:
        """Rows of the current epoch written to disk (they survive a crash of this process)."""
        return self._writer.durable_rows if self._writer is not None else 0

    @property
    def closed(self) -> bool:
        return self._closed

    def _chunk_rows_for(self, trailing: tuple[int, ...], dtypes: tuple[np.dtype, np.dtype]) -> int:
        row_bytes = max(1, int(np.prod(trailing, dtype=np.int64))) * max(d.itemsize for d in dtypes)
        return self._chunk_rows_opt or max(1, int(self._chunk_mb * _MB) // row_bytes)

    def _epoch_spec(self, trailing: tuple[int, ...], dtypes: tuple[np.dtype, np.dtype],
                    labels: tuple[str, ...]) -> EpochSpec:
        return EpochSpec(
            root=self._root, split=self._dir_split, epoch=self.epoch, trailing=trailing, dtypes=dtypes,
            compressors=self._compressors, run_id=self._run_id, fsync=self.fsync,
            attrs={"split": self.split, "nonfinite": self.nonfinite, "dtypes": [str(d) for d in dtypes],
                   **({"shard": self._shard_attrs} if self._shard_attrs else {})},
            partial_fields=FIELDS, labels=labels,
        )

    def _start_epoch(self, t: np.ndarray, p: np.ndarray, labels: tuple[str, ...]) -> None:
        trailing = tuple(t.shape[1:])
        dtypes = (store_dtype(t.dtype), store_dtype(p.dtype))
        chunk_rows = self._chunk_rows_for(trailing, dtypes)
        layout = (chunk_rows, trailing, dtypes, labels)
        if self._spare_layout != layout:
            self._spare = []  # buffers of the previous epoch fit only the same layout
        self._spare_layout = layout
        if self._spare_stager is not None:  # a CUDA epoch's buffers: free that device memory
            self._spare_stager.close()
            self._spare_stager = None
        spec = self._epoch_spec(trailing, dtypes, labels)

        def make_buffers() -> tuple[np.ndarray, ...]:
            # Reuse the previous epoch's buffers: fresh chunk-sized allocations each epoch fragment
            # the heap and creep the peak RSS up.
            if self._spare:
                return self._spare.pop()
            return (np.empty((chunk_rows, *trailing), dtypes[0]), np.empty((chunk_rows, *trailing), dtypes[1]),
                    *(np.empty(chunk_rows, np.int64) for _ in labels))

        def open_store(rows_per_chunk: int) -> EpochStore:  # runs on the writer thread
            return self._create_epoch_on_disk(spec, rows_per_chunk)

        writer = ChunkWriter(open_store, chunk_rows, make_buffers, n_buffers=self._queue_chunks + 1,
                             reduce=block_partials)
        self._trailing, self._dtypes, self._chunk_rows = trailing, dtypes, chunk_rows
        self._labels = labels
        self._writer = writer

    def _start_device_epoch(self, t: Any, p: Any, labels: tuple[str, ...]) -> None:
        """The device path's epoch: a DeviceStager (the spare one when its layout fits) and a writer."""
        from oocmetrics.capture import DeviceStager, tensor_layout

        trailing, dtypes, device = tensor_layout(t, p)
        chunk_rows = self._chunk_rows_for(trailing, dtypes)
        check_finite = self.nonfinite == "raise"
        stager, self._spare_stager = self._spare_stager, None
        if stager is not None and (stager.chunk_rows, stager.trailing, stager.dtypes, stager.labels, stager.device,
                                   stager.check_finite) != (chunk_rows, trailing, dtypes, labels, device, check_finite):
            stager.close()
            stager = None
        if stager is None:  # allocates device and pinned memory: pinning syncs, once per layout
            stager = DeviceStager(chunk_rows, trailing, dtypes, device=device, slots=self._queue_chunks + 1,
                                  check_finite=check_finite, labels=labels, poll=self._poll_writer)
        self._spare, self._spare_layout = [], None  # host chunk buffers: not used by a device epoch
        spec = self._epoch_spec(trailing, dtypes, labels)

        def open_store(rows_per_chunk: int) -> EpochStore:  # runs on the writer thread
            return self._create_epoch_on_disk(spec, rows_per_chunk)

        writer = ChunkWriter(open_store, chunk_rows, None, n_buffers=self._queue_chunks + 1, reduce=block_partials)
        self._trailing, self._dtypes, self._chunk_rows = trailing, dtypes, chunk_rows
        self._labels = labels
        self._writer = writer
        self._stager = stager

    def _poll_writer(self) -> None:
        """The stager's poll while it waits for a slot: give up once the writer has failed.

        Runs under the stager's lock: it must not call the stager.
        """
        writer = self._writer
        if writer is not None and writer.error is not None:
            raise _WriterFailed

    def _create_epoch_on_disk(self, spec: EpochSpec, chunk_rows: int) -> EpochStore:
        """Replace what resume asked to replace, create the epoch, then apply retention."""
        stored, foreign = scan_split(self._split_dir)
        name = epoch_name(spec.epoch)
        if name in foreign:
            raise StoreError(
                f"{self._split_dir / name} is in the way: {foreign[name]} Epoch {spec.epoch} cannot be "
                f"written there; move it away, or record this epoch under another number (reset(epoch=...))."
            )
        doomed = [e for e in stored if self._replace_from is not None and e >= self._replace_from]
        if spec.epoch in stored and spec.epoch not in doomed:
            raise StoreError(f"{self._split_dir / name} already exists; pass mode='resume' to replace it.")
        remove_epochs(self._root, self._dir_split, doomed)
        self._replace_from = None
        store = EpochStore.create(spec, chunk_rows)
        if self.keep_epochs is not None:
            self._retain([e for e in stored if e < spec.epoch and e not in doomed], self.keep_epochs)
        return store

    def _retain(self, finished: list[int], keep: int) -> None:
        old = sorted(finished)[: max(0, len(finished) - keep)]
        try:
            remove_epochs(self._root, self._dir_split, old)
        except OSError as exc:  # retention is housekeeping: never lose the run over it
            warnings.warn(f"oocmetrics: could not delete old epochs {old} of {self._split_dir}: {exc}", stacklevel=3)

    # --------------------------------------------------------------------------- entry guards
    def _enter(self, what: str) -> None:
        if not self._busy.acquire(blocking=False):
            raise RuntimeError(
                f"Recorder.{what}() was called while another thread is inside this Recorder "
                f"({self.path}, split {self.split!r}). A Recorder is used from one thread at a time: "
                f"give each thread its own split, or serialise the calls."
            )
        if self._closed:
            self._busy.release()
            raise RuntimeError(
                f"{what}() on a closed Recorder ({self.path}, split {self.split!r}). Create a new "
                f"Recorder(..., mode='resume') to record more epochs."
            )

    def _raise_writer_error(self, in_update: bool = False) -> None:
        writer = self._writer
        if writer is None or writer.error is None:
            return
        err, job = writer.error, writer.failed_job
        if self._stager is not None:
            from oocmetrics.capture import NonFiniteBatchError

            if isinstance(err, NonFiniteBatchError):
                self._drop_nonfinite(err, in_update)
        durable = writer.durable_rows
        held = self._pos.rows - durable
        if job is not None and job.kind == "chunk":
            lo = job.index * self._chunk_rows
            where = f"chunk {job.index} (rows {lo}-{lo + job.n - 1}) of epoch {self.epoch}"
        elif job is not None:
            where = f"the 'complete' mark of epoch {self.epoch}"
        else:
            where = f"epoch {self.epoch}"
        if isinstance(err, StoreError):
            raise StoreError(f"Writing {where} failed: {err} {held} rows are held in memory.") from err
        raise WriterError(
            f"Writing {where} to {self._split_dir} failed: {describe_oserror(err)}. {durable} rows of "
            f"this epoch are durable on disk; {held} rows are held in memory, unwritten. Free space (or "
            f"fix the cause) and call retry() on the recorder to write them; the durable rows stay "
            f"readable with `python -m oocmetrics compute {self.path} --split {self.split}`."
        ) from err

    def _drop_nonfinite(self, err: Any, in_update: bool) -> None:
        """A device chunk held NaN/Inf (``err``: NonFiniteBatchError): drop the bad batch and every
        batch staged after it, keep the rows before it, and raise ValueError saying so."""
        writer, stager, pos = self._writer, self._stager, self._pos
        assert writer is not None and stager is not None
        b, (s, e) = err.batch_index, err.batch_rows
        last = pos.batches - 1
        dropped = (f"batch {b} (rows {s}-{e - 1})" if last == b else
                   f"batches {b}-{last} (rows {s}-{pos.rows - 1}): batch {b} and the {last - b} staged after it")
        if in_update:
            dropped += ", and the batch passed to this update() call"
        kept = f"batches 0-{b - 1} (rows 0-{s - 1}) are kept" if b else "no earlier batch was recorded"
        where = f", the first at row {err.first_row}" if err.first_row is not None else ""
        again = "" if in_update else " This call did nothing else: call it again to go on with the kept rows."
        msg = (
            f"{err.name} in batch {b} (rows {s}-{e - 1} of epoch {self.epoch}) has non-finite value(s) "
            f"(NaN/Inf){where}. CUDA batches are checked on the device, per chunk, so it is reported at the "
            f"boundary of chunk {err.chunk_index}. Not recorded: {dropped}; {kept} and recording continues "
            f"(the next batch is batch {b}).{again} Fix the data or model, or pass nonfinite='skip' to the "
            f"Recorder to store non-finite values and leave them out of the metrics (counted in n_skipped)."
        )
        with _DeferInterrupt():  # the chunks, the writer's queue and the counts change together
            stager.rewind(err.chunk, err.valid_rows)  # checks first: if it raises, nothing has changed
            writer.discard()
            self._pos = _Pos(stager.rows, stager.batches, stager.fill, stager.chunk_index, None)
            self._sealed_rows = -1  # a discarded flush may have covered these rows: flush them again
            self._cached = None
        raise ValueError(msg) from err

    def _is_nonfinite_report(self, exc: BaseException) -> bool:
        """Whether ``exc`` is the ValueError of :meth:`_drop_nonfinite` (its batches are already dropped)."""
        if self._stager is None or not isinstance(exc, ValueError):
            return False
        from oocmetrics.capture import NonFiniteBatchError

        return isinstance(exc.__cause__, NonFiniteBatchError)

    # ----------------------------------------------------------------------------------- public
    def update(self, y_true: Any, y_pred: Any, ids: Any = None, groups: Any = None) -> None:
        """Record one batch: arrays or tensors of shape (batch, *trailing), y_true first.

        ``ids``: one integer per row identifying its sample (e.g. its dataset index). Every metric
        counts each id once: a copy recorded again (a sample seen twice, or the copies
        ``DistributedSampler`` pads the last ranks with) is left out, the first copy winning (see
        :mod:`oocmetrics.dedup`). Optional in one process; required under DDP.
        ``groups``: one integer per row naming its group (e.g. subject or session), stored with the
        rows for per-group breakdowns. Give ids / groups with every batch of an epoch, or with none.

        The batch is recorded whole or not at all, whatever interrupts the call (Ctrl-C included).
        """
        self._enter("update")
        try:
            self._raise_writer_error(in_update=True)
            self._update(y_true, y_pred, ids, groups)
        finally:
            self._busy.release()

    def _update(self, y_true: Any, y_pred: Any, ids: Any = None, groups: Any = None) -> None:
        if self._stager is not None or (self._writer is None and _on_device(y_true, y_pred)):
            self._update_device(y_true, y_pred, ids, groups)
            return
        pos = self._pos
        t, p = check_batch(
            y_true, y_pred, trailing=self._trailing, batch_index=pos.batches, row_offset=pos.rows,
            nonfinite=self.nonfinite,
        )
        given, labels = self._labels_of(ids, groups, int(t.shape[0]), pos.batches)
        if self._writer is None:
            self._start_epoch(t, p, tuple(given))
        else:
            if tuple(given) != self._labels:
                self._labels_mismatch(given, pos.batches)
            for name, arr, dt in zip(("y_true", "y_pred"), (t, p), self._dtypes):  # type: ignore[arg-type]
                if not np.can_cast(arr.dtype, dt, "safe"):
                    raise TypeError(
                        f"{name} in batch {pos.batches} has dtype {arr.dtype}, but this epoch stores "
                        f"{dt} (set by batch 0); casting would lose precision. Pass {dt} batches, or "
                        f"call reset() and start the epoch with {arr.dtype} batches."
                    )
        writer = self._writer
        assert writer is not None
        n, C = t.shape[0], self._chunk_rows
        buf, fill, index = pos.buf, pos.fill, pos.chunk_index
        taken: list[tuple[np.ndarray, ...]] = []
        jobs: list[Job] = []
        committed = False
        try:
            # Phase 1: copy. Only rows past the current fill and fresh buffers are touched, so an
            # interrupt here leaves the recorded state as it was (fresh buffers go back to the pool).
            done = 0
            while done < n:
                if buf is None:
                    buf = writer.acquire(held=len(taken) + (pos.buf is not None))
                    taken.append(buf)
                    fill = 0
                k = min(n - done, C - fill)
                np.copyto(buf[0][fill:fill + k], t[done:done + k], casting="safe")
                np.copyto(buf[1][fill:fill + k], p[done:done + k], casting="safe")
                for dest, src in zip(buf[2:], labels):
                    dest[fill:fill + k] = src[done:done + k]
                fill += k
                done += k
                if fill == C:
                    jobs.append(Job("chunk", index, buf[0], buf[1], C, batches=pos.batches + (done == n),
                                    labels=self._label_bufs(buf)))
                    index += 1
                    buf, fill = None, 0
            new = _Pos(pos.rows + n, pos.batches + 1, fill, index, buf)
            # Phase 2: commit, with Ctrl-C held back so that queuing and counting happen together.
            if jobs:
                with _DeferInterrupt():
                    writer.submit(jobs)
                    self._pos = new
                    committed = True
            else:
                self._pos = new  # one assignment: atomic for an interrupt
                committed = True
        finally:
            if not committed:
                for b in taken:
                    writer.release(b)

    def _labels_of(self, ids: Any, groups: Any, n: int, batch: int) -> tuple[dict[str, Any], list[np.ndarray]]:
        """The labels given with a batch of ``n`` rows (by name) and their checked int64 arrays; under
        DDP, a warning at an epoch's first batch when ids are missing."""
        given = {name: v for name, v in zip(LABELS, (ids, groups)) if v is not None}
        labels = [check_labels(v, name, n, batch) for name, v in given.items()]
        if self._writer is None and self._exchange is not None and "ids" not in given and batch == 0:
            warnings.warn(
                f"oocmetrics: split {self.split!r} is recorded by {self.world_size} DDP ranks but "
                f"update() got no ids=; compute() will refuse to combine the ranks, because copies "
                f"padded in by DistributedSampler cannot be told apart. Pass each row's dataset index.",
                stacklevel=4,
            )
        return given, labels

    def _labels_mismatch(self, given: dict[str, Any], batch: int) -> NoReturn:
        raise ValueError(
            f"Batch {batch} came with labels {list(given) or 'none'}, but this epoch's batches have "
            f"{list(self._labels) or 'none'} (set by batch 0). Pass ids= / groups= with every batch of "
            f"an epoch, or with none."
        )

    def _update_device(self, y_true: Any, y_pred: Any, ids: Any, groups: Any) -> None:
        """One batch of a CUDA epoch: one device copy into the stager's chunk slot, no sync."""
        from oocmetrics.capture import check_pair

        pos = self._pos
        t, p = check_pair(y_true, y_pred, pos.batches)  # metadata only
        given, labels = self._labels_of(ids, groups, int(t.shape[0]), pos.batches)
        if self._writer is None:
            self._start_device_epoch(t, p, tuple(given))
        elif tuple(given) != self._labels:
            self._labels_mismatch(given, pos.batches)
        writer, stager = self._writer, self._stager
        assert writer is not None and stager is not None
        try:
            staged = stager.stage(t, p, labels)  # may raise or be interrupted: nothing changes
        except _WriterFailed:  # the stager waited for a slot that the failed writer will not release
            self._raise_writer_error(in_update=True)
            raise
        with _DeferInterrupt():  # counting and handing over the chunks happen together
            ready = stager.commit(staged)
            if ready:
                writer.submit([self._ready_job(c) for c in ready])
            self._pos = _Pos(stager.rows, stager.batches, stager.fill, stager.chunk_index, None)

    @staticmethod
    def _ready_job(c: Any) -> Job:
        """The writer's job for a chunk handed out by the stager (``c``: ReadyChunk)."""
        return Job("chunk", c.index, c.t, c.p, c.n, batches=c.batches, seal=c.sealed, recycle=False,
                   labels=c.labels or None, ready=c)

    def compute(self, source: Source = "auto", quantiles: Any = None) -> EpochMetrics:
        """Exact metrics over every row recorded in the current epoch (flushes to disk first).

        The decomposable metrics merge the partials the writer computed as each chunk was written
        (``source="auto"``: no pass over the data); ``source="data"`` recomputes them from the stored
        data, bit for bit the same. Order statistics always read the data.
        ``quantiles``: exact quantiles of |e| in ``result.quantiles`` (numbers in [0, 1], or True for
        (0.5, 0.9, 0.95, 0.99)); None uses the Recorder's ``quantiles=`` (default: none).
        Returns a new object each call: changing it does not change later results.
        """
        qs = check_quantiles(quantiles) if quantiles is not None else self.quantiles
        self._enter("compute")
        try:
            if self._exchange is not None:
                return self._compute_ddp(source, qs)
            if self._pos.rows == 0:
                raise ValueError(
                    f"No rows recorded in epoch {self.epoch} of split {self.split!r} ({self.path}): call "
                    f"update(y_true, y_pred) at least once before compute(). Stored epochs: "
                    f"oocmetrics.compute_stored({str(self.path)!r}, {self.split!r}, epoch=...)."
                )
            if self._cached is not None and self._cached[0] == (self._pos.rows, source, qs):
                return copy.deepcopy(self._cached[1])
            self._flush()
            result = self._compute_shards(source, qs, self._exchange)
            self._cached = ((self._pos.rows, source, qs), result)
            return copy.deepcopy(result)
        finally:
            self._busy.release()

    def _compute_shards(self, source: Source, qs: Any, exchange: Exchange | None) -> EpochMetrics:
        """This recorder's shard (flushed) through :func:`compute_shards`; a collective under DDP."""
        writer = self._writer
        store = writer.store if writer is not None and self._pos.rows > 0 else None
        idle = writer.drain_free() if store is not None else []  # idle chunk buffers serve the reads
        try:
            shard = Shard()
            if store is not None:
                store.check_present()
                shard = Shard(store.arrays["y_true"], store.arrays["y_pred"], self._pos.rows, store.partials,
                              store.labels.get("ids"), buffers=idle, name=f"rank {self.rank}")
            kwargs: dict[str, Any] = {"exchange": exchange} if exchange is not None else {}
            result = compute_shards(
                [shard], source=source, metrics=self.metrics, quantiles=qs, split_every=self.split_every,
                scheduler=self.scheduler, progress=self.progress, epoch=self.epoch, split=self.split, **kwargs,
            )
        finally:
            for pair in idle:
                writer.release(pair)  # type: ignore[union-attr]
        result.extra["batches"] = self._pos.batches
        return result

    def _compute_ddp(self, source: Source, qs: Any) -> EpochMetrics:
        """Every rank flushes its shard, then all compute together; a local failure stops every rank."""
        ex = self._exchange
        assert ex is not None
        ex.call(lambda: self._flush() if self._pos.rows > 0 else None, "compute() (flushing)", error=StoreError)
        everyone = ex.gather((self.epoch, self._pos.batches))
        epochs = [e for e, _ in everyone]
        if len(set(epochs)) > 1:
            raise ValueError(
                f"The ranks are at different epochs {epochs} of split {self.split!r}; every rank must "
                f"reset() / reset(epoch=) the same way before compute()."
            )
        result = self._compute_shards(source, qs, ex)
        result.extra["batches"] = sum(b for _, b in everyone)
        return result

    def reset(self, epoch: int | None = None) -> None:
        """Finish the current epoch (if it has rows) and start the next: ``epoch``, or the current + 1.

        A reset with nothing recorded is harmless: it does not advance the epoch number (so calling
        reset() at the start of every epoch, as with torchmetrics, numbers epochs right).
        """
        self._enter("reset")
        try:
            if epoch is not None:
                check_epoch_number(epoch)
                floor = self._last_finished if self._pos.rows == 0 else self.epoch
                if floor is not None and epoch <= floor:
                    raise ValueError(
                        f"reset(epoch={epoch}): epoch numbers must increase; this recorder has already "
                        f"recorded epoch {floor}. To record an epoch again, open a new "
                        f"Recorder(..., mode='resume', epoch={epoch})."
                    )
            if self._pos.rows > 0:
                self._finish()
                self.epoch = self.epoch + 1 if epoch is None else epoch
                self._new_epoch_state()
            else:
                if self._writer is not None:  # an epoch started by an update that was interrupted
                    self._writer.close()
                    self._retire_stager()
                    self._new_epoch_state()
                if epoch is not None:
                    self.epoch = epoch
        finally:
            self._busy.release()

    def flush(self) -> None:
        """Make every recorded row durable now (normally done by compute/reset/close)."""
        self._enter("flush")
        try:
            self._flush()
        finally:
            self._busy.release()

    def retry(self) -> None:
        """After a write failure (e.g. a full disk) has been fixed, write the held rows again.

        A CUDA chunk found to hold NaN/Inf is not written again: retry() raises its ValueError
        instead, having dropped the bad batch and those after it (see ``nonfinite``).
        """
        self._enter("retry")
        try:
            if self._writer is not None:
                if self._stager is not None:
                    from oocmetrics.capture import NonFiniteBatchError

                    if isinstance(self._writer.error, NonFiniteBatchError):
                        self._raise_writer_error()  # NaN/Inf in a CUDA chunk: no retry writes it; reported here
                self._writer.retry()
                self._writer.wait()
                self._raise_writer_error()
        finally:
            self._busy.release()

    def close(self) -> None:
        """Flush, mark the epoch complete, stop the writer and release the split. Idempotent.

        If writing fails (WriterError) the recorder stays open with the rows held: fix the cause,
        call retry(), then close() again.
        """
        if self._closed:
            return
        self._enter("close")
        try:
            if self._pos.rows > 0:
                self._finish()
            self._release()
        finally:
            self._busy.release()

    def stored_epochs(self) -> list[int]:
        """Epoch numbers of this split on disk."""
        return list_epochs(self._split_dir)

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            try:
                self.close()
            except ValueError as exc:
                if not self._is_nonfinite_report(exc):
                    raise
                # NaN/Inf found at close (a CUDA epoch): as for a NaN batch raised inside the block,
                # keep the rows before it durable, leave the epoch incomplete, and raise
                self._abandon(ValueError)
                raise
            return
        self._abandon(exc_type)

    def _abandon(self, exc_type: Any) -> None:
        """Leaving on an exception: make the rows durable, but do not mark the epoch complete."""
        if self._closed:
            return
        try:
            try:
                if self._pos.rows > 0:
                    self._flush()
            except ValueError as report:
                if not self._is_nonfinite_report(report):
                    raise
                # a CUDA chunk held NaN/Inf: its batches are dropped now, the rows before them remain
                warnings.warn(f"oocmetrics: while handling {exc_type.__name__}: {report}", stacklevel=3)
                if self._pos.rows > 0:
                    self._flush()
        except BaseException as flush_exc:  # do not mask the exception already on its way
            warnings.warn(
                f"oocmetrics: flushing {self.path} split {self.split!r} failed while handling "
                f"{exc_type.__name__}: {flush_exc}; rows written before it are durable.", stacklevel=3,
            )
        finally:
            self._release()

    def _release(self) -> None:
        """Stop the writer (if any), drop the buffers and the split's lock: the recorder is closed."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for stager in (self._stager, self._spare_stager):
            if stager is not None:
                stager.close()  # waits for its copies in flight; frees device and pinned memory
        self._stager = self._spare_stager = None
        self._spare = []
        self._lock.release()
        self._closed = True

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"epoch {self.epoch}, {self.rows} rows, {self.batches} batches"
        return f"Recorder({str(self.path)!r}, split={self.split!r}: {state})"

    # --------------------------------------------------------------------------------- internal
    def _label_bufs(self, buf: tuple[np.ndarray, ...]) -> dict[str, np.ndarray] | None:
        return dict(zip(self._labels, buf[2:])) if self._labels else None

    def _flush(self) -> None:
        """Write the partial chunk (its buffer stays for more rows) and wait until all is durable."""
        writer = self._writer
        if writer is None:
            return
        self._raise_writer_error()
        pos = self._pos
        if self._stager is not None:
            if self._stager.fill > 0 and self._sealed_rows != pos.rows:
                self._flush_device(writer, pos.rows)
        elif pos.fill > 0 and pos.buf is not None and self._sealed_rows != pos.rows:
            writer.submit([Job("chunk", pos.chunk_index, pos.buf[0], pos.buf[1], pos.fill,
                               batches=pos.batches, seal=True, recycle=False, labels=self._label_bufs(pos.buf))])
            self._sealed_rows = pos.rows
        writer.wait()
        self._raise_writer_error()

    def _flush_device(self, writer: ChunkWriter, rows: int) -> None:
        """Hand the stager's partial chunk to the writer (sealed: its slot stays for more rows)."""
        stager = self._stager
        assert stager is not None
        # the last flushed chunk is written and released first, so stager.flush() below never waits
        # (a wait there would hold back Ctrl-C)
        writer.wait()
        self._raise_writer_error()
        try:
            with _DeferInterrupt():  # a chunk handed out must reach the writer, or its slot is never freed
                c = stager.flush()
                if c is not None:
                    writer.submit([self._ready_job(c)])
                self._sealed_rows = rows
        except _WriterFailed:
            self._raise_writer_error()
            raise

    def _retire_stager(self) -> None:
        """The finished CUDA epoch's stager: reset and kept for the next epoch (no new pinned memory)."""
        stager, self._stager = self._stager, None
        if stager is None:
            return
        stager.reset()  # nothing is handed out: the writer is idle and closed
        old, self._spare_stager = self._spare_stager, stager
        if old is not None and old is not stager:
            old.close()

    def _finish(self) -> None:
        """Flush, mark complete, stop the writer, apply retention. On failure nothing changes."""
        writer = self._writer
        assert writer is not None
        self._flush()
        writer.submit([Job("complete", batches=self._pos.batches)])
        writer.wait()
        self._raise_writer_error()
        writer.close()
        self._writer = None
        self._retire_stager()
        pos = self._pos
        self._spare = writer.drain_free() + ([pos.buf] if pos.buf is not None else [])
        self._last_finished = self.epoch
        if self.keep_epochs is not None:
            stored = [e for e in scan_split(self._split_dir)[0] if e <= self.epoch]
            self._retain(stored, max(self.keep_epochs, 1))

