"""Exact quantiles of |y_true - y_pred| (per output and pooled), bit for bit NumPy's ``np.quantile``,
and the bounded memory of the order-statistics passes."""
from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import oocmetrics
from oocmetrics import compute as C
from oocmetrics.__main__ import main
from oocmetrics.kernels import select

QS = (0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)


def reference(t, p, q):
    """np.quantile of |e| in float64 over the finite pairs: (Q, J) per output and (Q,) pooled."""
    q = np.asarray(q, dtype=np.float64)
    T = np.asarray(t).astype(np.float64)
    P = np.asarray(p).astype(np.float64)
    J = T.shape[-1] if T.ndim > 1 else 1  # outputs: the last axis; leading axes are rows
    T, P = T.reshape(-1, J), P.reshape(-1, J)
    ok = np.isfinite(T) & np.isfinite(P)
    with np.errstate(invalid="ignore", over="ignore"):
        E = np.abs(T - P)
        per = np.stack([np.quantile(E[ok[:, j], j], q) if ok[:, j].any() else np.full(q.size, np.nan)
                        for j in range(J)], axis=1)
        pooled = np.quantile(E[ok], q) if ok.any() else np.full(q.size, np.nan)
    return per, pooled


def same_bits(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    both_nan = np.isnan(a) & np.isnan(b)
    ok = both_nan | (a.view(np.uint64) == b.view(np.uint64))
    assert ok.all(), (a[~ok], b[~ok])


def check(t, p, q=QS, **kwargs):
    kwargs.setdefault("nonfinite", "skip")
    res = oocmetrics.compute_arrays(t, p, ["mae"], quantiles=q, **kwargs)
    per, pooled = reference(t, p, q)
    assert res.quantiles["q"] == [float(x) for x in q]
    same_bits(res.quantiles["per_output"], per)
    same_bits(res.quantiles["pooled"], pooled)
    json.dumps(res.to_dict(), allow_nan=False)
    return res


def _awkward(kind, rng):
    n, J = 61, 3
    t = rng.standard_normal((n, J))
    p = rng.standard_normal((n, J))
    if kind == "ties":
        t, p = np.round(t, 1), np.round(p, 1)
    elif kind == "equal":
        t = np.zeros((n, J))
        p = np.where(rng.random((n, J)) < 0.8, 0.25, rng.standard_normal((n, J)))
    elif kind == "signed_zero":
        t = np.where(rng.random((n, J)) < 0.5, 0.0, -0.0)
        p = np.where(rng.random((n, J)) < 0.5, -0.0, np.round(rng.standard_normal((n, J))))
    elif kind == "subnormal":
        tiny = np.float64(5e-324)
        t = rng.integers(0, 7, (n, J)) * tiny
        p = -rng.integers(0, 7, (n, J)) * tiny * np.where(rng.random((n, J)) < 0.5, 1, 1e300)
    elif kind == "nan_skip":
        t[rng.random((n, J)) < 0.2] = np.nan
        p[rng.random((n, J)) < 0.1] = np.inf
        t[:, 2] = np.nan  # an output with no finite pair: NaN quantiles
    elif kind == "overflow":
        t[::5] = 1.5e308
        p[::5] = -1.5e308  # finite pairs whose |e| is +inf: counted and ordered last, as NumPy does
    elif kind == "huge_range":
        t = t * 10.0 ** rng.integers(-300, 300, (n, J))
    return t, p


@pytest.mark.parametrize("kind", ["plain", "ties", "equal", "signed_zero", "subnormal", "nan_skip",
                                  "overflow", "huge_range"])
@pytest.mark.parametrize("chunk_rows", [1, 3, 1000])
def test_bit_equal_to_np_quantile_on_awkward_data(kind, chunk_rows):
    t, p = _awkward(kind, np.random.default_rng(7))
    check(t, p, chunk_rows=chunk_rows)


def test_order_statistics_on_chunk_edges():
    # 12 rows in chunks of 3 and 4: q chosen so (n - 1) * q lands on the first/last row of a chunk
    rng = np.random.default_rng(3)
    t, p = rng.standard_normal((12, 2)), np.zeros((12, 2))
    q = [k / 11 for k in range(12)] + [2.5 / 11, 3.5 / 11]
    for chunk_rows in (1, 3, 4, 5):
        check(t, p, q, chunk_rows=chunk_rows)


def test_one_row_one_output_and_float16():
    check(np.array([[3.0]]), np.array([[1.0]]))
    check(np.array([3.0, -1.0, 2.0]), np.array([1.0, 1.0, 1.0]), chunk_rows=1)
    rng = np.random.default_rng(5)
    t16 = rng.standard_normal((40, 4)).astype(np.float16)
    p16 = rng.standard_normal((40, 4)).astype(np.float16)
    check(t16, p16, chunk_rows=3)
    check(rng.standard_normal((30, 2, 3)).astype(np.float32), rng.standard_normal((30, 2, 3)).astype(np.float32),
          chunk_rows=4)  # (batch, time, outputs): 3 outputs


def test_defaults_validation_and_median_in_the_same_select():
    rng = np.random.default_rng(9)
    t, p = rng.standard_normal((50, 3)), rng.standard_normal((50, 3))
    res = oocmetrics.compute_arrays(t, p, ["median_absolute_error"], quantiles=True, chunk_rows=7)
    assert res.quantiles["q"] == list(C.DEFAULT_QUANTILES)
    plain = oocmetrics.compute_arrays(t, p, ["median_absolute_error"], chunk_rows=7)
    assert plain.quantiles is None and "quantiles" not in plain.to_dict()
    np.testing.assert_array_equal(res.per_output["median_absolute_error"], plain.per_output["median_absolute_error"])
    np.testing.assert_array_equal(res.per_output["median_absolute_error"], np.median(np.abs(t - p), axis=0))
    assert res.copy() == res and res != plain
    for bad in ((), (0.5, 1.5), (-0.1,), (float("nan"),)):
        with pytest.raises(ValueError, match="quantiles"):
            oocmetrics.compute_arrays(t, p, quantiles=bad)


@given(
    data=st.lists(st.sampled_from([0.0, -0.0, 0.5, 1.0, -1.0, 1e-310, 3.0, 2.5, 1e300, -1e300, np.nan, 7.25]),
                  min_size=2, max_size=120),
    J=st.integers(1, 3),
    chunk_rows=st.integers(1, 9),
    q=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=6),
)
def test_hypothesis_random_data(data, J, chunk_rows, q):
    x = np.array(data, dtype=np.float64)
    half = x.size // 2 // J * J
    if half == 0:
        return
    t, p = x[:half].reshape(-1, J), x[half:2 * half].reshape(-1, J)
    check(t, p, q, chunk_rows=chunk_rows)


