"""The Recorder's lifecycle as a state machine, checked against a plain-list model (zarr's own test style).

Rules drive one Recorder through update / compute / flush / reset (with and without an explicit
epoch, empty resets included) / close + reopen with ``mode="resume"`` (continuing, or replacing from
an explicit epoch) / injected write failures (``OSError(ENOSPC)`` from zarr's key writes for the next
n writes) / ``retry()``. The model is a list of batches per epoch plus the set of epochs the spec says
are on disk (retention with ``keep_epochs`` in {None, 0, 1, 2}; replaced epochs go when the new
epoch's first chunk is written).

Invariants: the recorder's ``rows``/``batches``/``epoch`` equal the model's. Whenever the model
knows exactly what is on disk (after a successful compute/flush/reset/close), the stored epochs are
exactly the model's, each durable row bit-exact, complete epochs sealed to their rows.
"""
from __future__ import annotations

import collections
import errno
import os
import shutil
import tempfile
from typing import Any

import numpy as np
import pytest
import zarr
import zarr.storage._local as zarr_local
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import oocmetrics
from oocmetrics.__main__ import compute_stored

SPLIT = "val"
STATS: collections.Counter = collections.Counter()  # what the runs exercised (for a look with -s)
TRAILING = (2,)


def _data(rows: int, seed: int, offset: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = (offset + rng.standard_normal((rows, *TRAILING))).astype(np.float32)
    p = (t + 0.5 * rng.standard_normal(t.shape)).astype(np.float32)
    return t, p


def _cat(batches: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


def _assert_same_metrics(res: Any, ref: Any, what: str) -> None:
    assert res.n_rows == ref.n_rows, what
    assert list(res.overall) == list(ref.overall), what
    for k, v in ref.overall.items():
        np.testing.assert_allclose(res.overall[k], v, rtol=1e-12, atol=1e-14, err_msg=f"{what}: {k}")
    for k, v in ref.per_output.items():
        np.testing.assert_allclose(res.per_output[k], v, rtol=1e-12, atol=1e-14, err_msg=f"{what}: per_output {k}")


class RecorderVsModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="oocm-state-")
        self.fault = {"left": 0, "hits": 0}
        self._real_put = zarr_local._put
        real, fault = self._real_put, self.fault

        def faulty_put(path, value, exclusive=False):  # zarr's every key write (chunks, metadata, attrs)
            if fault["left"] > 0:
                fault["left"] -= 1
                fault["hits"] += 1
                raise OSError(errno.ENOSPC, "No space left on device (injected)", str(path))
            return real(path, value, exclusive=exclusive)

        zarr_local._put = faulty_put
        self.rec: oocmetrics.Recorder | None = None
        # the model
        self.epoch = 0
        self.cur: list[tuple[np.ndarray, np.ndarray]] = []
        self.disk: dict[int, dict[str, Any]] = {}     # epoch -> {"batches": [...], "complete": bool}
        self.last_finished: int | None = None         # by this recorder
        self.replace_from: int | None = None          # resume(epoch=k): stored epochs >= k go at the first chunk
        self.materialized = False                     # the current epoch is on disk
        self.maybe_failed = False                     # a fault was injected and not yet retried away

    # ------------------------------------------------------------------------------ helpers
    def _open(self, **kwargs: Any) -> oocmetrics.Recorder:
        return oocmetrics.Recorder(
            self.dir, SPLIT, chunk_rows=self.chunk_rows, keep_epochs=self.keep, queue_chunks=4,
            split_every=2, **kwargs,
        )

    def _guard(self, name: str, fn, *, also: tuple[type[BaseException], ...] = ()) -> tuple[bool, Any]:
        """Run an entry point; while a fault may be pending, WriterError is an allowed outcome."""
        try:
            out = True, fn()
            STATS[f"{name} ok"] += 1
            return out
        except oocmetrics.WriterError as exc:
            STATS[f"{name} WriterError"] += 1
            assert self.maybe_failed, f"WriterError without an injected fault: {exc}"
            msg = str(exc)
            assert "durable" in msg and "memory" in msg and "retry()" in msg, f"WriterError message: {msg}"
            return False, exc
        except also as exc:
            STATS[f"{name} {type(exc).__name__}"] += 1
            return False, exc

    def _materialize(self) -> None:
        """The current epoch's first chunk is on disk: replaced and surplus finished epochs are gone."""
        if self.materialized or not self.cur:
            return
        if self.replace_from is not None:
            for e in [e for e in self.disk if e >= self.replace_from]:
                del self.disk[e]
            self.replace_from = None
        if self.keep is not None:
            finished = sorted(e for e, d in self.disk.items() if d["complete"] and e != self.epoch)
            for e in finished[: max(0, len(finished) - self.keep)]:
                del self.disk[e]
        self.disk[self.epoch] = {"batches": self.cur, "complete": False}
        self.materialized = True

    def _finish(self) -> None:
        """reset()/close() of an epoch with rows: seal, mark complete, keep the newest max(k, 1)."""
        self._materialize()
        self.disk[self.epoch] = {"batches": list(self.cur), "complete": True}
        if self.keep is not None:
            done = sorted(e for e, d in self.disk.items() if d["complete"])
            for e in done[: max(0, len(done) - max(self.keep, 1))]:
                del self.disk[e]
        self.last_finished = self.epoch

    def _stored(self) -> dict[int, Any]:
        if not os.path.exists(os.path.join(self.dir, SPLIT, "zarr.json")):
            return {}
        g = zarr.open_group(self.dir, mode="r")[SPLIT]  # (listing the root would warn about lock files)
        return {int(n.split("=", 1)[1]): g[n] for n in g.group_keys() if n.startswith("epoch=")}

    def _check_disk(self) -> None:
        """The model knows exactly what is stored: compare epochs, rows, flags and every durable value."""
        stored = self._stored()
        assert sorted(stored) == sorted(self.disk), (
            f"stored epochs {sorted(stored)} != model {sorted(self.disk)} (keep_epochs={self.keep})"
        )
        for e, g in stored.items():
            want = self.disk[e]
            T, P = _cat(want["batches"])
            attrs = dict(g.attrs)
            rows = attrs["rows"]
            assert attrs["complete"] is want["complete"], (e, attrs)
            # every flushed/sealed epoch holds exactly its rows (the current one was just flushed)
            assert rows == T.shape[0], f"epoch {e}: {rows} durable rows, model has {T.shape[0]}"
            assert g["y_true"].shape[0] == g["y_pred"].shape[0] == rows, f"epoch {e} not sealed to {rows} rows"
            np.testing.assert_array_equal(g["y_true"][:rows], T[:rows])
            np.testing.assert_array_equal(g["y_pred"][:rows], P[:rows])

    def _model_rows(self) -> int:
        return sum(b[0].shape[0] for b in self.cur)

    # -------------------------------------------------------------------------------- rules
    @initialize(chunk_rows=st.integers(3, 7), keep=st.sampled_from([None, 0, 1, 2]))
    def start(self, chunk_rows: int, keep: int | None) -> None:
        self.chunk_rows, self.keep = chunk_rows, keep
        self.rec = self._open(mode="create")
        assert self.rec.epoch == 0

    @rule(rows=st.sampled_from([1, 2, 3, 5, 8, 12]), seed=st.integers(0, 2**16), offset=st.sampled_from([0.0, 1e3]))
    def update(self, rows: int, seed: int, offset: float) -> None:
        t, p = _data(rows, seed, offset)
        before = self._model_rows()
        ok, _ = self._guard("update", lambda: self.rec.update(t, p))
        if ok or self.rec.rows == before + rows:  # after a WriterError the batch is whole or absent
            self.cur.append((t, p))

    @precondition(lambda self: self.cur)
    @rule()
    def compute(self) -> None:
        ok, res = self._guard("compute", self.rec.compute)
        if not ok:
            return
        T, P = _cat(self.cur)
        _assert_same_metrics(res, oocmetrics.compute_arrays(T, P, chunk_rows=self.chunk_rows), "compute()")
        assert (res.epoch, res.split) == (self.epoch, SPLIT)
        ok2, again = self._guard("compute", self.rec.compute)
        if ok2:
            assert again is not res, "compute() must return a fresh object each call"
            res.overall["mse"] = -1.0
            res.per_output["mse"][:] = -1.0
            assert self.rec.compute()["mse"] >= 0, "changing one result changed the next"
        self._materialize()
        self._check_disk()

    @rule()
    def flush(self) -> None:
        ok, _ = self._guard("flush", self.rec.flush)
        if ok:
            self._materialize()
            self._check_disk()

    @precondition(lambda self: not (self.replace_from is not None and not self.cur))
    @rule(explicit=st.booleans(), delta=st.integers(1, 3))
    def reset(self, explicit: bool, delta: int) -> None:
        known = [self.epoch, *self.disk, *([self.last_finished] if self.last_finished is not None else [])]
        k = max(known) + delta
        ok, _ = self._guard("reset", lambda: self.rec.reset(epoch=k) if explicit else self.rec.reset())
        if not ok:  # nothing finished, nothing lost: the same epoch, the same rows
            assert (self.rec.epoch, self.rec.rows) == (self.epoch, self._model_rows())
            return
        if self.cur:
            self._finish()
            self.epoch = k if explicit else self.epoch + 1
            self.cur, self.materialized = [], False
        elif explicit:  # an empty epoch: reset(epoch=k) only renumbers it
            self.epoch = k
        # an empty reset() does not advance
        assert self.rec.epoch == self.epoch and self.rec.rows == 0
        self._check_disk()

    @rule(data=st.data())
    def reset_to_an_old_epoch_raises(self, data) -> None:
        floor = self.epoch if self.cur else self.last_finished
        if floor is None:
            return
        k = data.draw(st.integers(0, floor), label="epoch")
        ok, exc = self._guard("reset(old epoch)", lambda: self.rec.reset(epoch=k), also=(ValueError,))
        assert not ok, f"reset(epoch={k}) after finishing epoch {self.last_finished} (current {self.epoch}) did not raise"
        if isinstance(exc, ValueError):
            assert str(k) in str(exc)
        assert (self.rec.epoch, self.rec.rows) == (self.epoch, self._model_rows()), "a refused reset changed the state"

    @rule(n=st.integers(1, 3))
    def inject_write_failures(self, n: int) -> None:
        self.fault["left"] = n
        self.maybe_failed = True

    @precondition(lambda self: self.maybe_failed)
    @rule()
    def fix_disk_and_retry(self) -> None:
        self.fault["left"] = 0
        self.rec.retry()
        self.maybe_failed = False

    @rule(explicit=st.booleans(), data=st.data())
    def close_and_resume(self, explicit: bool, data) -> None:
        ok, _ = self._guard("close", self.rec.close)
        if not ok:  # disk full at close: the recorder stays open and holds everything
            assert not self.rec.closed, "close() failed with WriterError but the recorder says it is closed"
            assert self.rec.rows == self._model_rows()
            self.fault["left"] = 0
            self.rec.retry()
            self.rec.close()
        assert self.rec.closed
        self.rec.close()  # idempotent
        if self.cur:
            self._finish()
        self.maybe_failed = False
        self.fault["left"] = 0
        self._check_disk()
        if explicit:
            k = data.draw(st.integers(0, max([self.epoch, *self.disk]) + 2), label="resume epoch")
            self.rec = self._open(mode="resume", epoch=k)
            STATS["resume epoch=k" + (" replacing" if any(e >= k for e in self.disk) else "")] += 1
            self.epoch = k
            self.replace_from = k if any(e >= k for e in self.disk) else None
        else:
            self.rec = self._open(mode="resume")
            STATS["resume"] += 1
            if self.disk:
                last = max(self.disk)
                assert self.disk[last]["complete"]  # every close above sealed its epoch
                self.epoch = last + 1
            else:
                assert isinstance(self.rec.epoch, int) and self.rec.epoch >= 0
                self.epoch = self.rec.epoch
            self.replace_from = None
        assert self.rec.epoch == self.epoch, f"resume chose epoch {self.rec.epoch}, model {self.epoch}"
        self.cur, self.materialized, self.last_finished = [], False, None

    # --------------------------------------------------------------------------- invariants
    @invariant()
    def counts_match(self) -> None:
        if self.rec is None:
            return
        assert self.rec.rows == self._model_rows()
        assert self.rec.batches == len(self.cur)
        assert self.rec.epoch == self.epoch

    def teardown(self) -> None:
        try:
            if self.rec is not None and not self.rec.closed:
                self.fault["left"] = 0
                self.rec.retry()
                self.rec.close()
                if self.cur:
                    self._finish()
                self._check_disk()
                for e, want in self.disk.items():  # what a later reader computes
                    T, P = _cat(want["batches"])
                    _assert_same_metrics(
                        compute_stored(self.dir, SPLIT, e), oocmetrics.compute_arrays(T, P, chunk_rows=self.chunk_rows),
                        f"compute_stored epoch {e}",
                    )
        finally:
            zarr_local._put = self._real_put
            shutil.rmtree(self.dir, ignore_errors=True)


RecorderVsModel.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
TestRecorderVsModel = RecorderVsModel.TestCase
