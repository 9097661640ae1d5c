"""Block-bootstrap confidence intervals (oocmetrics.intervals).

(1) coverage of known population values on simulated data (iid, AR(1) rows, too few blocks);
(2) the weighted-copy merge against tree_combine of repeated copies, and the vectorised finalize;
(3) determinism; (4) stored epochs end to end, from the stored chunks and by the fallback pass;
(5) every error path. Coverage checks use a Clopper-Pearson 99.9% band for the observed hit rate.
"""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from scipy import stats
from scipy.signal import lfilter

import oocmetrics
from oocmetrics import intervals as iv
from oocmetrics.kernels import moments as mo
from oocmetrics.kernels.moments import K, chunk_partials, tree_combine
from oocmetrics.metrics import METRICS, finalize

SE = 0.5  # sd of the errors; y_true ~ N(0, 1), y_pred = y_true + e
TRUTH = {  # population values of the metrics for that model
    "mse": SE ** 2,
    "rmse": SE,
    "mae": SE * math.sqrt(2 / math.pi),
    "r2": 1 - SE ** 2,
    "explained_variance": 1 - SE ** 2,
    "pearson_r": 1 / math.sqrt(1 + SE ** 2),
}
NAMES = tuple(TRUTH)


def _band_has(hits: int, n: int, p: float = 0.95, conf: float = 0.999) -> bool:
    """Whether the Clopper-Pearson ``conf`` interval of a hit rate hits/n contains p."""
    a = (1 - conf) / 2
    lo = stats.beta.ppf(a, hits, n - hits + 1) if hits > 0 else 0.0
    hi = stats.beta.ppf(1 - a, hits + 1, n - hits) if hits < n else 1.0
    return lo <= p <= hi