@given(rows=st.integers(1, 300), J=st.integers(1, 4), seed=st.integers(0, 2**32 - 1), chunk_rows=st.integers(1, 64))
def test_hypothesis_continuous(rows, J, seed, chunk_rows):
    rng = np.random.default_rng(seed)
    t = rng.standard_normal((rows, J)).astype(np.float32)
    p = (rng.standard_normal((rows, J)) * 10.0 ** rng.integers(-8, 8)).astype(np.float32)
    check(t, p, QS, chunk_rows=chunk_rows)


def test_every_quantile_in_one_select_of_at_most_three_passes(monkeypatch):
    """All quantiles per output and pooled: one radix select; reads counted per block."""
    rng = np.random.default_rng(11)
    t = rng.standard_normal((20_000, 20)).astype(np.float32)
    p = (t + rng.standard_normal(t.shape).astype(np.float32) * np.float32(0.1))
    blocks = C.RowBlocks(t, p, t.shape[0], 1000)
    reads = []
    orig = C.RowBlocks.read
    monkeypatch.setattr(C.RowBlocks, "read", lambda self, i: (reads.append(i), orig(self, i))[1])
    counts = np.full(20, t.shape[0])
    out = C.abs_error_quantiles(blocks, counts, QS, median=True)
    assert len(reads) <= 3 * blocks.n_blocks, len(reads) / blocks.n_blocks
    per, pooled = reference(t, p, QS)
    same_bits(out["per_output"], per)
    same_bits(out["pooled"], pooled)
    np.testing.assert_array_equal(out["median"], np.median(np.abs(t.astype(np.float64) - p), axis=0))


