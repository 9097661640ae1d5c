"""The Recorder as a state machine, checked against a plain list of batches (zarr's own test style)."""
from __future__ import annotations

import shutil
import tempfile

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import oocmetrics
from reference import assert_matches


class RecorderVsList(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="oocm-state-")
        self.rec = oocmetrics.Recorder(self.dir, "val", chunk_rows=3, keep_epochs=None, split_every=2)
        self.batches: list[tuple[np.ndarray, np.ndarray]] = []
        self.finished: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        self.rng = np.random.default_rng(0)

    @rule(rows=st.integers(0, 7), offset=st.sampled_from([0.0, 1e4]))
    def update(self, rows, offset):
        t = (offset + self.rng.standard_normal((rows, 2, 3))).astype(np.float32)
        p = (t + self.rng.standard_normal(t.shape)).astype(np.float32)
        self.rec.update(t, p)
        if rows:
            self.batches.append((t, p))

    @rule()
    def bad_update_changes_nothing(self):
        with pytest.raises((ValueError, TypeError)):
            self.rec.update(np.zeros((2, 2, 4), np.float32), np.zeros((2, 2, 4), np.float32)) if self.batches \
                else self.rec.update(np.zeros((2, 2, 3), np.int32), np.zeros((2, 2, 3), np.int32))

    @precondition(lambda self: self.batches)
    @rule()
    def compute(self):
        t = np.concatenate([b[0] for b in self.batches])
        p = np.concatenate([b[1] for b in self.batches])
        assert_matches(self.rec.compute(), t, p)

    @rule()
    def reset(self):
        if self.batches:
            self.finished[self.rec.epoch] = self.batches
        self.rec.reset()
        self.batches = []

    @invariant()
    def counts_match(self):
        assert self.rec.rows == sum(b[0].shape[0] for b in self.batches)
        assert set(self.finished) <= set(self.rec.stored_epochs())

    def teardown(self):
        self.rec.close()
        for epoch, batches in self.finished.items():
            from oocmetrics.__main__ import compute_stored

            t = np.concatenate([b[0] for b in batches])
            p = np.concatenate([b[1] for b in batches])
            assert_matches(compute_stored(self.dir, "val", epoch), t, p)
        shutil.rmtree(self.dir, ignore_errors=True)


RecorderVsList.TestCase.settings = settings(max_examples=15, stateful_step_count=12, deadline=None, derandomize=True)
TestRecorderVsList = RecorderVsList.TestCase
