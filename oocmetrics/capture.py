"""GPU capture: stage CUDA batches in device-side chunk buffers; drain each full chunk to pinned host memory.

The training thread never waits for the device. Per batch, :meth:`DeviceStager.append` enqueues one
device-to-device copy per array into the current chunk buffer (float16/bfloat16 are widened to
float32 on the device, which is exact). When a chunk is full it enqueues, on a side stream that
first waits for the training stream, one non-blocking copy into pinned host memory, records a CUDA
event and returns a :class:`ReadyChunk`. A consumer thread (the recorder's writer) calls
:meth:`ReadyChunk.wait` (the event's synchronize, then the chunk's NaN/Inf verdict), reads the host
arrays, and calls :meth:`ReadyChunk.release` to give the slot back to the ring.

NaN/Inf are checked on the device, per chunk, not per batch: at each chunk boundary a few reductions
give one integer (the first non-finite row and its array, or "the batch that continues past this
chunk has one"), copied to the host with the chunk. ``wait()`` raises :class:`NonFiniteBatchError`
naming the batch. Nothing syncs; the report comes at the chunk boundary (a full chunk, or ``flush``).

Ring rules (PyTorch's ``pinmem_nonblock`` tutorial; vLLM ``gpu/async_utils.py``):

- a slot's device buffers are written only while it is the current slot, and a slot taken from the
  free ring is written only after the training stream has waited on the slot's last copy event
  (device side: no host sync);
- its pinned buffers are written only by its own copy, once the consumer has released the slot;
- a ``flush`` copies the partial chunk but keeps the slot current; the slot's next copy waits (on
  the host) until that sealed chunk is released.

Everything runs the same with ``device="cpu"`` (events are None, copies are synchronous, nothing is
pinned), which is how the logic is tested without a GPU.

Interrupt safety (a batch is staged whole or not at all): :meth:`DeviceStager.stage` changes nothing
the stager reports (rows, batches, chunks, slot ownership); it only writes device rows that no one
owns yet. :meth:`DeviceStager.commit` enqueues the copies, then makes the batch count with one
assignment. Run ``commit`` and the hand-off of its chunks with SIGINT deferred (the recorder's
``_DeferInterrupt``); an interrupt after the assignment but before the caller holds the returned
list would lose those chunks' slots.

This module imports torch; the recorder imports it only for CUDA batches (``Recorder`` takes this
path for an epoch whose first batch is a pair of CUDA tensors).
"""
from __future__ import annotations

import itertools
import math
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch

__all__ = [
    "DeviceStager", "ReadyChunk", "Staged", "NonFiniteBatchError", "check_pair", "is_cuda_batch", "tensor_layout",
    "stored_dtype",
]

_ARRAYS = ("y_true", "y_pred")
_NP2TORCH = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}
_NARROW = (torch.float16, torch.bfloat16, torch.float32)


# ------------------------------------------------------------------------------------------ checks
def stored_dtype(dtype: torch.dtype) -> np.dtype:
    """How a tensor dtype is stored (as ``validation.store_dtype``): float64 stays, narrower floats become float32."""
    if dtype == torch.float64:
        return np.dtype(np.float64)
    if dtype in _NARROW:
        return np.dtype(np.float32)
    raise TypeError(
        f"dtype {dtype}; expected a floating dtype (float16, bfloat16, float32, float64). Cast it first, "
        f"e.g. y_pred.float()."
    )