def test_many_targets_split_over_passes_same_result(monkeypatch):
    # a histogram budget of 3 rows: targets are split over several passes, results unchanged
    monkeypatch.setattr(C, "HIST_BUDGET", 3 * select.BINS * 8)
    rng = np.random.default_rng(13)
    t, p = np.round(rng.standard_normal((300, 5)), 2), np.zeros((300, 5))
    check(t, p, chunk_rows=17)
    monkeypatch.setattr(select, "GATHER_MAX", 0)  # never gather: all 64 bits from histograms
    check(t, p, chunk_rows=17)


def sorted_reference(t, p):
    """Sorted finite |e| of each output (list) and of all outputs pooled, float64."""
    T, P = np.asarray(t, np.float64), np.asarray(p, np.float64)
    ok = np.isfinite(T) & np.isfinite(P)
    with np.errstate(invalid="ignore", over="ignore"):
        E = np.abs(T - P)
    return [np.sort(E[ok[:, j], j]) for j in range(T.shape[1])], np.sort(E[ok])


def _select_data(kind, rng, n=400, J=4):
    t = rng.standard_normal((n, J)) * 10.0 ** rng.integers(-3, 3, J)
    p = t + rng.standard_normal((n, J))
    if kind == "tied":
        p = t + np.where(rng.random((n, J)) < 0.7, 0.0, np.round(rng.standard_normal((n, J)), 1))
    elif kind == "mixed":  # one heavy tie inside a continuum, non-finite pairs, an overflow
        p = np.where(rng.random((n, J)) < 0.4, t + 0.5, p)
        t[rng.random((n, J)) < 0.05] = np.nan
        p[rng.random((n, J)) < 0.05] = -np.inf
        t[0, 0], p[0, 0] = 1.5e308, -1.5e308
    return t, p


@pytest.mark.parametrize("kind", ["continuous", "tied", "mixed"])
@pytest.mark.parametrize("limits", ["default", "coarse_table", "split_targets", "never_gather", "gather_late",
                                    "coarse_never_gather"])
def test_select_order_statistics_every_path(monkeypatch, kind, limits):
    """Every rank of every output and pooled, whatever path the passes take: exact row tables or
    compared targets (TABLE_MAX), targets split over passes (HIST_BUDGET), gathering or not."""
    if "coarse" in limits:  # tables of a few entries: targets share entries and are compared
        monkeypatch.setattr(select, "TABLE_MAX", 4)
    if limits == "split_targets":  # 3 rows of 64 bins: digits narrow to 6 bits, targets split in groups
        monkeypatch.setattr(C, "HIST_BUDGET", 3 * 64 * 8)
    if "never_gather" in limits:
        monkeypatch.setattr(select, "GATHER_MAX", 0)
    elif limits != "default":  # gather only a few candidates: more histogram passes first
        monkeypatch.setattr(select, "GATHER_MAX", 40)
    rng = np.random.default_rng(21)
    t, p = _select_data(kind, rng)
    per, pooled = sorted_reference(t, p)
    J = t.shape[1]
    counts = np.array([v.size for v in per])
    ranks = np.stack([np.r_[0, c - 1, rng.integers(0, c, 10)] for c in counts])
    ranks[1, 3] = -1  # a negative rank gives NaN
    pooled_ranks = np.r_[0, pooled.size - 1, rng.integers(0, pooled.size, 6)]
    blocks = C.RowBlocks(t, p, t.shape[0], 37)
    got, got_pooled = C.select_order_statistics(blocks, ranks, pooled_ranks, scheduler="threads")
    want = np.array([[per[j][r] if r >= 0 else np.nan for r in ranks[j]] for j in range(J)])
    same_bits(got, want)
    same_bits(got_pooled, pooled[pooled_ranks])
    only_pooled = C.select_order_statistics(blocks, np.zeros((J, 0), np.int64), pooled_ranks, scheduler="sync")
    same_bits(only_pooled[1], pooled[pooled_ranks])