def _simulate(seed: int, n: int, J: int, phi: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """y_true iid N(0, 1); errors stationary AR(1) with coefficient phi and sd SE (iid for phi=0)."""
    rng = np.random.default_rng(seed)
    t = rng.normal(size=(n, J))
    nu = rng.normal(size=(n + 200, J)) * SE * math.sqrt(1 - phi ** 2)
    e = lfilter([1.0], [1.0, -phi], nu, axis=0)[200:]  # 200 burn-in rows: phi**200 ~ 0
    return t, t + e


def _block_stack(t: np.ndarray, p: np.ndarray, rows: int) -> np.ndarray:
    return np.stack([chunk_partials(t[a:a + rows], p[a:a + rows]) for a in range(0, t.shape[0], rows)])


def _row_stack(t: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Per-row partials (n, K, J), built directly (checked against chunk_partials below)."""
    S = np.zeros((t.shape[0], K, t.shape[1]))
    e = t - p
    S[:, mo.N] = 1.0
    S[:, mo.MEAN_T_HI], S[:, mo.MEAN_P_HI], S[:, mo.MEAN_E_HI] = t, p, e
    S[:, mo.SSE], S[:, mo.SAE], S[:, mo.MAX_AE] = e * e, np.abs(e), np.abs(e)
    S[:, mo.MIN_T], S[:, mo.MAX_T] = t, t
    return S


def _coverage(stacks, n_boot: int, interval: str = "percentile") -> tuple[dict[str, int], dict[str, int]]:
    """Hits of TRUTH per metric over (seed, stack) pairs: of the overall value, and of output 0's."""
    overall = dict.fromkeys(NAMES, 0)
    first = dict.fromkeys(NAMES, 0)
    for seed, stack in stacks:
        r = iv.bootstrap_partials(stack, NAMES, n_boot=n_boot, seed=seed, interval=interval)
        for m in NAMES:
            lo, hi = r["overall"][m]
            overall[m] += lo <= TRUTH[m] <= hi
            lo, hi = r["per_output"][m][0][0], r["per_output"][m][1][0]
            first[m] += lo <= TRUTH[m] <= hi
    return overall, first


# ------------------------------------------------------------------------------------ (1) coverage
@pytest.mark.parametrize("interval", ["percentile", "bca"])
def test_iid_intervals_cover_the_population_values(interval):
    # 200 datasets of 2000 rows x 2 outputs in 50 blocks of 40 rows; the truth is analytic
    stacks = [(s, _block_stack(*_simulate(1000 + s, 2000, 2), 40)) for s in range(200)]
    overall, first = _coverage(stacks, 1000, interval)
    for m in NAMES:
        assert _band_has(overall[m], 200), (m, overall[m] / 200)
        assert _band_has(first[m], 200), (m, first[m] / 200)


def test_autocorrelated_rows_need_blocks():
    # AR(1) errors (phi = 0.8: the correlation of e^2 decays as 0.64^k) in 50 blocks of 20 rows
    data = [_simulate(5000 + s, 1000, 1, phi=0.8) for s in range(200)]
    blocks, _ = _coverage([(s, _block_stack(t, p, 20)) for s, (t, p) in enumerate(data)], 1000)
    # the iid bootstrap over rows (blocks of one row) on the first 100 of the same datasets
    rows, _ = _coverage([(s, _row_stack(t, p)) for s, (t, p) in enumerate(data[:100])], 200)
    # measured: blocks 0.92-0.955 for every metric; rows 0.69 (mse, rmse), 0.73 (mae), 0.78 (r2),
    # 0.79 (explained_variance), 0.85 (pearson_r: its cross products t*e are not autocorrelated, as
    # y_true is iid here, so rows under-cover it least)
    for m in NAMES:
        assert _band_has(blocks[m], 200), (m, blocks[m] / 200)
        assert blocks[m] / 200 - rows[m] / 100 > 0.05, (m, blocks[m] / 200, rows[m] / 100)
        if m != "pearson_r":
            assert not _band_has(rows[m], 100) and rows[m] / 100 < 0.8, (m, rows[m] / 100)


def test_too_few_blocks_under_cover_hence_the_threshold():
    # 5 blocks of 400 iid rows: a nominal 95% covers ~85%; this is why MIN_BLOCKS is 20
    stacks = [(s, _block_stack(*_simulate(1000 + s, 2000, 1), 400)) for s in range(200)]
    hits, _ = _coverage(stacks, 1000)
    assert all(not _band_has(hits[m], 200) and hits[m] / 200 < 0.9 for m in ("mse", "mae", "r2")), hits
    r = iv.bootstrap_partials(stacks[0][1], "mse")
    assert any("only 5 blocks" in n for n in r["notes"])


def test_row_stack_helper_is_chunk_partials_of_single_rows(rng):
    t, p = rng.normal(size=(7, 3)), rng.normal(size=(7, 3))
    np.testing.assert_array_equal(_row_stack(t, p), np.stack([chunk_partials(t[i:i + 1], p[i:i + 1]) for i in range(7)]))


# ------------------------------------------------------------------- (2) weighted merge, finalize
@pytest.mark.parametrize("offset", [0.0, 1e8])
def test_weighted_merge_equals_tree_of_repeated_copies(rng, offset):
    t = rng.normal(size=(300, 3)) + offset
    p = t + rng.normal(size=t.shape)
    stack = _block_stack(t, p, 23)  # 14 uneven blocks
    for _ in range(20):
        counts = rng.integers(0, 4, size=stack.shape[0])
        counts[rng.integers(stack.shape[0])] += 1  # at least one copy of something
        want = tree_combine(np.repeat(stack, counts, axis=0))
        got = iv.weighted_merge(stack, counts)
        scale = np.maximum(np.abs(want), 1.0)
        np.testing.assert_allclose(got / scale, want / scale, rtol=0, atol=1e-12)
        # the means as double-doubles: hi + lo agree to ~1e-12 relative even at an offset of 1e8
        for hi, lo in ((mo.MEAN_T_HI, mo.MEAN_T_LO), (mo.MEAN_E_HI, mo.MEAN_E_LO)):
            np.testing.assert_allclose(got[hi] - want[hi] + (got[lo] - want[lo]), 0, atol=1e-12 * (1 + offset))
    # (B, N) counts give one merge per row
    many = rng.integers(0, 3, size=(4, stack.shape[0]))
    np.testing.assert_array_equal(iv.weighted_merge(stack, many), np.stack([iv.weighted_merge(stack, c) for c in many]))
    # no copies at all: the partials of no data
    np.testing.assert_array_equal(iv.weighted_merge(stack, np.zeros(stack.shape[0])), mo.empty_partials(3))


def test_replicate_metrics_match_finalize(rng):
    from oocmetrics.intervals import _metric_values

    t = rng.normal(size=(400, 4))
    p = t + rng.normal(size=t.shape)
    p[:, 1] = 3.0  # constant y_pred: pearson_r undefined in that output
    t[:, 2] = 1.0  # constant y_true: r2 and explained_variance follow scikit-learn's rule
    p[:, 3] = t[:, 3]  # perfect output
    stack = _block_stack(t, p, 40)
    counts = rng.integers(0, 3, size=(6, stack.shape[0]))
    P = iv.weighted_merge(stack, counts)
    over, per = _metric_values(P, METRICS)
    for b in range(P.shape[0]):
        ref = finalize(P[b], METRICS, n_rows=0)
        for m in METRICS:
            np.testing.assert_allclose(over[m][b], ref.overall[m], rtol=1e-14, atol=0, err_msg=m)
        for k, v in ref.per_output.items():
            np.testing.assert_allclose(per[k][b], v, rtol=1e-14, atol=0, err_msg=k)


def test_replicates_center_on_the_estimate_and_nrmse_is_rmse_over_the_range(rng):
    t, p = _simulate(7, 3000, 2)
    stack = _block_stack(t, p, 60)
    over, per = iv.bootstrap_replicates(stack, ["mse", "rmse", "nrmse", "max_error"], n_boot=400, seed=3)
    est = oocmetrics.compute_arrays(t, p)
    assert over["mse"].shape == (400,) and per["mse"].shape == (400, 2)
    assert abs(over["mse"].mean() - est["mse"]) < 3 * over["mse"].std() / math.sqrt(400)
    rng_t = t.max(axis=0) - t.min(axis=0)
    np.testing.assert_allclose(per["nrmse"], per["rmse"] / rng_t, rtol=1e-15)
    # the replicate max never exceeds the observed one: why max_error is excluded from the intervals
    assert over["max_error"].max() == est["max_error"]
    r = iv.bootstrap_partials(stack, ["rmse", "nrmse", "max_error"], n_boot=400, seed=3)
    assert "max_error" not in r["overall"] and "maximum" in r["excluded"]["max_error"]
    np.testing.assert_allclose(np.array(r["per_output"]["nrmse"]), np.array(r["per_output"]["rmse"]) / rng_t, rtol=1e-15)
    lo, hi = r["overall"]["rmse"]
    assert lo < r["estimate"]["rmse"] < hi and math.isclose(r["estimate"]["rmse"], est["rmse"], rel_tol=1e-13)


def test_perfect_predictions_give_a_point_interval_and_undefined_values_give_null(rng):
    t = rng.normal(size=(500, 2))
    p = t.copy()
    p[:, 1] = 2.0  # constant y_pred: pearson_r is NaN
    for interval in ("percentile", "bca"):
        r = iv.intervals_of_arrays(t, p, ["r2", "mse", "pearson_r"], n_boot=200, interval=interval)
        assert r["per_output"]["r2"][0][0] == r["per_output"]["r2"][1][0] == 1.0
        assert r["per_output"]["mse"][0][0] == r["per_output"]["mse"][1][0] == 0.0
        assert r["per_output"]["pearson_r"][0][1] is None and r["per_output"]["pearson_r"][1][1] is None
        assert r["estimate"]["pearson_r"] is None and r["overall"]["pearson_r"] == [None, None]
        json.dumps(r, allow_nan=False)


def test_replicates_with_an_undefined_value_are_left_out_and_reported(rng):
    t = rng.normal(size=(600, 2))
    p = t + rng.normal(size=t.shape)
    t[30:, 0] = np.nan  # output 0 has values in the first block only; every other block skips them
    stack = _block_stack(t, p, 30)
    r = iv.bootstrap_partials(stack, ["mse"], n_boot=300, seed=1)
    _, per = iv.bootstrap_replicates(stack, ["mse"], n_boot=300, seed=1)
    missing = int(np.isnan(per["mse"][:, 0]).sum())  # replicates without block 0: ~300 * (19/20)**20
    assert 80 < missing < 140
    note = [n for n in r["notes"] if "undefined" in n]
    assert note and f"'mse[0]': {missing}" in note[0] and f"'mse': {missing}" in note[0] and "'mse[1]'" not in note[0]
    # every replicate holding block 0 has output 0's mse of block 0 alone: the interval is that point
    ref = oocmetrics.compute_arrays(t, p, ["mse"], nonfinite="skip").per_output["mse"][0]
    lo, hi = r["per_output"]["mse"][0][0], r["per_output"]["mse"][1][0]
    assert math.isclose(lo, ref, rel_tol=1e-13) and math.isclose(hi, ref, rel_tol=1e-13)
    assert r["overall"]["mse"][0] < r["overall"]["mse"][1]


# --------------------------------------------------------------------------------- (3) determinism
def test_same_seed_same_bits_other_seed_other_draws(rng):
    stack = _block_stack(*_simulate(11, 1500, 3), 30)
    a = iv.bootstrap_partials(stack, seed=5, interval="bca")
    b = iv.bootstrap_partials(stack.copy(), seed=5, interval="bca")
    assert json.dumps(a) == json.dumps(b)
    c = iv.bootstrap_partials(stack, seed=6, interval="bca")
    assert c["overall"]["mse"] != a["overall"]["mse"]
    ra, _ = iv.bootstrap_replicates(stack, "mae", n_boot=50, seed=9)
    rb, _ = iv.bootstrap_replicates(stack, "mae", n_boot=50, seed=9)
    np.testing.assert_array_equal(ra["mae"], rb["mae"])


# -------------------------------------------------------------------------------- (4) end to end
def _record(path, t, p, chunk_rows, batch=37):
    with oocmetrics.Recorder(path, "val", chunk_rows=chunk_rows) as rec:
        for a in range(0, t.shape[0], batch):
            rec.update(t[a:a + batch], p[a:a + batch])


def test_stored_chunks_are_the_blocks_without_reading_data(tmp_path, monkeypatch):
    t, p = _simulate(21, 2000, 3)
    _record(tmp_path, t, p, chunk_rows=50)  # 40 chunks >= MIN_BLOCKS
    monkeypatch.setattr(iv, "chunk_partials", lambda *a: pytest.fail("read the data"))
    r = iv.stored_intervals(tmp_path, "val", n_boot=500, seed=2)
    assert r["source"] == "stored partials" and r["blocks"] == 40 and r["block_rows"] == 50
    assert r["epoch"] == 0 and r["split"] == "val" and "40 stored chunks of 50 rows" in r["method"]
    # the same as bootstrapping the in-memory chunk partials
    same = iv.bootstrap_partials(_block_stack(t, p, 50), n_boot=500, seed=2)
    assert r["overall"] == same["overall"] and r["per_output"] == same["per_output"]
    res = oocmetrics.compute_stored(tmp_path, "val")
    for m, v in r["estimate"].items():
        assert math.isclose(v, res[m], rel_tol=1e-12), m
        assert r["overall"][m][0] <= v <= r["overall"][m][1], m
    # attached to the result: strict JSON, copied and compared with the rest
    res.intervals = r
    back = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    assert back["intervals"]["overall"]["r2"] == r["overall"]["r2"]
    dup = res.copy()
    assert dup == res and dup.intervals is not res.intervals
    dup.intervals["overall"]["r2"][0] = -1.0
    assert dup != res
    # an older store without partials: one pass over the data computes the same chunk partials
    monkeypatch.undo()
    shutil.rmtree(tmp_path / "val" / "epoch=0" / "partials")
    again = iv.stored_intervals(tmp_path, "val", n_boot=500, seed=2)
    assert again["source"] == "data pass" and "stored partials do not cover" in again["method"]
    assert again["blocks"] == 40 and again["overall"] == r["overall"] and again["per_output"] == r["per_output"]


@pytest.mark.parametrize("shape", [(1000, 2), (1000, 3, 2)])
def test_few_chunks_fall_back_to_one_pass_over_sub_blocks(tmp_path, shape):
    rng = np.random.default_rng(31)
    t = rng.normal(size=shape)
    p = t + rng.normal(size=shape)
    _record(tmp_path, t, p, chunk_rows=250)  # 4 chunks < MIN_BLOCKS
    r = iv.stored_intervals(tmp_path, "val", n_boot=300, seed=4)
    # 100 sub-blocks: 25 runs of 10 rows inside each chunk, computed with chunk_partials
    assert r["source"] == "data pass" and r["blocks"] == 100 and r["block_rows"] == 10
    assert "4 stored chunk(s), fewer than min_blocks=20" in r["method"]
    same = iv.intervals_of_arrays(t, p, block_rows=10, n_boot=300, seed=4)
    assert r["overall"] == same["overall"] and r["per_output"] == same["per_output"]
    res = oocmetrics.compute_stored(tmp_path, "val")
    assert all(math.isclose(v, res[m], rel_tol=1e-12) for m, v in r["estimate"].items())
    # a lower threshold uses the 4 stored chunks as they are, and says they are too few
    few = iv.stored_intervals(tmp_path, "val", n_boot=300, min_blocks=4)
    assert few["source"] == "stored partials" and few["blocks"] == 4
    assert any("only 4 blocks" in n for n in few["notes"])


def test_an_epoch_of_one_chunk_is_cut_into_sub_blocks(tmp_path):
    t, p = _simulate(41, 150, 1)
    _record(tmp_path, t[:, 0], p[:, 0], chunk_rows=1000)  # one chunk, stored in a grid of 150 rows
    r = iv.stored_intervals(tmp_path, "val", n_boot=200, fallback_blocks=50)
    assert r["source"] == "data pass" and r["blocks"] == 50 and r["block_rows"] == 3
    assert r["overall"]["mse"][0] < r["estimate"]["mse"] < r["overall"]["mse"][1]


# -------------------------------------------------------------------------------- (5) bad input
@pytest.mark.parametrize("level", [0, 1, 1.5, -0.1, True, "0.95", float("nan")])
def test_level_outside_zero_one_is_an_error(rng, level):
    stack = _block_stack(*_simulate(1, 200, 1), 10)
    with pytest.raises(ValueError, match=r"level=.*strictly between 0 and 1"):
        iv.bootstrap_partials(stack, level=level)


@pytest.mark.parametrize("n_boot", [0, -5, 1.5, True])
def test_n_boot_below_one_is_an_error(n_boot):
    stack = _block_stack(*_simulate(1, 200, 1), 10)
    with pytest.raises(ValueError, match=r"n_boot=.*int >= 1"):
        iv.bootstrap_partials(stack, n_boot=n_boot)
    with pytest.raises(ValueError, match=r"n_boot="):
        iv.bootstrap_replicates(stack, n_boot=n_boot)


def test_other_bad_options_are_errors(tmp_path):
    stack = _block_stack(*_simulate(1, 200, 1), 10)
    with pytest.raises(ValueError, match=r"seed=-1; expected an int >= 0"):
        iv.bootstrap_partials(stack, seed=-1)
    with pytest.raises(ValueError, match=r"interval='basic'; expected 'percentile' or 'bca'"):
        iv.bootstrap_partials(stack, interval="basic")
    with pytest.raises(ValueError, match=r"order statistics"):
        iv.bootstrap_partials(stack, ["mse", "median_absolute_error"])
    with pytest.raises(ValueError, match=r"order statistics"):
        iv.bootstrap_replicates(stack, ["median_absolute_error"])
    with pytest.raises(ValueError, match=r"Unknown metric"):
        iv.bootstrap_partials(stack, ["accuracy"])
    with pytest.raises(ValueError, match=r"shape \(blocks, 17, J\).*\(20, 16, 1\)"):
        iv.bootstrap_partials(stack[:, :16])
    with pytest.raises(TypeError, match=r"list; expected a NumPy array"):
        iv.bootstrap_partials(stack.tolist())
    with pytest.raises(ValueError, match=r"holds 1 block\(s\); a block bootstrap needs at least 2"):
        iv.bootstrap_partials(stack[:1])
    with pytest.raises(ValueError, match=r"counts of shape \(20,\)"):
        iv.weighted_merge(stack, np.ones(3))
    with pytest.raises(ValueError, match=r"counts must be finite and >= 0"):
        iv.weighted_merge(stack, -np.ones(20))
    with pytest.raises(ValueError, match=r"Expected stack to have shape"):
        iv.weighted_merge(stack[0], np.ones(20))
    t, p = _simulate(2, 100, 1)
    with pytest.raises(ValueError, match=r"block_rows=100 makes 1 block.*block_rows <= 50"):
        iv.intervals_of_arrays(t, p, block_rows=100)
    with pytest.raises(ValueError, match=r"block_rows=0; expected an int >= 1"):
        iv.intervals_of_arrays(t, p, block_rows=0)
    with pytest.raises(ValueError, match=r"nonfinite='drop'"):
        iv.intervals_of_arrays(t, p, nonfinite="drop")
    _record(tmp_path, t, p, chunk_rows=10)
    with pytest.raises(ValueError, match=r"min_blocks=1; expected an int >= 2"):
        iv.stored_intervals(tmp_path, "val", min_blocks=1)
    with pytest.raises(ValueError, match=r"fallback_blocks=1.5; expected an int >= 2"):
        iv.stored_intervals(tmp_path, "val", fallback_blocks=1.5)


def test_one_row_is_an_error_naming_the_rows(tmp_path):
    _record(tmp_path, np.array([1.0]), np.array([2.0]), chunk_rows=10)
    with pytest.raises(ValueError, match=r"Epoch 0 of split 'val' .* has 1 row: a bootstrap needs at least 2"):
        iv.stored_intervals(tmp_path, "val")
    with pytest.raises(ValueError, match=r"y_true has 1 row\(s\); a bootstrap needs at least 2"):
        iv.intervals_of_arrays(np.array([1.0]), np.array([2.0]))


def test_few_replicates_are_allowed_with_a_note(rng):
    stack = _block_stack(*_simulate(3, 400, 1), 10)
    r = iv.bootstrap_partials(stack, "mae", n_boot=1)
    lo, hi = r["overall"]["mae"]
    assert lo == hi and any("n_boot=1 leaves" in n for n in r["notes"])
    only_max = iv.bootstrap_partials(stack, "max_error")
    assert only_max["overall"] == {} and "max_error" in only_max["excluded"]
