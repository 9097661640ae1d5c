"""Exactness of the float64 partials: raw errors, double-double block means, chunk and order invariance.

References are independent of oocmetrics: ``math.fsum`` of the float64 errors for mse / mae /
max_error, exact rationals (``fractions``) for the centred statistics (r2, explained_variance,
pearson_r), and scikit-learn where it is itself accurate.
"""
from __future__ import annotations

import inspect
import json
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import oocmetrics
from oocmetrics.kernels import moments
from reference import as_2d, exact_sums

ERROR_METRICS = ("mse", "mae", "max_error")
SCORE_METRICS = ("r2", "explained_variance", "pearson_r")


# ---------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------
def fsum_errors(T: np.ndarray, P: np.ndarray) -> dict[str, np.ndarray]:
    """Per-output mse, mae, max_error of (M, J) float64 data, correctly rounded sums (math.fsum)."""
    E = T - P
    J = T.shape[1]
    n = T.shape[0]
    return {
        "mse": np.array([math.fsum(E[:, j] * E[:, j]) / n for j in range(J)]),
        "mae": np.array([math.fsum(np.abs(E[:, j])) / n for j in range(J)]),
        "max_error": np.abs(E).max(axis=0),
    }


def exact_scores(t: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """r2, explained_variance, pearson_r of one output in exact rational arithmetic (then rounded)."""
    s = exact_sums(t, p)
    return {
        "r2": float(1 - s["sse"] / s["sst"]),
        "explained_variance": float(1 - s["see"] / s["sst"]),
        "pearson_r": float(s["cov"]) / (math.sqrt(float(s["sst"])) * math.sqrt(float(s["spp"]))),
    }


def assert_errors_exact(res, T, P, rel=1e-12):
    ref = fsum_errors(T, P)
    for name in ERROR_METRICS:
        np.testing.assert_allclose(res.per_output[name], ref[name], rtol=rel, atol=0, err_msg=name)


# ---------------------------------------------------------------------------------------------
# the repro: an outlier row first used to wipe out the small errors
# ---------------------------------------------------------------------------------------------
REPRO_T = np.array([[1e10], [1.0], [2.0], [3.0]])
REPRO_P = np.array([[1e10], [1 + 1e-7], [2 - 1e-7], [3 + 2e-7]])


@pytest.mark.parametrize("chunk_rows", [1, 2, 3, None])
@pytest.mark.parametrize("order", ["outlier_first", "outlier_last", "shuffled"])
def test_repro_outlier_first_keeps_small_errors(chunk_rows, order):
    from sklearn import metrics as skm

    idx = {"outlier_first": [0, 1, 2, 3], "outlier_last": [1, 2, 3, 0], "shuffled": [2, 0, 3, 1]}[order]
    t, p = REPRO_T[idx], REPRO_P[idx]
    res = oocmetrics.compute_arrays(t, p, chunk_rows=chunk_rows, split_every=2)
    assert_errors_exact(res, t, p)
    assert res["mse"] == pytest.approx(skm.mean_squared_error(t, p), rel=1e-12, abs=0)
    assert res["mae"] == pytest.approx(skm.mean_absolute_error(t, p), rel=1e-12, abs=0)
    assert res["max_error"] == skm.max_error(t[:, 0], p[:, 0])
    assert res["mse"] == pytest.approx(1.5e-14, rel=1e-8) and res["max_error"] == pytest.approx(2e-7, rel=1e-8)
    exact = exact_scores(t[:, 0], p[:, 0])
    for name in SCORE_METRICS:
        assert res[name] == pytest.approx(exact[name], rel=1e-12, abs=0), name


def test_repro_kernel_partials_are_order_independent():
    a = moments.chunk_partials(REPRO_T, REPRO_P)
    b = moments.chunk_partials(REPRO_T[::-1].copy(), REPRO_P[::-1].copy())
    e = (REPRO_T - REPRO_P)[:, 0]
    for P in (a, b):
        assert P[moments.SSE, 0] == pytest.approx(math.fsum(e * e), rel=1e-15, abs=0)
        assert P[moments.SAE, 0] == pytest.approx(math.fsum(abs(e)), rel=1e-15, abs=0)
        assert P[moments.MAX_AE, 0] == np.abs(e).max()
        assert (P[moments.MIN_T, 0], P[moments.MAX_T, 0]) == (1.0, 1e10)


# ---------------------------------------------------------------------------------------------
# the kernel API: no shift, raw finiteness, raw extremes, double-double means
# ---------------------------------------------------------------------------------------------
def test_kernel_has_no_global_shift():
    assert list(inspect.signature(moments.chunk_partials).parameters) == ["y_true", "y_pred"]
    assert not hasattr(moments, "reference_shift")
    for f in ("mean_t_hi", "mean_t_lo", "mean_p_hi", "mean_p_lo", "mean_e_hi", "mean_e_lo"):
        assert f in moments.FIELDS
    assert moments.K == len(moments.FIELDS) and moments.FIELDS[moments.SKIPPED] == "skipped"


def test_finite_values_near_float64_max_are_counted():
    t = np.array([[1.7e308, -1.7e308], [1.0, 2.0], [-1.7e308, 1.7e308]])
    p = t.copy()
    p[1] = [0.5, 2.5]
    res = oocmetrics.compute_arrays(t, p, chunk_rows=2)
    assert res.n_skipped == 0 and res.n_values == 6
    np.testing.assert_array_equal(res.per_output["max_error"], [0.5, 0.5])
    np.testing.assert_array_equal(res.per_output["mae"], [0.5 / 3, 0.5 / 3])
    P = moments.chunk_partials(t, p)
    np.testing.assert_array_equal(P[moments.MIN_T], [-1.7e308, -1.7e308])
    np.testing.assert_array_equal(P[moments.MAX_T], [1.7e308, 1.7e308])
    np.testing.assert_array_equal(P[moments.SKIPPED], [0, 0])


@pytest.mark.parametrize("chunk_rows", [1, None])
def test_error_overflow_gives_inf_not_nan_nor_skip(chunk_rows):
    t = np.array([1.7e308, 1.0, 2.0])
    p = np.array([-1.7e308, 1.0, 2.5])
    res = oocmetrics.compute_arrays(t, p, chunk_rows=chunk_rows)
    assert res.n_skipped == 0 and res.n_values == 3
    for name in ("mse", "rmse", "mae", "max_error"):
        assert res[name] == math.inf, name
    d = res.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["overall"]["mse"] == "inf" and d["overall"]["max_error"] == "inf"
    assert "inf" in repr(res)
    # -inf: an error whose square overflows against a finite variance of y_true
    neg = oocmetrics.compute_arrays(np.array([0.0, 1.0]), np.array([0.0, 1.7e308]), ["r2", "mse"])
    assert neg["r2"] == -math.inf and neg["mse"] == math.inf
    assert neg.to_dict()["overall"] == {"r2": "-inf", "mse": "inf"}
    json.dumps(neg.to_dict(), allow_nan=False)


def test_raw_extremes_and_skipped_pairs():
    t = np.array([[1e8 + 0.25], [np.nan], [1e8 - 0.5], [3.0], [np.inf]])
    p = np.array([[1e8], [1.0], [np.nan], [3.5], [1.0]])
    P = moments.chunk_partials(t, p)
    assert P[moments.N, 0] == 2 and P[moments.SKIPPED, 0] == 3
    assert (P[moments.MIN_T, 0], P[moments.MAX_T, 0]) == (3.0, 1e8 + 0.25)
    assert P[moments.SSE, 0] == 0.25 * 0.25 + 0.5 * 0.5
    assert P[moments.MAX_AE, 0] == 0.5
    # no finite pair at all: the identity of the merge, plus the skip count
    none = moments.chunk_partials(np.array([np.nan, 1.0]), np.array([1.0, np.inf]))
    expect = moments.empty_partials(1)
    expect[moments.SKIPPED] = 2
    np.testing.assert_array_equal(none, expect)


@pytest.mark.parametrize("outlier", [False, True])
def test_double_double_block_means_are_exact(outlier):
    """hi + lo of each mean is the exact rational mean to ~eps of the spread, not of the mean."""
    rng = np.random.default_rng(11)
    t = 1e8 + 1e-3 * rng.standard_normal(1000)
    p = t + 1e-4 * rng.standard_normal(t.shape)
    if outlier:  # in the first row
        t[0], p[0] = 1e10, 1e10 + 1.0
    P = moments.chunk_partials(t, p)
    for vals, hi, lo in ((t, moments.MEAN_T_HI, moments.MEAN_T_LO), (p, moments.MEAN_P_HI, moments.MEAN_P_LO),
                         (t - p, moments.MEAN_E_HI, moments.MEAN_E_LO)):
        exact = sum(Fraction(float(v)) for v in vals) / len(vals)
        got = Fraction(float(P[hi, 0])) + Fraction(float(P[lo, 0]))
        spread = max(abs(Fraction(float(v)) - exact) for v in vals)
        assert abs(got - exact) <= Fraction(1e-16) * spread
        assert abs(P[lo, 0]) <= 0.5 * np.spacing(abs(P[hi, 0]))  # renormalised
    if not outlier:  # a single float64 mean could not be within 1e-18 of 1e8 + something
        assert abs(float(P[moments.MEAN_T_HI, 0])) > 1e8 - 1 and abs(P[moments.MEAN_T_LO, 0]) > 0.0


def test_merge_keeps_skip_count_of_an_all_skipped_first_chunk():
    """The first (left) partials of a merge have no finite pair: their skip count survives."""
    nan = moments.chunk_partials(np.full((3, 2), np.nan), np.zeros((3, 2)))
    ok = moments.chunk_partials(np.ones((2, 2)), np.zeros((2, 2)))
    for stack in ([nan, ok], [ok, nan], [nan, nan, ok]):
        merged = moments.tree_combine(np.stack(stack))
        np.testing.assert_array_equal(merged[moments.SKIPPED], [3.0 * sum(x is nan for x in stack)] * 2)
        np.testing.assert_array_equal(merged[moments.N], [2.0, 2.0])
    a = nan.copy()
    moments._merge(a, ok, a)  # out aliasing a, as in the tree
    np.testing.assert_array_equal(a[moments.SKIPPED], [3.0, 3.0])


def test_merging_halves_equals_exact_rationals():
    """Chan merges of two blocks at 1e8 + 1e-3 noise keep M2 and C_tp to ~1e-13 relative."""
    rng = np.random.default_rng(5)
    t = 1e8 + 1e-3 * rng.standard_normal(400)
    p = t + 3e-4 * rng.standard_normal(t.shape) + 1e-4
    merged = moments.combine(moments.chunk_partials(t[:137], p[:137]), moments.chunk_partials(t[137:], p[137:]))
    tree = moments.tree_combine(np.stack([moments.chunk_partials(t[i:i + 1], p[i:i + 1]) for i in range(400)]))
    s = exact_sums(t, p)
    exact = {moments.M2_T: float(s["sst"]), moments.M2_P: float(s["spp"]), moments.C_TP: float(s["cov"]),
             moments.M2_E: float(s["see"])}
    for P in (merged, tree):
        for f, v in exact.items():
            assert P[f, 0] == pytest.approx(v, rel=1e-13, abs=0), moments.FIELDS[f]


def test_kernel_blocks_within_one_chunk():
    """More rows than one BLOCK: in-chunk block merges are as exact as chunk merges."""
    rng = np.random.default_rng(2)
    rows = 2 * moments.BLOCK + 123
    t = 1e8 + 1e-3 * rng.standard_normal((rows, 1))
    p = t + 3e-4 * rng.standard_normal(t.shape)
    one = oocmetrics.compute_arrays(t, p, chunk_rows=rows)
    many = oocmetrics.compute_arrays(t, p, chunk_rows=997, split_every=2)
    exact = exact_scores(t[:, 0], p[:, 0])
    for res in (one, many):
        assert_errors_exact(res, t, p)
        for name in SCORE_METRICS:
            assert res[name] == pytest.approx(exact[name], rel=1e-12, abs=0), name


def test_float32_input_is_exact_in_float64():
    rng = np.random.default_rng(4)
    t = (1e5 + 0.1 * rng.standard_normal((300, 7, 2))).astype(np.float32)
    p = (t + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)
    res = oocmetrics.compute_arrays(t, p, chunk_rows=17)
    T, P = as_2d(t), as_2d(p)
    assert_errors_exact(res, T, P)
    for j in range(2):
        exact = exact_scores(T[:, j], P[:, j])
        for name in SCORE_METRICS:
            assert res.per_output[name][j] == pytest.approx(exact[name], rel=1e-12, abs=0), name


# ---------------------------------------------------------------------------------------------
# property tests: any dynamic range, any row order, any chunking
# ---------------------------------------------------------------------------------------------
def _wide_range(rng, rows, mid, outputs, decades, lo_exp, structure):
    """Values over ``decades`` decades with random signs; errors relative to each value."""
    shape = (rows, mid, outputs)
    mag = 10.0 ** (lo_exp + decades * rng.random(shape))
    t = np.where(rng.random(shape) < 0.5, -1.0, 1.0) * mag
    rel = 10.0 ** rng.uniform(-9, -1, shape)
    p = t * (1 + rel * rng.standard_normal(shape))
    if structure == "largest_first":
        order = np.argsort(-np.abs(t).max(axis=(1, 2)), kind="stable")
        t, p = t[order], p[order]
    elif structure == "outlier_first":
        t[0] *= 10.0 ** 6
        p[0] = t[0] + (p[0] - t[0])
    elif structure == "independent":
        p = np.where(rng.random(shape) < 0.5, -1.0, 1.0) * 10.0 ** (lo_exp + decades * rng.random(shape))
    return t, p


@given(
    rows=st.integers(1, 60),
    mid=st.integers(1, 4),
    outputs=st.integers(1, 3),
    decades=st.integers(9, 14),
    lo_exp=st.integers(-8, 2),
    structure=st.sampled_from(["random", "largest_first", "outlier_first", "independent"]),
    chunk_rows=st.integers(1, 23),
    seed=st.integers(0, 2**16),
)
def test_property_error_metrics_match_fsum_on_any_dynamic_range(
    rows, mid, outputs, decades, lo_exp, structure, chunk_rows, seed,
):
    rng = np.random.default_rng(seed)
    t, p = _wide_range(rng, rows, mid, outputs, decades, lo_exp, structure)
    T, P = as_2d(t), as_2d(p)
    res = oocmetrics.compute_arrays(t, p, metrics=ERROR_METRICS, chunk_rows=chunk_rows, split_every=2)
    assert_errors_exact(res, T, P)
    perm = rng.permutation(rows)
    shuffled = oocmetrics.compute_arrays(t[perm], p[perm], metrics=ERROR_METRICS, chunk_rows=chunk_rows)
    assert_errors_exact(shuffled, T, P)
    assert res["max_error"] == shuffled["max_error"] == float(np.abs(T - P).max(axis=0).max())


@given(
    rows=st.integers(2, 50),
    outputs=st.integers(1, 2),
    offset=st.sampled_from([1e8, -1e8, 1e6, 3e9, 0.0]),
    log_scale=st.integers(-4, 0),
    outlier=st.booleans(),
    chunk_rows=st.integers(1, 13),
    seed=st.integers(0, 2**16),
)
def test_property_scores_match_exact_rationals_on_offsets(rows, outputs, offset, log_scale, outlier, chunk_rows, seed):
    rng = np.random.default_rng(seed)
    scale = 10.0 ** log_scale
    t = offset + scale * rng.standard_normal((rows, outputs))
    p = t + 0.3 * scale * rng.standard_normal(t.shape) + 0.1 * scale
    if outlier:
        t[0] = offset + 1e4 * (abs(offset) + 1.0)
        p[0] = t[0] + scale
    res = oocmetrics.compute_arrays(t, p, chunk_rows=chunk_rows, split_every=2)
    assert_errors_exact(res, t, p)
    for j in range(outputs):
        exact = exact_scores(t[:, j], p[:, j])
        for name in SCORE_METRICS:
            assert res.per_output[name][j] == pytest.approx(exact[name], rel=1e-12, abs=1e-13), name


# ---------------------------------------------------------------------------------------------
# chunk invariance
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("dtype", "offset", "scale"), [
    (np.float32, 0.0, 1.0), (np.float32, 1e3, 1e-2), (np.float64, 0.0, 1.0), (np.float64, 1e8, 1e-3),
])
def test_chunk_invariance_to_1e13(dtype, offset, scale):
    """Chunks of 1 row, uneven chunks, chunks cutting the (16-row) batches: equal to 1e-13 relative."""
    rng = np.random.default_rng(9)
    t = (offset + scale * rng.standard_normal((16 * 9 + 5, 13, 3))).astype(dtype)
    p = (t + 0.3 * scale * rng.standard_normal(t.shape)).astype(dtype)
    ref = oocmetrics.compute_arrays(t, p, chunk_rows=None)
    for chunk_rows, split_every in [(1, 2), (7, 8), (16, 3), (23, 2), (100, 8), (t.shape[0], 8)]:
        res = oocmetrics.compute_arrays(t, p, chunk_rows=chunk_rows, split_every=split_every)
        for name in oocmetrics.METRICS:
            assert res[name] == pytest.approx(ref[name], rel=1e-13, abs=0), (name, chunk_rows)
            np.testing.assert_allclose(
                res.per_output[oocmetrics.metrics._REGISTRY[name].per_output_key],
                ref.per_output[oocmetrics.metrics._REGISTRY[name].per_output_key], rtol=1e-13, atol=0,
            )
    assert_errors_exact(ref, as_2d(t), as_2d(p))