def _count_passes(monkeypatch, blocks, counts, q, **kwargs):
    reads = []
    orig = C.RowBlocks.read
    monkeypatch.setattr(C.RowBlocks, "read", lambda self, i, **kw: (reads.append(i), orig(self, i, **kw))[1])
    out = C.abs_error_quantiles(blocks, counts, q, **kwargs)
    monkeypatch.setattr(C.RowBlocks, "read", orig)
    assert len(reads) % blocks.n_blocks == 0
    return len(reads) // blocks.n_blocks, out


def test_passes_taken_continuous_small_and_tied(monkeypatch, caplog):
    monkeypatch.setattr(select, "GATHER_MAX", 1 << 16)  # the data of a large epoch, scaled down
    rng = np.random.default_rng(23)
    t = rng.standard_normal((60_000, 20)).astype(np.float32)
    p = t + rng.standard_normal(t.shape).astype(np.float32) * np.float32(0.1)
    blocks = C.RowBlocks(t, p, t.shape[0], 4000)
    counts = np.full(20, t.shape[0])
    with caplog.at_level(logging.DEBUG, logger="oocmetrics.compute"):
        passes, out = _count_passes(monkeypatch, blocks, counts, QS)
    assert passes == 3  # histogram, histogram, gather
    logged = [r.select_pass for r in caplog.records if hasattr(r, "select_pass")]
    assert [x["kind"] for x in logged] == ["histogram", "histogram", "gather"]
    assert sum(x["reads"] for x in logged) == passes and logged[0]["width"] == 16
    ref = reference(t, p, QS)
    same_bits(out["per_output"], ref[0])
    same_bits(out["pooled"], ref[1])
    # small data: the candidates after the first histogram fit GATHER_MAX
    small = C.RowBlocks(t[:2000], p[:2000], 2000, 300)
    passes, out = _count_passes(monkeypatch, small, np.full(20, 2000), QS)
    assert passes == 2
    same_bits(out["per_output"], reference(t[:2000], p[:2000], QS)[0])
    # heavily tied: 90% of |e| are 0.25 exactly, the rest ~1e-3: the first pass's bucket of 0.25 holds
    # only copies of it, so the second pass resolves it by the bucket's smallest and largest keys
    t = (np.round(t * 1024) / 1024).astype(np.float32)
    tied = rng.random(t.shape) < 0.9
    small = rng.standard_normal(t.shape).astype(np.float32) * np.float32(1e-3)
    tied_p = np.where(tied, t + np.float32(0.25), t + small)
    q = (0.2, 0.5, 0.8)
    passes, out = _count_passes(monkeypatch, C.RowBlocks(t, tied_p, t.shape[0], 4000), counts, q)
    assert passes == 2, passes
    ref = reference(t, tied_p, q)
    same_bits(out["per_output"], ref[0])
    same_bits(out["pooled"], ref[1])
    # the tie shares its buckets with 10% of values just above it: resolved once a bucket holds
    # only the tie (here the fourth pass; 5 passes at most in any case)
    near = np.where(tied, tied_p, t + np.float32(0.25) + rng.random(t.shape).astype(np.float32) * np.float32(0.007))
    passes, out = _count_passes(monkeypatch, C.RowBlocks(t, near, t.shape[0], 4000), counts, q)
    assert passes == 4, passes
    same_bits(out["per_output"], reference(t, near, q)[0])