def check_pair(y_true: Any, y_pred: Any, batch_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Types, dtypes, shapes and devices of a (y_true, y_pred) tensor pair (detached): metadata only, no sync."""
    for name, x in (("y_true", y_true), ("y_pred", y_pred)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"{name} in batch {batch_index} is a {type(x).__name__}; DeviceStager takes torch tensors. "
                f"Pass the tensors themselves (not .cpu().numpy()), or record host arrays through the "
                f"Recorder's host path."
            )
        if not x.is_floating_point():
            raise TypeError(
                f"{name} in batch {batch_index} has dtype {x.dtype}; expected a floating dtype (float16, "
                f"bfloat16, float32, float64). Cast it first, e.g. {name}.float()."
            )
    if y_true.ndim == 0:
        raise ValueError(
            f"y_true in batch {batch_index} is a scalar; expected a tensor whose first axis is the batch "
            f"(rows), e.g. shape (16, 500, 20) or (16,)."
        )
    if y_pred.shape != y_true.shape:
        raise ValueError(
            f"Expected y_pred to have the shape of y_true {tuple(y_true.shape)}, but got {tuple(y_pred.shape)} "
            f"(batch {batch_index}). Pass (y_true, y_pred) in that order, with matching shapes."
        )
    if y_true.device != y_pred.device:
        raise TypeError(
            f"y_true is on {y_true.device} but y_pred is on {y_pred.device} (batch {batch_index}); pass both "
            f"on one device, e.g. y_true.to(y_pred.device, non_blocking=True)."
        )
    return y_true.detach(), y_pred.detach()


def is_cuda_batch(y_true: Any, y_pred: Any) -> bool:
    """True when both are torch tensors on the same CUDA device (the batches :class:`DeviceStager` is for)."""
    return (isinstance(y_true, torch.Tensor) and isinstance(y_pred, torch.Tensor) and y_true.is_cuda
            and y_pred.is_cuda and y_true.device == y_pred.device)


def tensor_layout(y_true: Any, y_pred: Any) -> tuple[tuple[int, ...], tuple[np.dtype, np.dtype], torch.device]:
    """``(trailing shape, stored NumPy dtypes, device)`` of a first batch, checked; what a stager is built from."""
    t, p = check_pair(y_true, y_pred, 0)
    return tuple(int(d) for d in t.shape[1:]), (stored_dtype(t.dtype), stored_dtype(p.dtype)), t.device


# ------------------------------------------------------------------------------------------ pieces
class _Slot:
    """One ring entry: device chunk buffers, their pinned host copies, host label rows, verdict, event."""

    __slots__ = ("number", "dev", "host", "views", "labels", "flag", "event")

    def __init__(self, number: int, chunk_rows: int, trailing: tuple[int, ...], dtypes: tuple[np.dtype, ...],
                 n_labels: int, device: torch.device, code_dtype: torch.dtype) -> None:
        cuda = device.type == "cuda"
        shape = (chunk_rows, *trailing)
        self.number = number
        self.dev = tuple(torch.empty(shape, dtype=_NP2TORCH[d], device=device) for d in dtypes)
        # pinning blocks (and syncs): it happens here, when the stager is built, never per batch
        self.host = tuple(torch.empty(shape, dtype=_NP2TORCH[d], pin_memory=cuda) for d in dtypes)
        self.views = tuple(h.numpy() for h in self.host)
        self.labels = tuple(np.empty(chunk_rows, np.int64) for _ in range(n_labels))  # written on the host
        self.flag = torch.full((), -1, dtype=code_dtype, pin_memory=cuda)  # the chunk's NaN/Inf code
        self.event = torch.cuda.Event(blocking=True) if cuda else None  # blocking: the consumer sleeps


class _Lease(NamedTuple):
    """A slot handed to the consumer as a ReadyChunk (sealed: a flushed partial chunk, slot still current)."""

    ticket: int
    slot: _Slot
    index: int
    sealed: bool


class _Full(NamedTuple):
    slot: _Slot
    index: int
    code: torch.Tensor | None
    batches: int


@dataclass(frozen=True, eq=False)
class _State:
    """Everything the stager reports, replaced by one assignment (an interrupt sees the old or the new)."""

    version: int = 0  # bumped by commit / flush / rewind / reset, not by release
    rows: int = 0
    batches: int = 0
    chunk_index: int = 0  # index of the chunk the current slot will become
    slot: _Slot | None = None  # the current slot
    fill: int = 0
    spans: list[tuple[int, int, int]] = field(default_factory=list)  # (batch, first row, rows) of the
    nspans: int = 0  # current chunk's batches: the first nspans entries count, later ones are left-overs
    free: tuple[_Slot, ...] = ()
    ring: tuple[_Slot, ...] = ()
    leases: tuple[_Lease, ...] = ()
    closed: bool = False


@dataclass(frozen=True, eq=False)
class Staged:
    """A batch copied into the device buffers but not yet counted; :meth:`DeviceStager.commit` counts it."""

    n: int  # rows
    batch_index: int
    row_start: int
    full_chunks: int  # chunks commit will hand out
    _stager: "DeviceStager" = field(repr=False)
    _version: int = field(repr=False)
    _taken: tuple[_Slot, ...] = field(repr=False)
    _fulls: tuple[_Full, ...] = field(repr=False)
    _end: tuple[_Slot | None, int] = field(repr=False)
    _next_index: int = field(repr=False)


class NonFiniteBatchError(ValueError):
    """A staged batch held NaN/Inf, found when its chunk reached the host (``ReadyChunk.wait``).

    ``valid_rows``: rows of ``chunk`` before the batch (clean); ``DeviceStager.rewind(err.chunk,
    err.valid_rows)`` keeps them and drops the batch and everything staged after it.
    """

    def __init__(self, name: str, batch_index: int, batch_rows: tuple[int, int], first_row: int | None,
                 chunk: "ReadyChunk", valid_rows: int) -> None:
        self.name = name
        self.batch_index = batch_index
        self.batch_rows = batch_rows  # [start, stop) in the epoch
        self.first_row = first_row  # epoch row of the first non-finite value, if it lies in this chunk
        self.chunk = chunk
        self.chunk_index = chunk.index
        self.valid_rows = valid_rows
        s, e = batch_rows
        k0 = chunk.row_start
        where = (f", the first at row {first_row}" if first_row is not None else
                 f", in its rows past chunk {chunk.index} (the batch continues into the next chunk)")
        clean = f"rows {k0}-{k0 + valid_rows - 1} before it are clean" if valid_rows else "no rows before it"
        super().__init__(
            f"{name} in batch {batch_index} (rows {s}-{e - 1} of this epoch) has non-finite value(s) (NaN/Inf)"
            f"{where}; found on the device when chunk {chunk.index} (rows {k0}-{k0 + chunk.n - 1}) was copied "
            f"to the host. In that chunk {clean}; DeviceStager.rewind(err.chunk, err.valid_rows) keeps them "
            f"and drops the batch and every row staged after it. Fix the data or model, or stage with "
            f"check_finite=False (Recorder: nonfinite='skip') to store non-finite values."
        )


class ReadyChunk:
    """A chunk on its way to the host.

    ``t`` / ``p`` are NumPy views of the first ``n`` rows of pinned host buffers (``labels``: name ->
    int64 rows), valid after :meth:`wait` and until :meth:`release`. ``index``: the chunk's index in
    the epoch (rows ``row_start`` to ``row_start + n``); ``batches``: batches complete at its end;
    ``sealed``: a partial chunk from :meth:`DeviceStager.flush` (its index comes again, fuller, later);
    ``spans``: ``(batch, first row, rows)`` of each batch with rows in it.
    """

    __slots__ = ("index", "n", "row_start", "batches", "spans", "sealed", "t", "p", "labels", "checked",
                 "_stager", "_slot", "_ticket", "_code")

    def __init__(self, stager: "DeviceStager", slot: _Slot, ticket: int, index: int, n: int, batches: int,
                 spans: tuple[tuple[int, int, int], ...], sealed: bool, code: torch.Tensor | None) -> None:
        self.index = index
        self.n = n
        self.row_start = index * stager.chunk_rows
        self.batches = batches
        self.spans = spans
        self.sealed = sealed
        self.t = slot.views[0][:n]
        self.p = slot.views[1][:n]
        self.labels = {name: buf[:n] for name, buf in zip(stager.labels, slot.labels)}
        self.checked = code is not None  # whether wait() checks for NaN/Inf (the stager's check_finite)
        self._stager = stager
        self._slot = slot
        self._ticket = ticket
        self._code = code  # the device verdict: kept alive until the copy of it has run

    def is_copied(self) -> bool:
        """Whether the copy to the host has finished (non-blocking: ``event.query()``)."""
        ev = self._slot.event
        return True if ev is None else bool(ev.query())

    def wait(self) -> None:
        """Block until the host buffers hold the chunk; then raise NonFiniteBatchError if a batch in it
        held NaN/Inf (when checked). Call it before reading ``t`` / ``p``; calling it again is harmless."""
        if not self._stager._leased(self._ticket):
            raise RuntimeError(
                f"wait() on chunk {self.index}, which was released, or discarded by DeviceStager.rewind()/"
                f"reset()/close(): its host buffers may already hold other rows. Call wait() before "
                f"release(), and drop chunks that a rewind discarded."
            )
        ev = self._slot.event
        if ev is not None:
            ev.synchronize()
        if self.checked:
            code = int(self._slot.flag)
            if code < self._stager._clean_code:
                raise self._nonfinite(code)

    def release(self) -> None:
        """Give the slot back to the ring (after writing the chunk). Idempotent; a no-op after a rewind/reset."""
        self._stager._release(self._ticket)
        self._code = None

    def _nonfinite(self, code: int) -> NonFiniteBatchError:
        C = self._stager.chunk_rows
        name = _ARRAYS[code % 2]
        if code < 2 * C:  # a row of this chunk
            row: int | None = self.row_start + code // 2
            b, s, m = next(sp for sp in self.spans if sp[1] <= row < sp[1] + sp[2])  # type: ignore[operator]
        else:  # the last batch of this chunk has a non-finite value in its rows past the chunk
            row = None
            b, s, m = self.spans[-1]
        return NonFiniteBatchError(name, b, (s, s + m), row, self, max(0, s - self.row_start))

    def __repr__(self) -> str:
        kind = "sealed " if self.sealed else ""
        return f"ReadyChunk({kind}chunk {self.index}: rows {self.row_start}-{self.row_start + self.n - 1})"


# ------------------------------------------------------------------------------------------ stager
class DeviceStager:
    """A ring of chunk slots that stages (y_true, y_pred) tensors on their device, one epoch at a time.

    Args:
        chunk_rows: rows per chunk (the recorder's chunk grid).
        trailing: the shape of one row, e.g. ``(500, 20)``.
        dtypes: stored dtypes of y_true and y_pred, float32 or float64 (see :func:`stored_dtype`):
            float16/bfloat16/float32 batches go into float32, float64 needs float64.
        device: ``"cuda"``/``"cuda:<i>"``, or ``"cpu"`` (no pinning, no events: for tests).
        slots: chunk slots in the ring, >= 2 (current + in flight); the recorder's ``queue_chunks + 1``.
            Device and pinned memory: ``slots * chunk_rows * row bytes`` each, allocated here.
        check_finite: check every chunk for NaN/Inf on the device; :meth:`ReadyChunk.wait` raises
            :class:`NonFiniteBatchError` naming the first bad batch.
        labels: names of per-row int64 labels (e.g. ``("ids",)``) staged on the host beside the rows.
        wait_timeout: seconds to wait for the consumer to release a slot before a RuntimeError
            (None: wait as long as it takes, as ``ChunkWriter.acquire`` does).
        poll: called about every 50 ms while ``stage``/``flush`` wait for the consumer; raise from it
            to give up the wait, leaving the stager as it was (e.g. when the writer thread has failed
            and will release nothing more). It runs with the stager's lock held: it must not call the stager.

    One producer thread calls ``stage/commit/append/flush/rewind/reset``; ``ReadyChunk.wait`` and
    ``release`` may run on any thread. A batch larger than the free ring grows the ring (allocating,
    and pinning, more slots: a sync, once).
    """

    def __init__(
        self,
        chunk_rows: int,
        trailing: Sequence[int] = (),
        dtypes: Sequence[Any] = (np.float32, np.float32),
        *,
        device: str | torch.device = "cuda",
        slots: int = 2,
        check_finite: bool = True,
        labels: Sequence[str] = (),
        wait_timeout: float | None = None,
        poll: Callable[[], None] | None = None,
    ) -> None:
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, (int, np.integer)) or chunk_rows < 1:
            raise ValueError(f"chunk_rows={chunk_rows!r}; expected a positive int, e.g. 512.")
        trailing_t = tuple(trailing)
        if not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 for d in trailing_t):
            raise ValueError(
                f"trailing={trailing!r}; expected the shape of one row, e.g. (500, 20), or () for scalars."
            )
        if len(dtypes) != 2:
            raise ValueError(f"dtypes={dtypes!r}; expected two dtypes (y_true, y_pred), e.g. (np.float32, np.float32).")
        np_dtypes = tuple(_as_np_dtype(d) for d in dtypes)
        if isinstance(slots, bool) or not isinstance(slots, (int, np.integer)) or slots < 2:
            raise ValueError(f"slots={slots!r}; expected an int >= 2 (one slot fills while another drains).")
        if wait_timeout is not None and not wait_timeout > 0:
            raise ValueError(
                f"wait_timeout={wait_timeout!r}; expected seconds > 0, or None to wait as long as it takes."
            )
        names = () if isinstance(labels, str) else tuple(labels)
        if isinstance(labels, str) or len(set(names)) != len(names) or not all(isinstance(x, str) and x for x in names):
            raise ValueError(f"labels={labels!r}; expected distinct non-empty names, e.g. ('ids', 'groups').")
        self.device = _as_device(device)
        self.chunk_rows = int(chunk_rows)
        self.trailing = tuple(int(d) for d in trailing_t)
        self.dtypes: tuple[np.dtype, np.dtype] = np_dtypes  # type: ignore[assignment]
        self.check_finite = bool(check_finite)
        self.labels = names
        self.wait_timeout = wait_timeout
        self._poll = poll
        self._cuda = self.device.type == "cuda"
        self._row_size = math.prod(self.trailing)
        C = self.chunk_rows
        # the verdict of a chunk: 2*row + array for its first non-finite value, 2C (+1) for the batch that
        # continues past it, 2C + 2 for "clean"; int32 while that fits
        self._clean_code = 2 * C + 2
        self._code_dtype = torch.int32 if self._clean_code < 2**31 else torch.int64
        if self.check_finite:
            with torch.inference_mode(False):  # a stager built in an eval loop serves training loops too
                even = torch.arange(0, 2 * C, 2, dtype=self._code_dtype, device=self.device)
                self._even, self._odd = even, even + 1
                self._clean, self._tail_t, self._tail_p = (
                    torch.tensor(v, dtype=self._code_dtype, device=self.device) for v in (2 * C + 2, 2 * C, 2 * C + 1))
        self._copy_stream = torch.cuda.Stream(device=self.device) if self._cuda else None
        self._cond = threading.Condition()
        self._tickets = itertools.count()
        self._last_stage: Staged | None = None  # the only Staged that commit accepts
        ring = tuple(self._make_slot(i) for i in range(int(slots)))
        self._state = _State(ring=ring, free=ring)

    @classmethod
    def for_batch(cls, y_true: Any, y_pred: Any, chunk_rows: int, **kwargs: Any) -> "DeviceStager":
        """A stager laid out for this first batch: its trailing shape, stored dtypes and device."""
        trailing, dtypes, device = tensor_layout(y_true, y_pred)
        return cls(chunk_rows, trailing, dtypes, device=device, **kwargs)

    # ------------------------------------------------------------------------------- reporting
    @property
    def rows(self) -> int:
        """Rows committed in this epoch."""
        return self._state.rows

    @property
    def batches(self) -> int:
        """Batches committed in this epoch (the index the next batch gets)."""
        return self._state.batches

    @property
    def fill(self) -> int:
        """Rows in the current (partial) chunk."""
        return self._state.fill

    @property
    def chunk_index(self) -> int:
        """Index of the chunk being filled."""
        return self._state.chunk_index

    @property
    def in_flight(self) -> int:
        """Chunks handed out and not yet released."""
        return len(self._state.leases)

    @property
    def n_slots(self) -> int:
        """Slots in the ring (more than ``slots`` after a batch larger than the ring)."""
        return len(self._state.ring)

    @property
    def closed(self) -> bool:
        return self._state.closed

    def __repr__(self) -> str:
        st = self._state
        state = "closed" if st.closed else (f"{st.rows} rows, {st.batches} batches, chunk {st.chunk_index} at "
                                             f"{st.fill}/{self.chunk_rows}, {len(st.leases)} in flight")
        return (f"DeviceStager({self.device}, rows of {self.trailing} {self.dtypes[0]}/{self.dtypes[1]}, "
                f"{len(st.ring)} slots: {state})")

    # ---------------------------------------------------------------------------- the batch path
    def append(self, y_true: Any, y_pred: Any, labels: Sequence[np.ndarray] = ()) -> list[ReadyChunk]:
        """Stage and commit one batch; return the chunks it filled (usually none, sometimes one).

        ``stage`` + ``commit``: an exception in stage changes nothing; see :meth:`commit` for interrupts.
        """
        return self.commit(self.stage(y_true, y_pred, labels))

    def stage(self, y_true: Any, y_pred: Any, labels: Sequence[np.ndarray] = ()) -> Staged:
        """Check one batch and copy its rows into device slots, changing nothing the stager reports.

        Only rows past the current fill and slots of the free ring are written, so an exception or
        interrupt here leaves the stager as it was. May wait for the consumer to release a slot
        (backpressure). ``labels``: int64 arrays of the batch's rows, in the order of ``labels=``.
        """
        st = self._live()
        self._last_stage = None  # this call writes where an earlier Staged's rows are: that one is void now
        b = st.batches
        t, p = check_pair(y_true, y_pred, b)
        self._check_layout(t, p, b)
        labs = self._check_labels(labels, int(t.shape[0]), b)
        n, C = int(t.shape[0]), self.chunk_rows
        cur, fill = st.slot, st.fill
        if n == 0:
            self._last_stage = Staged(0, b, st.rows, 0, self, st.version, (), (), (cur, fill), st.chunk_index)
            return self._last_stage
        k0 = min(n, C - fill) if cur is not None else 0
        n_fresh = -(-(n - k0) // C)
        if cur is not None and fill + k0 == C:  # the current slot fills: its next copy needs the pinned buffer
            self._await(lambda s: not _sealed_out(s, cur), f"the flushed chunk {st.chunk_index} to be released")
        fresh = self._reserve(n_fresh, holding=cur is not None)
        stream = torch.cuda.current_stream(self.device) if self._cuda else None
        targets = ([(cur, fill)] if cur is not None else []) + [(s, 0) for s in fresh]
        fulls: list[_Full] = []
        end: tuple[_Slot | None, int] = (None, 0)
        batch_code: torch.Tensor | None = None
        index, done = st.chunk_index, 0
        # inputs are detached and the buffers never require grad: no autograd graph, no no_grad() needed
        for slot, start in targets:
            if start == 0 and stream is not None:
                stream.wait_event(slot.event)  # its last copy has read the device buffer (device-side wait)
            k = min(n - done, C - start)
            self._copy_rows(slot, start, (t, p), labs, done, k)
            done += k
            if start + k < C:
                end = (slot, start + k)  # only the last target can stay partial
                continue
            code = None
            if self.check_finite:
                code = self._rows_code(slot, C)
                if done < n:  # this batch goes on past the chunk: a bad row there is this chunk's too
                    if batch_code is None:
                        batch_code = self._batch_code(t, p)
                    code = torch.minimum(code, batch_code)
            fulls.append(_Full(slot, index, code, b + (done == n)))
            index += 1
        self._last_stage = Staged(n, b, st.rows, len(fulls), self, st.version, tuple(fresh), tuple(fulls), end, index)
        return self._last_stage

    def commit(self, staged: Staged) -> list[ReadyChunk]:
        """Count a staged batch: enqueue the copies of the chunks it filled and hand them out.

        The state changes in one assignment at the end: an exception or interrupt before it leaves the
        stager as it was (the enqueued copies only write pinned buffers nobody reads). Run commit and the
        hand-off of its chunks with SIGINT deferred: after the assignment the chunks' slots are leased.
        """
        if not isinstance(staged, Staged) or staged._stager is not self:
            raise ValueError(f"commit() takes a Staged returned by this stager's stage(), got {staged!r}.")
        st = self._live()
        if staged is not self._last_stage or staged._version != st.version:
            raise RuntimeError(
                f"commit() of a stale Staged (batch {staged.batch_index}): the stager changed since stage() "
                f"(another stage, a commit, flush, rewind or reset came between). Stage the batch again."
            )
        n, C = staged.n, self.chunk_rows
        span = (staged.batch_index, staged.row_start, n)
        chunks: list[ReadyChunk] = []
        prior = tuple(st.spans[:st.nspans]) if staged._fulls and st.slot is not None else ()
        for i, f in enumerate(staged._fulls):
            self._enqueue_copy(f.slot, C, f.code)
            chunks.append(ReadyChunk(self, f.slot, next(self._tickets), f.index, C, f.batches,
                                     prior + (span,) if i == 0 else (span,), False, f.code))
        end_slot, end_fill = staged._end
        if n == 0:
            spans, nspans = st.spans, st.nspans
        elif end_slot is None:
            spans, nspans = [], 0
        elif end_slot is st.slot:  # the batch stayed inside the current chunk
            spans = st.spans
            del spans[st.nspans:]  # left-overs of an interrupted commit
            spans.append(span)
            nspans = st.nspans + 1
        else:
            spans, nspans = [span], 1
        leases = tuple(_Lease(c._ticket, c._slot, c.index, False) for c in chunks)
        with self._cond:
            cur = self._state
            assert all(any(s is f for f in cur.free) for s in staged._taken), "a staged slot left the free ring"
            free = tuple(s for s in cur.free if not any(s is x for x in staged._taken))
            self._state = _State(  # the commit: one assignment
                version=cur.version + 1, rows=cur.rows + n, batches=cur.batches + 1, chunk_index=staged._next_index,
                slot=end_slot, fill=end_fill, spans=spans, nspans=nspans, free=free, ring=cur.ring,
                leases=cur.leases + leases,
            )
        return chunks

    def flush(self) -> ReadyChunk | None:
        """Hand out the current partial chunk (sealed), keeping its slot current for more rows.

        None when the current chunk is empty. Waits until a previous sealed chunk of the same slot was
        released (its pinned buffer is reused). Each call copies the partial chunk again: callers that
        flush often should skip flushes with no new rows (the recorder's ``_sealed_rows``).
        """
        st = self._live()
        slot = st.slot
        if slot is None or st.fill == 0:
            return None
        self._await(lambda s: not _sealed_out(s, slot), f"the flushed chunk {st.chunk_index} to be released")
        st = self._live()
        code = self._rows_code(slot, st.fill) if self.check_finite else None
        self._enqueue_copy(slot, st.fill, code)
        chunk = ReadyChunk(self, slot, next(self._tickets), st.chunk_index, st.fill, st.batches,
                           tuple(st.spans[:st.nspans]), True, code)
        with self._cond:
            cur = self._state
            self._state = replace(cur, version=cur.version + 1,
                                  leases=cur.leases + (_Lease(chunk._ticket, slot, chunk.index, True),))
        return chunk

    def rewind(self, chunk: ReadyChunk, keep_rows: int) -> None:
        """Go back to ``chunk`` holding its first ``keep_rows`` rows; drop every row staged after them.

        For a NaN/Inf report: ``rewind(err.chunk, err.valid_rows)``. The cut must fall between batches.
        Every chunk handed out before ``chunk`` must be released; ``chunk`` and every later chunk are
        discarded (the consumer must drop them: their ``release`` becomes a no-op, ``wait`` raises).
        """
        if not isinstance(chunk, ReadyChunk) or chunk._stager is not self:
            raise ValueError(f"rewind() takes a ReadyChunk of this stager, got {chunk!r}.")
        st = self._live()
        if not any(lease.ticket == chunk._ticket for lease in st.leases):
            raise RuntimeError(
                f"rewind() to chunk {chunk.index}, which was already released or discarded; rewind to the "
                f"chunk whose wait() raised, before releasing it."
            )
        earlier = sorted(lease.index for lease in st.leases if lease.ticket < chunk._ticket)
        if earlier:
            raise RuntimeError(
                f"rewind() to chunk {chunk.index} while chunk(s) {earlier}, handed out before it, are not "
                f"released; write and release them first (the consumer works in order)."
            )
        C = self.chunk_rows
        if isinstance(keep_rows, bool) or not isinstance(keep_rows, (int, np.integer)) or \
                not 0 <= keep_rows <= min(chunk.n, C - 1):
            raise ValueError(
                f"keep_rows={keep_rows!r}; expected an int in [0, {min(chunk.n, C - 1)}]: rows of chunk "
                f"{chunk.index} to keep (a full chunk cannot be kept whole; write and release it instead)."
            )
        cut = chunk.row_start + int(keep_rows)
        starts = {s: b for b, s, m in chunk.spans if m}
        ends = {s + m: b + 1 for b, s, m in chunk.spans if m}
        if cut in starts:
            batches = starts[cut]
        elif cut in ends:
            batches = ends[cut]
        else:
            b, s, m = next(sp for sp in chunk.spans if sp[1] < cut < sp[1] + sp[2])
            raise ValueError(
                f"keep_rows={keep_rows} cuts batch {b} (rows {s}-{s + m - 1}) in two; a batch is kept whole "
                f"or not at all. Pass the chunk row where a batch starts, e.g. err.valid_rows."
            )
        keep = chunk._slot if keep_rows else None
        if keep is not None and self._cuda:  # the discarded copy may still read it: later writes wait for it
            torch.cuda.current_stream(self.device).wait_event(keep.event)
        kept = [sp for sp in chunk.spans if sp[1] + sp[2] <= cut]
        with self._cond:
            cur = self._state
            self._state = _State(
                version=cur.version + 1, rows=cut, batches=batches, chunk_index=chunk.index, slot=keep,
                fill=int(keep_rows), spans=kept, nspans=len(kept), free=tuple(s for s in cur.ring if s is not keep),
                ring=cur.ring, leases=(),
            )
            self._cond.notify_all()

    def reset(self) -> None:
        """Start a new epoch with the same layout and slots (no new allocation, no pinning).

        Every chunk handed out must be released first; rows not flushed are dropped.
        """
        with self._cond:
            st = self._live()
            if st.leases:
                raise RuntimeError(
                    f"reset() while chunk(s) {[lease.index for lease in st.leases]} are handed out and not "
                    f"released; release them after writing (or close() the stager to drop everything)."
                )
            self._state = _State(version=st.version + 1, ring=st.ring, free=st.ring)

    def close(self) -> None:
        """Wait for the copies in flight, drop the slots; chunks still out are discarded. Idempotent."""
        with self._cond:
            st = self._state
            if st.closed:
                return
            for slot in st.ring:
                if slot.event is not None:
                    slot.event.synchronize()
            self._state = _State(version=st.version + 1, closed=True)
            self._cond.notify_all()

    # ---------------------------------------------------------------------------------- internal
    def _live(self) -> _State:
        st = self._state
        if st.closed:
            raise RuntimeError("This DeviceStager is closed; create a new one to stage more batches.")
        return st

    def _make_slot(self, number: int) -> _Slot:
        # never inference tensors (made inside torch.inference_mode()): those refuse in-place writes outside it
        with torch.inference_mode(False):
            return _Slot(number, self.chunk_rows, self.trailing, self.dtypes, len(self.labels), self.device,
                         self._code_dtype)

    def _check_layout(self, t: torch.Tensor, p: torch.Tensor, b: int) -> None:
        if t.device != self.device:
            raise TypeError(
                f"Batch {b} is on {t.device}, but this epoch stages batches on {self.device}; pass tensors on "
                f"{self.device} (y.to({str(self.device)!r}, non_blocking=True)), or start a new epoch."
            )
        if tuple(t.shape[1:]) != self.trailing:
            raise ValueError(
                f"Batch {b} has trailing shape {tuple(t.shape[1:])}, but this epoch's batches have "
                f"{self.trailing}. Axis 0 is the batch and may vary; the other axes are fixed within an epoch."
            )
        for name, x, dt in zip(_ARRAYS, (t, p), self.dtypes):
            if x.dtype == torch.float64 and dt != np.float64:
                raise TypeError(
                    f"{name} in batch {b} has dtype torch.float64, but this epoch stores {dt} (set by batch "
                    f"0); casting would lose precision. Pass {dt} (or narrower) batches, or start the epoch "
                    f"with float64 batches."
                )

    def _check_labels(self, labels: Sequence[np.ndarray], n: int, b: int) -> tuple[np.ndarray, ...]:
        labs = tuple(labels)
        if len(labs) != len(self.labels):
            raise ValueError(
                f"Batch {b} came with {len(labs)} label array(s), but this stager stages {list(self.labels)}; "
                f"pass one int64 array per name, in that order."
            )
        for name, x in zip(self.labels, labs):
            if not isinstance(x, np.ndarray) or x.dtype != np.int64:
                raise TypeError(
                    f"{name} in batch {b} is {type(x).__name__} {getattr(x, 'dtype', '')}; expected an int64 "
                    f"NumPy array (validation.check_labels returns one)."
                )
            if x.shape != (n,):
                raise ValueError(f"{name} in batch {b} has shape {x.shape}; expected ({n},): one label per row.")
        return labs

    def _copy_rows(self, slot: _Slot, start: int, arrays: tuple[torch.Tensor, torch.Tensor],
                   labels: tuple[np.ndarray, ...], done: int, k: int) -> None:
        """Rows [done, done + k) of the batch into rows [start, start + k) of the slot (widening on the device)."""
        for dst, src in zip(slot.dev, arrays):
            dst[start:start + k].copy_(src[done:done + k])
        for lab, src_lab in zip(slot.labels, labels):
            lab[start:start + k] = src_lab[done:done + k]

    def _rows_code(self, slot: _Slot, n: int) -> torch.Tensor:
        """On the device: 2*row (+1 for y_pred) of the first non-finite value in rows [0, n), else clean."""
        ok_t, ok_p = (torch.isfinite(d[:n]).reshape(n, self._row_size).all(dim=1) for d in slot.dev)
        return torch.where(ok_t, torch.where(ok_p, self._clean, self._odd[:n]), self._even[:n]).amin()

    def _batch_code(self, t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """On the device: 2C (y_true) / 2C + 1 (y_pred) if the batch holds a non-finite value, else clean."""
        return torch.where(torch.isfinite(t).all(),
                           torch.where(torch.isfinite(p).all(), self._clean, self._tail_p), self._tail_t)

    def _enqueue_copy(self, slot: _Slot, n: int, code: torch.Tensor | None) -> None:
        """Copy rows [0, n) and the verdict to the slot's host buffers; on CUDA non-blocking, then an event."""
        if self._cuda:
            cs = self._copy_stream
            assert cs is not None and slot.event is not None
            cs.wait_stream(torch.cuda.current_stream(self.device))  # the rows and the verdict are written
            with torch.cuda.stream(cs):
                for h, d in zip(slot.host, slot.dev):
                    h[:n].copy_(d[:n], non_blocking=True)
                if code is not None:
                    slot.flag.copy_(code, non_blocking=True)
                    code.record_stream(cs)  # made on the training stream, read here
                slot.event.record(cs)
        else:
            for h, d in zip(slot.host, slot.dev):
                h[:n].copy_(d[:n])
            if code is not None:
                slot.flag.copy_(code)

    def _reserve(self, k: int, holding: bool) -> tuple[_Slot, ...]:
        """The first k free slots (not taken: commit takes them), growing the ring when it cannot hold k."""
        if k == 0:
            return ()
        with self._cond:
            st = self._state
            short = k - (len(st.ring) - int(holding))
            if short > 0:  # a batch larger than the ring: more slots (this allocates and pins: a sync)
                new = tuple(self._make_slot(len(st.ring) + i) for i in range(short))
                self._state = replace(st, ring=st.ring + new, free=st.free + new)
            self._await_locked(lambda s: len(s.free) >= k, f"{k} free slot(s)")
            return self._state.free[:k]

    def _await(self, ready: Callable[[_State], bool], what: str) -> None:
        with self._cond:
            self._await_locked(ready, what)

    def _await_locked(self, ready: Callable[[_State], bool], what: str) -> None:
        deadline = None if self.wait_timeout is None else time.monotonic() + self.wait_timeout
        while True:
            st = self._live()
            if ready(st):
                return
            left = 0.5 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(
                    f"DeviceStager waited {self.wait_timeout:g} s for {what}, but chunk(s) "
                    f"{[lease.index for lease in st.leases]} it handed out were not released. The consumer "
                    f"must call ReadyChunk.release() after writing each chunk (a single-threaded caller: "
                    f"before appending more)."
                )
            self._cond.wait(min(left, 0.05 if self._poll is not None else 0.5))
            if self._poll is not None:
                self._poll()  # may raise: the caller's wait is abandoned, nothing was changed

    def _leased(self, ticket: int) -> bool:
        return any(lease.ticket == ticket for lease in self._state.leases)

    def _release(self, ticket: int) -> None:
        with self._cond:
            st = self._state
            for i, lease in enumerate(st.leases):
                if lease.ticket == ticket:
                    free = st.free if lease.sealed else st.free + (lease.slot,)
                    self._state = replace(st, leases=st.leases[:i] + st.leases[i + 1:], free=free)
                    self._cond.notify_all()
                    return


def _sealed_out(st: _State, slot: _Slot) -> bool:
    return any(lease.sealed and lease.slot is slot for lease in st.leases)


def _as_np_dtype(d: Any) -> np.dtype:
    if isinstance(d, torch.dtype):
        d = {torch.float32: np.float32, torch.float64: np.float64}.get(d, d)
    try:
        dt = np.dtype(d)
    except TypeError:
        dt = None
    if dt not in _NP2TORCH:
        raise ValueError(
            f"dtype {d!r}; a stager stores float32 or float64 (float16/bfloat16 batches are stored as "
            f"float32: see stored_dtype)."
        )
    return dt  # type: ignore[return-value]


def _as_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device={device!r} is not a device ({exc}); pass 'cuda', 'cuda:0' or 'cpu'.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={device!r}, but CUDA is not available here (torch {torch.__version__}); pass "
                f"device='cpu', or run on a CUDA machine."
            )
        return torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
    if dev.type != "cpu":
        raise ValueError(f"device={device!r}; a DeviceStager stages on 'cuda' (or 'cpu', for tests), not {dev.type!r}.")
    return dev