def test_nonfinite_skip_with_chunk_invariance():
    rng = np.random.default_rng(1)
    t = 1e8 + 1e-3 * rng.standard_normal((50, 4, 2))
    p = t + 3e-4 * rng.standard_normal(t.shape)
    t[3, 1, 0] = np.nan
    p[10, :, 1] = -np.inf
    t[0, 0, 1] = 1e300  # finite: counted
    p[0, 0, 1] = 1e300
    results = [oocmetrics.compute_arrays(t, p, nonfinite="skip", chunk_rows=c) for c in (1, 6, None)]
    T, P = as_2d(t), as_2d(p)
    ok = np.isfinite(T) & np.isfinite(P)
    for res in results:
        assert res.n_skipped == int((~ok).sum()) == 1 + 4
        for j in range(2):
            sel = ok[:, j]
            ref = fsum_errors(T[sel, j:j + 1], P[sel, j:j + 1])
            for name in ERROR_METRICS:
                assert res.per_output[name][j] == pytest.approx(ref[name][0], rel=1e-12, abs=0), name
        exact = exact_scores(T[ok[:, 0], 0], P[ok[:, 0], 0])
        for name in SCORE_METRICS:
            assert res.per_output[name][0] == pytest.approx(exact[name], rel=1e-12, abs=0), name


def test_wide_range_many_blocks_largest_first():
    """Several BLOCKs per chunk, 12 decades, the largest values in the first rows."""
    rng = np.random.default_rng(8)
    rows = 3 * moments.BLOCK + 77
    mag = 10.0 ** (-6 + 12 * rng.random((rows, 2)))
    t = np.where(rng.random(mag.shape) < 0.5, -mag, mag)
    p = t * (1 + 1e-6 * rng.standard_normal(t.shape))
    order = np.argsort(-np.abs(t[:, 0]), kind="stable")
    t, p = t[order], p[order]
    for chunk_rows in (None, 1000, 4097):
        res = oocmetrics.compute_arrays(t, p, metrics=ERROR_METRICS, chunk_rows=chunk_rows)
        assert_errors_exact(res, t, p)