def test_second_pass_gathers_the_likely_buckets(monkeypatch, caplog):
    """Continuous data: the second pass also gathers the digits around each rank's expected digit, so
    no third pass is needed; when those values do not fit, the pass still counts and a gather follows."""
    monkeypatch.setattr(select, "GATHER_MAX", 1 << 14)  # a large epoch's proportions at 1/4 M rows
    rng = np.random.default_rng(31)
    t = rng.standard_normal((250_000, 4)).astype(np.float32)
    p = t + rng.standard_normal(t.shape).astype(np.float32) * np.float32(10.0) ** rng.integers(-3, 2, 4)
    blocks = C.RowBlocks(t, p, t.shape[0], 20_000)
    counts = np.full(4, t.shape[0])
    q = (0.01, 0.5, 0.9, 0.95, 0.99, 0.999)
    ref = reference(t, p, q)
    with caplog.at_level(logging.DEBUG, logger="oocmetrics.compute"):
        passes, out = _count_passes(monkeypatch, blocks, counts, q, median=True)
    assert passes == 2
    logged = [r.select_pass for r in caplog.records if hasattr(r, "select_pass")]
    assert logged[1]["gathered"] <= select.GATHER_MAX and logged[1]["resolved"] == 4 * (2 * len(q) + 2) + 2 * len(q)
    same_bits(out["per_output"], ref[0])
    same_bits(out["pooled"], ref[1])
    np.testing.assert_array_equal(out["median"], np.median(np.abs(t.astype(np.float64) - p), axis=0))
    # room for one value only: the windows overflow, nothing is resolved from them, a gather pass follows
    orig = select.row_histogram_into
    monkeypatch.setattr(select, "row_histogram_into", lambda t, p, J, bits, width, table, out, lo, hi, win, k, r, m:
                        orig(t, p, J, bits, width, table, out, lo, hi, win, k[:1], r[:1], m))
    passes, out = _count_passes(monkeypatch, blocks, counts, q)
    assert passes == 3
    same_bits(out["per_output"], ref[0])
    same_bits(out["pooled"], ref[1])


class ThreadRanks(C.Exchange):
    """``size`` ranks as threads of this process, exchanging through a barrier (for tests)."""

    def __init__(self, rank, size, shared):
        self.rank, self.size, self.shared = rank, size, shared

    def gather(self, obj):
        box, barrier = self.shared
        box[self.rank] = obj
        barrier.wait()
        out = list(box)
        barrier.wait()
        return out

    def sum(self, array):
        return np.sum(np.stack(self.gather(array)), axis=0)


@pytest.mark.parametrize("limits", ["default", "speculate", "never_gather", "split_targets", "coarse_table"])
def test_ranks_exchanging_histograms_agree_with_one_process(monkeypatch, limits):
    """Under DDP every rank reads its own blocks; histograms, extremes and gathered values are
    exchanged: three ranks (threads, one of them with a different number of folds) get one process's bits."""
    import threading

    if limits == "speculate":
        monkeypatch.setattr(select, "GATHER_MAX", 1 << 15)
    elif limits == "never_gather":
        monkeypatch.setattr(select, "GATHER_MAX", 0)
    elif limits == "split_targets":
        monkeypatch.setattr(C, "HIST_BUDGET", 3 * 64 * 8)
        monkeypatch.setattr(select, "GATHER_MAX", 40)
    elif limits == "coarse_table":
        monkeypatch.setattr(select, "TABLE_MAX", 4)
        monkeypatch.setattr(select, "GATHER_MAX", 40)
    rng = np.random.default_rng(37)
    n = 400_000 if limits == "speculate" else 900
    t = rng.standard_normal((n, 3)).astype(np.float32)
    p = (t + rng.standard_normal(t.shape).astype(np.float32)).astype(np.float32)
    p[::7, 1] = t[::7, 1]  # ties at 0
    q = (0.1, 0.5, 0.9)
    ref = reference(t, p, q)
    counts = np.full(3, n)
    cuts = [0, n // 5, n // 2, n]
    shared = ([None] * 3, threading.Barrier(3))
    results, errors = [None] * 3, []

    def rank(r):
        try:
            blocks = C.RowBlocks(t[cuts[r]:cuts[r + 1]], p[cuts[r]:cuts[r + 1]], cuts[r + 1] - cuts[r], 97)
            results[r] = C.abs_error_quantiles(blocks, counts, q, exchange=ThreadRanks(r, 3, shared),
                                               scheduler="sync" if r == 1 else "threads")
        except BaseException as e:  # noqa: BLE001  (re-raised below)
            errors.append(e)
            shared[1].abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(3)]
    [th.start() for th in threads]
    [th.join() for th in threads]
    if errors:
        raise errors[0]
    for res in results:
        same_bits(res["per_output"], ref[0])
        same_bits(res["pooled"], ref[1])


