"""The training-loop API: ``update`` per batch, ``compute`` at epoch end, ``reset`` for the next epoch.

The recorder validates each batch once, copies it into a chunk-sized buffer (the only copy on the
training thread), and hands full chunks to a background :class:`~oocmetrics.store.ChunkWriter`.
Memory is bounded by ``(queue_chunks + 1)`` chunk buffers per array, whatever the epoch size.
"""
from __future__ import annotations

import os
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterable, Literal

import numpy as np

from oocmetrics.compute import SPLIT_EVERY, compute_store_arrays
from oocmetrics.kernels.moments import reference_shift
from oocmetrics.metrics import EpochMetrics, resolve_metrics
from oocmetrics.store import (
    ChunkWriter,
    EpochStore,
    StoreError,
    delete_epoch,
    delete_split,
    epoch_info,
    list_epochs,
    open_root,
    split_group,
)
from oocmetrics.validation import NonFinite, check_batch, store_dtype

Mode = Literal["create", "overwrite", "resume"]
_MB = 1 << 20


class Recorder:
    """Record (y_true, y_pred) batches of an epoch to disk and compute exact metrics over all of them.

    Args:
        path: run directory (a zarr v3 store, created if missing); splits and epochs live inside it.
        split: name of this recorder's split, e.g. ``"train"``, ``"val"``.
        metrics: metric names (see :data:`oocmetrics.METRICS`); None computes all.
        chunk_mb: target size of one stored chunk per array, in MiB. Rows are buffered until a chunk is
            full and each chunk is written once. Ignored when ``chunk_rows`` is given.
        chunk_rows: rows per chunk, instead of ``chunk_mb``.
        queue_chunks: chunks that may wait for the writer; when all are in flight ``update`` blocks
            (backpressure) rather than memory growing. Peak buffer memory is about
            ``2 * (queue_chunks + 1) * chunk_mb`` MiB.
        compressors: zarr v3 compressors for the arrays (e.g. ``numcodecs.zarr3.LZ4()`` or
            ``zarr.codecs.BloscCodec(cname="zstd", clevel=1)``); default None: float predictions
            compress only ~1.1x with lz4 while writing 2-4x slower (see README).
        nonfinite: ``"raise"`` (default): a batch with NaN/Inf raises ValueError naming the batch and
            is not recorded. ``"skip"``: store it; pairs where y_true or y_pred is not finite are left
            out of every metric and counted in ``EpochMetrics.n_skipped``.
        keep_epochs: finished epochs of this split kept on disk after ``reset()`` (None keeps all;
            0 keeps only the epoch being written). ``close()`` always keeps the last epoch.
        mode: what to do when this split already has epochs on disk: ``"create"`` raises,
            ``"overwrite"`` deletes them, ``"resume"`` continues with the next epoch index.
        scheduler: dask scheduler for ``compute`` (None: local threads; or a distributed Client).
        split_every: fan-in of the dask tree reduction.
        progress: show a dask progress bar during long ``compute`` calls.

    Not thread-safe: call it from one thread (the training loop).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        split: str = "train",
        *,
        metrics: Iterable[str] | None = None,
        chunk_mb: float = 8.0,
        chunk_rows: int | None = None,
        queue_chunks: int = 2,
        compressors: Any = None,
        nonfinite: NonFinite = "raise",
        keep_epochs: int | None = 1,
        mode: Mode = "create",
        scheduler: Any = None,
        split_every: int = SPLIT_EVERY,
        progress: bool = False,
    ) -> None:
        if not isinstance(split, str) or not split or "/" in split or split.startswith("epoch="):
            raise ValueError(f"split={split!r} is not a valid name; use e.g. 'train', 'val' or 'test'.")
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite={nonfinite!r}; expected 'raise' or 'skip'.")
        if mode not in ("create", "overwrite", "resume"):
            raise ValueError(f"mode={mode!r}; expected 'create', 'overwrite' or 'resume'.")
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
        self.metrics = resolve_metrics(metrics)
        self.path = Path(path)
        self.split = split
        self.nonfinite: NonFinite = nonfinite
        self.keep_epochs = keep_epochs
        self.scheduler = scheduler
        self.split_every = split_every
        self.progress = progress
        self._chunk_mb = float(chunk_mb)
        self._chunk_rows_opt = chunk_rows
        self._queue_chunks = queue_chunks
        self._compressors = compressors
        self._run_id = uuid.uuid4().hex[:12]
        self._closed = False
        self._spare: list[tuple[np.ndarray, np.ndarray]] = []
        self._spare_layout: tuple[Any, ...] | None = None

        self._root = open_root(self.path, create=True)
        group = split_group(self._root, split, create=False)
        existing = list_epochs(group)
        if existing and mode == "create":
            last = epoch_info(group, existing[-1])
            raise StoreError(
                f"{self.path / split} already holds epoch(s) {existing} (last: {last.rows} rows, "
                f"written by run {last.run_id} at {last.updated}). Pass mode='overwrite' to delete "
                f"them, mode='resume' to continue at epoch {existing[-1] + 1}, or use another path."
            )
        if mode == "overwrite" and group is not None:
            delete_split(self._root, split)
            self._root = open_root(self.path, create=True)
            existing = []
        self._group = split_group(self._root, split, create=True)
        self.epoch = existing[-1] + 1 if existing else 0
        self._new_epoch_state()

    # ------------------------------------------------------------------------------------ state
    def _new_epoch_state(self) -> None:
        self._store: EpochStore | None = None
        self._writer: ChunkWriter | None = None
        self._trailing: tuple[int, ...] | None = None
        self._dtypes: tuple[np.dtype, np.dtype] | None = None
        self._chunk_rows = 0
        self._buf: tuple[np.ndarray, np.ndarray] | None = None
        self._fill = 0
        self._chunk_index = 0
        self.rows = 0
        self.batches = 0
        self._cached: EpochMetrics | None = None

    def _start_epoch(self, t: np.ndarray, p: np.ndarray) -> None:
        trailing = tuple(t.shape[1:])
        dtypes = (store_dtype(t.dtype), store_dtype(p.dtype))
        row_bytes = max(1, int(np.prod(trailing, dtype=np.int64))) * max(d.itemsize for d in dtypes)
        chunk_rows = self._chunk_rows_opt or max(1, int(self._chunk_mb * _MB) // row_bytes)
        shift = reference_shift(t[:1])
        store = EpochStore.create(
            self._group, self.epoch, trailing=trailing, dtypes=dtypes, chunk_rows=chunk_rows,
            compressors=self._compressors, run_id=self._run_id,
            extra_attrs={"split": self.split, "nonfinite": self.nonfinite,
                         "dtypes": [str(d) for d in dtypes],
                         "shift": shift.tolist()},
        )

        layout = (chunk_rows, trailing, dtypes)
        if self._spare_layout != layout:
            self._spare = []  # buffers of the previous epoch fit only the same layout
        self._spare_layout = layout

        def make_buffers() -> tuple[np.ndarray, np.ndarray]:
            # Reuse the previous epoch's buffers: fresh chunk-sized allocations each epoch fragment
            # the heap and creep the peak RSS up.
            if self._spare:
                return self._spare.pop()
            return (np.empty((chunk_rows, *trailing), dtypes[0]), np.empty((chunk_rows, *trailing), dtypes[1]))

        self._store = store
        self._shift = shift
        self._writer = ChunkWriter(store, make_buffers, n_buffers=self._queue_chunks + 1)
        self._trailing, self._dtypes, self._chunk_rows = trailing, dtypes, chunk_rows

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise RuntimeError(
                f"{what}() on a closed Recorder ({self.path}, split {self.split!r}). Create a new "
                f"Recorder(..., mode='resume') to record more epochs."
            )

    # ----------------------------------------------------------------------------------- public
    def update(self, y_true: Any, y_pred: Any) -> None:
        """Record one batch: arrays or tensors of shape (batch, *trailing), y_true first."""
        self._check_open("update")
        if self._writer is not None:
            self._writer.raise_error()
        t, p = check_batch(
            y_true, y_pred, trailing=self._trailing, batch_index=self.batches, row_offset=self.rows,
            nonfinite=self.nonfinite,
        )
        if self._store is None:
            self._start_epoch(t, p)
        else:
            for name, arr, dt in zip(("y_true", "y_pred"), (t, p), self._dtypes):  # type: ignore[arg-type]
                if not np.can_cast(arr.dtype, dt, "safe"):
                    raise TypeError(
                        f"{name} in batch {self.batches} has dtype {arr.dtype}, but this epoch stores "
                        f"{dt} (set by batch 0); casting would lose precision. Pass {dt} batches, or "
                        f"call reset() and start the epoch with {arr.dtype} batches."
                    )
        n = t.shape[0]
        pos = 0
        writer = self._writer
        assert writer is not None
        while pos < n:
            if self._buf is None:
                self._buf = writer.acquire()
                self._fill = 0
            bt, bp = self._buf
            k = min(n - pos, self._chunk_rows - self._fill)
            np.copyto(bt[self._fill:self._fill + k], t[pos:pos + k], casting="safe")
            np.copyto(bp[self._fill:self._fill + k], p[pos:pos + k], casting="safe")
            self._fill += k
            pos += k
            if self._fill == self._chunk_rows:
                writer.submit(self._chunk_index, bt, bp, self._fill, batches=self.batches + (pos == n))
                self._chunk_index += 1
                self._buf = None
                self._fill = 0
        self.rows += n
        self.batches += 1
        self._cached = None

    def compute(self) -> EpochMetrics:
        """Exact metrics over every row recorded in the current epoch (flushes to disk first)."""
        self._check_open("compute")
        if self.rows == 0:
            raise ValueError(
                f"No rows recorded in epoch {self.epoch} of split {self.split!r} ({self.path}): call "
                f"update(y_true, y_pred) at least once before compute()."
            )
        if self._cached is not None:
            return self._cached
        self._flush()
        store = self._store
        assert store is not None
        result = compute_store_arrays(
            store.arrays["y_true"], store.arrays["y_pred"], self.rows, self._shift, metrics=self.metrics,
            split_every=self.split_every, scheduler=self.scheduler, progress=self.progress,
            epoch=self.epoch, split=self.split,
        )
        result.extra["batches"] = self.batches
        self._cached = result
        return result

    def reset(self) -> None:
        """Finish the current epoch on disk and start the next; old epochs beyond keep_epochs go."""
        self._check_open("reset")
        self._finish_epoch()
        self.epoch += 1
        self._new_epoch_state()

    def flush(self) -> None:
        """Make every recorded row durable now (normally done by compute/reset/close)."""
        self._check_open("flush")
        self._flush()

    def retry(self) -> None:
        """After a write failure (e.g. a full disk) has been fixed, write the held chunks again."""
        self._check_open("retry")
        if self._writer is not None:
            self._writer.retry()
            self._writer.wait()

    def close(self) -> None:
        """Flush, mark the epoch complete and stop the writer. Idempotent."""
        if self._closed:
            return
        try:
            self._finish_epoch(closing=True)
        finally:
            if self._writer is not None:  # a failed writer: stop its thread, keep the durable rows
                self._writer.close()
                self._writer = None
            self._spare = []
            self._buf = None
            self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    def stored_epochs(self) -> list[int]:
        """Epoch indices of this split on disk."""
        return list_epochs(self._group)

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # keep what was recorded, but do not mask the exception already on its way
            self.close()
        except Exception as close_exc:
            warnings.warn(f"Recorder.close() failed while handling {exc_type.__name__}: {close_exc}", stacklevel=2)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"epoch {self.epoch}, {self.rows} rows, {self.batches} batches"
        return f"Recorder({str(self.path)!r}, split={self.split!r}: {state})"

    # --------------------------------------------------------------------------------- internal
    def _flush(self) -> None:
        """Write the partial chunk (keeping its buffer for more rows) and cut arrays to the row count."""
        writer, store = self._writer, self._store
        if writer is None or store is None:
            return
        writer.raise_error()
        if self._fill > 0:
            bt, bp = self._buf  # type: ignore[misc]
            writer.submit(self._chunk_index, bt, bp, self._fill, batches=self.batches, seal=True, recycle=False)
            writer.wait()
        else:
            writer.wait()
            store.seal_empty(self.batches)

    def _finish_epoch(self, *, closing: bool = False) -> None:
        writer, store = self._writer, self._store
        if writer is None or store is None:
            return
        self._flush()
        writer.close()
        store.mark_complete()
        self._writer = None
        self._spare = writer.drain_free() + ([self._buf] if self._buf is not None else [])
        self._buf = None
        self._apply_retention(closing=closing)

    def _apply_retention(self, *, closing: bool) -> None:
        """After reset: keep ``keep_epochs`` finished epochs. At close the last epoch always stays."""
        if self.keep_epochs is None:
            return
        keep = max(self.keep_epochs, 1) if closing else self.keep_epochs
        done = [e for e in list_epochs(self._group) if e <= self.epoch]
        for old in done[: max(0, len(done) - keep)]:
            delete_epoch(self._group, old)