def test_kernels_count_like_numpy():
    """The pass kernels against NumPy on one chunk: the first digit per output, rows by table."""
    rng = np.random.default_rng(29)
    t = rng.standard_normal((500, 3)).astype(np.float32)
    p = rng.standard_normal((500, 3)).astype(np.float32)
    t[3, 1] = np.nan
    p[4, 2] = np.inf
    keys = np.abs(t.astype(np.float64) - p).view(np.uint64)
    ok = np.isfinite(t) & np.isfinite(p)
    out = np.zeros((3, 1 << 12), np.int64)
    select.owner_histogram_into(t, p, 3, 0, 3, 12, out)
    for j in range(3):
        np.testing.assert_array_equal(out[j], np.bincount((keys[ok[:, j], j] >> 51).astype(np.int64), minlength=4096))
    # later pass: each output's and the pooled targets at 12 bits, next 8 bits
    prefix = keys[:2, :].reshape(-1) >> np.uint64(51)
    owner = np.r_[np.arange(3), np.arange(3)]
    pooled_prefix = keys[5, :2] >> np.uint64(51)
    starts, tprefix, _ = select.targets_of(np.r_[owner, 3, 3], np.r_[prefix, pooled_prefix], 4)
    rows = select.RowPlan(starts, tprefix, 12)
    assert rows.table.exact
    hist = np.zeros((rows.n_rows, 256), np.int64)
    lo, hi = np.full(rows.n_rows, np.iinfo(np.uint64).max), np.zeros(rows.n_rows, np.uint64)
    win = np.zeros((rows.dump + 1, 4), np.uint64)
    win[:rows.dump, 0], win[:rows.dump, 1] = 100, 60  # gather digits 100..159 of every row
    got_k, got_r = np.empty(10_000, np.uint64), np.empty(10_000, np.uint64)
    m = select.row_histogram_into(t, p, 3, 12, 8, rows.table, hist[:rows.dump + 1], lo[:rows.dump + 1],
                                  hi[:rows.dump + 1], win, got_k, got_r, 0)
    assert m > 0
    assert select.row_histogram_into(t, p, 3, 12, 8, rows.table, hist[:rows.dump + 1].copy(), lo[:rows.dump + 1].copy(),
                                     hi[:rows.dump + 1].copy(), win, got_k[:m - 1], got_r[:m - 1], 0) == -1  # full
    table = select.TargetTable(starts, tprefix, 12)
    direct = np.zeros((tprefix.size, 256), np.int64)
    dlo, dhi = np.full(tprefix.size, np.iinfo(np.uint64).max), np.zeros(tprefix.size, np.uint64)
    select.histogram_into(t, p, 3, 12, 8, table, direct, dlo, dhi)
    for k in range(tprefix.size):
        o = np.searchsorted(starts, k, side="right") - 1
        vals = keys[ok] if o == 3 else keys[ok[:, o], o]
        vals = vals[(vals >> np.uint64(51)) == tprefix[k]]
        want = np.bincount(((vals >> np.uint64(43)) & np.uint64(255)).astype(np.int64), minlength=256)
        np.testing.assert_array_equal(direct[k], want)
        assert (dlo[k], dhi[k]) == (vals.min(), vals.max())
        if o < 3:
            np.testing.assert_array_equal(hist[rows.of_target[k]], want)
            digit = (vals >> np.uint64(43)) & np.uint64(255)
            np.testing.assert_array_equal(np.sort(got_k[:m][got_r[:m] == rows.of_target[k]]),
                                          np.sort(vals[(digit >= 100) & (digit < 160)]))
    got_keys, got_rows = select.gather_chunk(t, p, 3, 12, select.RowPlan(starts, tprefix, 12, dump=False).table)
    assert got_keys.size == got_rows.size > 0


def test_through_a_stored_epoch_recorder_and_cli(tmp_path, capsys):
    rng = np.random.default_rng(17)
    batches = [(np.round(rng.standard_normal((5, 2, 3)), 1).astype(np.float32),
                rng.standard_normal((5, 2, 3)).astype(np.float32)) for _ in range(7)]
    batches[2][0][0, 0, 0] = np.nan
    q = (0.0, 0.5, 0.9, 0.99, 1.0)
    with oocmetrics.Recorder(tmp_path / "r", "val", metrics=["mae", "median_absolute_error"], chunk_rows=4,
                             nonfinite="skip", quantiles=q) as rec:
        for t, p in batches:
            rec.update(t, p)
        res = rec.compute()
        again = rec.compute(quantiles=(0.5,))
        assert again.quantiles["q"] == [0.5] and rec.compute().quantiles["q"] == list(q)
    T = np.concatenate([b[0] for b in batches])
    P = np.concatenate([b[1] for b in batches])
    per, pooled = reference(T, P, q)
    same_bits(res.quantiles["per_output"], per)
    same_bits(res.quantiles["pooled"], pooled)
    stored = oocmetrics.compute_stored(tmp_path / "r", "val", quantiles=q, source="data")
    same_bits(stored.quantiles["per_output"], per)
    same_bits(stored.quantiles["pooled"], pooled)
    assert oocmetrics.compute_stored(tmp_path / "r", "val").quantiles is None
    out_json = tmp_path / "m.json"
    assert main(["compute", str(tmp_path / "r"), "--split", "val", "--quantiles", "0.5", "0.9", "0.99",
                 "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "quantiles of |y_true - y_pred|" in text and "q=0.99" in text
    d = json.loads(out_json.read_text())["quantiles"]
    assert d["q"] == [0.5, 0.9, 0.99]
    assert d["pooled"] == pooled[[1, 2, 3]].tolist()
    assert d["per_output"] == per[[1, 2, 3]].tolist()


MEMORY = r"""
import json, sys
import numpy as np
import oocmetrics
rows, J = int(sys.argv[1]), 20
rng = np.random.default_rng(0)
t = rng.standard_normal((rows, J), dtype=np.float32)
p = t + rng.standard_normal((rows, J), dtype=np.float32) * np.float32(0.1)
oocmetrics.compute_arrays(t[:50], p[:50], ["median_absolute_error"], quantiles=True, chunk_rows=7)  # load kernels
oocmetrics.compute_arrays(t, p, ["mse"], chunk_rows=2000)  # the one-pass metrics alone
base = oocmetrics.peak_rss_bytes()
res = oocmetrics.compute_arrays(t, p, ["median_absolute_error"], quantiles=True, chunk_rows=2000)
print(json.dumps({"base_mb": base / 2**20, "peak_mb": oocmetrics.peak_rss_bytes() / 2**20,
                  "blocks": -(-rows // 2000), "med0": float(res.per_output["median_absolute_error"][0])}))
"""


@pytest.mark.slow
def test_order_statistics_memory_is_bounded_at_20_outputs():
    # 1M rows x 20 outputs in 500 blocks: one (targets x 65,536) histogram per task would be ~10 GB
    out = subprocess.run([sys.executable, "-c", MEMORY, "1000000"], capture_output=True, text=True,
                         timeout=600, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["blocks"] == 500
    assert r["peak_mb"] - r["base_mb"] < 100, r
