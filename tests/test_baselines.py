"""benchmarks/baselines.py (imported as ``baselines``: pyproject.toml puts benchmarks/ on
pytest's path) against scikit-learn / SciPy, over many batches and awkward inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
from sklearn import metrics as skm

from baselines import (
    METRICS,
    ConcatRecorder,
    SampledRecorder,
    StreamingReference,
    numpy_metrics,
    numpy_metrics_per_output,
    to_numpy,
)

torch = pytest.importorskip("torch")


# ---------------------------------------------------------------------------------------------
# reference: scikit-learn / SciPy over (M, J) float64
# ---------------------------------------------------------------------------------------------
def sk_reference(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    j = 1 if y_true.ndim == 1 else y_true.shape[-1]
    t = np.asarray(y_true, dtype=np.float64).reshape(-1, j)
    p = np.asarray(y_pred, dtype=np.float64).reshape(-1, j)
    rmse = np.sqrt(skm.mean_squared_error(t, p, multioutput="raw_values"))
    rng = t.max(axis=0) - t.min(axis=0)
    pearson = [scipy.stats.pearsonr(t[:, k], p[:, k]).statistic for k in range(j)]
    return {
        "mse": skm.mean_squared_error(t, p),
        "rmse": float(np.mean(rmse)),
        "mae": skm.mean_absolute_error(t, p),
        "r2": skm.r2_score(t, p),
        "r2_variance_weighted": skm.r2_score(t, p, multioutput="variance_weighted"),
        "explained_variance": skm.explained_variance_score(t, p),
        "pearson_r": float(np.mean(pearson)),
        "nrmse": float(np.mean(rmse / rng)),
        "max_error": max(skm.max_error(t[:, k], p[:, k]) for k in range(j)),
    }


def assert_close(got: dict[str, float], want: dict[str, float], rtol: float = 1e-10) -> None:
    assert set(got) == set(want)
    for name in want:
        assert math.isclose(got[name], want[name], rel_tol=rtol, abs_tol=1e-12), (name, got[name], want[name])


def make_data(rows: int, trailing: tuple[int, ...], seed: int = 0, offset: float = 0.0):
    rng = np.random.default_rng(seed)
    t = (offset + rng.normal(size=(rows, *trailing)) * rng.uniform(0.5, 3, size=trailing[-1:] or 1)).astype(np.float32)
    p = (t + rng.normal(scale=0.5, size=t.shape) + 0.1).astype(np.float32)
    return t, p


def batches(t: np.ndarray, p: np.ndarray, sizes: list[int]):
    lo = 0
    for b in sizes:
        yield t[lo : lo + b], p[lo : lo + b]
        lo += b
    assert lo == len(t)


# ---------------------------------------------------------------------------------------------
# numpy_metrics
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("trailing", [(), (5,), (7, 3), (4, 6, 2)])
def test_numpy_metrics_matches_sklearn(trailing):
    t, p = make_data(300, trailing, seed=len(trailing))
    assert_close(numpy_metrics(t, p), sk_reference(t, p))


def test_numpy_metrics_blocks_and_offset():
    # many blocks (8,192 rows each) so the cross-block path runs; offset 1e4 with small noise
    # stresses centring (a one-pass sum(x^2) - n*mean^2 loses most digits here)
    t, p = make_data(150_001, (3,), seed=1, offset=1e4)
    got = numpy_metrics(t, p)
    assert_close(got, sk_reference(t, p), rtol=1e-9)
    # chunk invariance at the block level: same answer as a one-block computation
    from baselines import _finalize, _moments_two_pass

    one_block = _finalize(_moments_two_pass(t.reshape(-1, 3), p.reshape(-1, 3), block_rows=10**7), METRICS)[0]
    assert_close(got, one_block, rtol=1e-13)


def test_numpy_metrics_per_output_shapes_and_overall():
    t, p = make_data(200, (10, 4))
    overall, per = numpy_metrics_per_output(t, p)
    assert set(per) == set(METRICS)
    for name, v in per.items():
        assert v.shape == (4,), name
    assert overall["max_error"] == per["max_error"].max()
    assert math.isclose(overall["mse"], per["mse"].mean())
    for k in range(4):
        col = sk_reference(t[..., k].reshape(-1), p[..., k].reshape(-1))
        assert math.isclose(per["r2"][k], col["r2"], rel_tol=1e-10)
        assert math.isclose(per["pearson_r"][k], col["pearson_r"], rel_tol=1e-10)


def test_numpy_metrics_subset_and_unknown():
    t, p = make_data(50, (2,))
    assert set(numpy_metrics(t, p, metrics=["mse", "r2"])) == {"mse", "r2"}
    with pytest.raises(ValueError, match="Unknown metric"):
        numpy_metrics(t, p, metrics=["mse", "accuracy"])


def test_numpy_metrics_constant_targets_follow_sklearn():
    t = np.ones((10, 3), dtype=np.float32)
    p = t.copy()
    p[:, 1] += np.arange(10, dtype=np.float32)  # output 1: constant target, wrong predictions
    p[:, 2] = 2.0  # output 2: constant target, constant wrong prediction
    overall, per = numpy_metrics_per_output(t, p)
    t, p = t.astype(np.float64), p.astype(np.float64)  # scikit-learn computes in the input dtype
    np.testing.assert_array_equal(per["r2"], skm.r2_score(t, p, multioutput="raw_values"))
    np.testing.assert_array_equal(per["explained_variance"], skm.explained_variance_score(t, p, multioutput="raw_values"))
    assert overall["r2_variance_weighted"] == skm.r2_score(t, p, multioutput="variance_weighted")
    assert np.isnan(per["pearson_r"]).all()  # y_true constant everywhere
    assert np.isnan(per["nrmse"]).all()  # range 0


def test_numpy_metrics_single_row_r2_is_nan():
    t, p = np.array([[1.0, 2.0]]), np.array([[1.5, 2.0]])
    got = numpy_metrics(t, p)
    assert np.isnan(got["r2"]) and np.isnan(got["r2_variance_weighted"])
    assert got["mse"] == pytest.approx(0.125)
    assert got["max_error"] == 0.5


def test_numpy_metrics_accepts_torch_and_low_precision():
    t, p = make_data(64, (3,))
    want = numpy_metrics(t, p)
    tt = torch.from_numpy(t).requires_grad_(True)
    assert_close(numpy_metrics(tt, torch.from_numpy(p)), want)
    # bf16 has no NumPy dtype: widened to float32 exactly
    tb, pb = torch.from_numpy(t).bfloat16(), torch.from_numpy(p).bfloat16()
    assert_close(numpy_metrics(tb, pb), sk_reference(tb.float().numpy(), pb.float().numpy()))
    assert_close(numpy_metrics(t.astype(np.float16), p.astype(np.float16)), sk_reference(t.astype(np.float16), p.astype(np.float16)))


@pytest.mark.parametrize(
    ("t", "p", "err", "match"),
    [
        (np.zeros((4, 2)), np.zeros((4, 3)), ValueError, "shape"),
        (np.zeros((0, 2)), np.zeros((0, 2)), ValueError, "at least one value"),
        (np.float64(1.0), np.float64(1.0), ValueError, "at least one dimension"),
        (np.zeros((4, 2), dtype=np.int64), np.zeros((4, 2)), TypeError, "floating-point"),
        (np.zeros((4, 2)), torch.zeros((4, 2), dtype=torch.int32), TypeError, "floating-point"),
    ],
)
def test_numpy_metrics_errors(t, p, err, match):
    with pytest.raises(err, match=match):
        numpy_metrics(t, p)


def test_to_numpy_copy_semantics():
    x = torch.arange(6, dtype=torch.float32)
    view = to_numpy(x)
    copy = to_numpy(x, copy=True)
    x += 1
    assert view[0] == 1.0 and copy[0] == 0.0
    a = np.zeros(3)
    assert to_numpy(a) is a
    assert to_numpy([1.0, 2.0]).dtype == np.float64


# ---------------------------------------------------------------------------------------------
# recorders
# ---------------------------------------------------------------------------------------------
UNEVEN = [1, 7, 64, 3, 100, 25]  # 200 rows


def test_concat_recorder_exact_over_uneven_batches():
    t, p = make_data(200, (5, 3), seed=3)
    rec = ConcatRecorder()
    for bt, bp in batches(t, p, UNEVEN):
        rec.update(torch.from_numpy(bt), torch.from_numpy(bp))
    assert rec.rows == 200 and rec.batches == len(UNEVEN)
    assert rec.held_bytes == t.nbytes + p.nbytes
    assert_close(rec.compute(), sk_reference(t, p))


def test_concat_recorder_copies_reused_buffers():
    # a loop that reuses its output buffer: the seed's .numpy() view would record the last batch N times
    t, p = make_data(40, (2,), seed=4)
    buf_t, buf_p = torch.empty(10, 2), torch.empty(10, 2)
    rec = ConcatRecorder()
    for bt, bp in batches(t, p, [10] * 4):
        buf_t.copy_(torch.from_numpy(bt))
        buf_p.copy_(torch.from_numpy(bp))
        rec.update(buf_t, buf_p)
    assert_close(rec.compute(), sk_reference(t, p))


def test_concat_recorder_reset_and_errors():
    t, p = make_data(20, (2,))
    rec = ConcatRecorder(metrics=["mse"])
    with pytest.raises(ValueError, match="No batches"):
        rec.compute()
    rec.update(t[:10], p[:10])
    with pytest.raises(ValueError, match="shape"):
        rec.update(t[:10], p[:10, :1])
    with pytest.raises(ValueError, match="trailing shape"):
        rec.update(t[:10, :1], p[:10, :1])
    with pytest.raises(ValueError, match="batch dimension"):
        rec.update(np.float32(1.0), np.float32(1.0))
    assert rec.batches == 1  # failed updates record nothing
    rec.reset()
    assert (rec.epoch, rec.rows, rec.batches, rec.held_bytes) == (1, 0, 0, 0)
    rec.update(t[:, :1], p[:, :1])  # a new epoch may change the trailing shape
    assert rec.compute() == pytest.approx({"mse": skm.mean_squared_error(t[:, :1], p[:, :1])})
    with ConcatRecorder() as r2:
        r2.update(t, p)
    assert r2.held_bytes == 0


@pytest.mark.parametrize("keep_all", [True, False])
def test_sampled_recorder_uses_first_batches_only(keep_all):
    t, p = make_data(200, (3,), seed=5)
    rec = SampledRecorder(max_batches=3, keep_all=keep_all)
    for bt, bp in batches(t, p, UNEVEN):
        rec.update(bt, bp)
    n_first = sum(UNEVEN[:3])
    assert rec.rows == 200 and rec.batches == len(UNEVEN)
    kept = 200 if keep_all else n_first
    assert rec.held_bytes == kept * 3 * 4 * 2
    assert_close(rec.compute(), sk_reference(t[:n_first], p[:n_first]))


def test_sampled_recorder_all_batches_when_epoch_is_short():
    t, p = make_data(200, (3,), seed=6)
    rec = SampledRecorder(max_batches=1000)
    for bt, bp in batches(t, p, UNEVEN):
        rec.update(bt, bp)
    assert_close(rec.compute(), sk_reference(t, p))


def test_sampled_recorder_is_biased_on_ordered_data():
    # two "subjects" in order: the first batches say nothing about the second one
    rng = np.random.default_rng(7)
    t = rng.normal(size=(400, 2)).astype(np.float32)
    p = t + rng.normal(scale=np.where(np.arange(400) < 200, 0.1, 1.0)[:, None], size=t.shape).astype(np.float32)
    rec = SampledRecorder(max_batches=2)
    full = ConcatRecorder()
    for bt, bp in batches(t, p, [50] * 8):
        rec.update(bt, bp)
        full.update(bt, bp)
    assert rec.compute()["mse"] < 0.1 * full.compute()["mse"]


@pytest.mark.parametrize(("value", "err"), [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError)])
def test_sampled_recorder_bad_max_batches(value, err):
    with pytest.raises(err, match="max_batches"):
        SampledRecorder(max_batches=value)


# ---------------------------------------------------------------------------------------------
# StreamingReference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sizes", [[1] * 37, UNEVEN, [200]])
def test_streaming_reference_matches_sklearn(sizes):
    t, p = make_data(sum(sizes), (4, 3), seed=8)
    ref = StreamingReference()
    for bt, bp in batches(t, p, sizes):
        ref.update(bt, bp)
    assert ref.rows == sum(sizes) and ref.batches == len(sizes)
    assert_close(ref.compute(), sk_reference(t, p))


def test_streaming_reference_ill_conditioned_and_shuffled():
    # offset 1e5 with noise 0.1 (sum(x^2) - n*mean^2 would cancel ~12 digits): centred merges keep ~1e-9
    rng = np.random.default_rng(9)
    t = (1e5 + 0.1 * rng.normal(size=(3000, 2))).astype(np.float64)
    p = t + 0.05 * rng.normal(size=t.shape)
    want = sk_reference(t, p)
    for perm in (np.arange(3000), rng.permutation(3000)):
        ref = StreamingReference()
        for bt, bp in batches(t[perm], p[perm], [17] * 176 + [8]):
            ref.update(bt, bp)
        assert_close(ref.compute(), want, rtol=1e-9)
    assert_close(numpy_metrics(t, p), want, rtol=1e-9)


def test_streaming_reference_memory_is_logarithmic_and_resets():
    ref = StreamingReference(metrics=["mse"])
    t, p = make_data(1000, (2,))
    for bt, bp in batches(t, p, [1] * 1000):
        ref.update(bt, bp)
    assert len(ref._stack) == bin(1000).count("1")  # binary counter of partials
    ref.reset()
    assert ref.epoch == 1 and ref.rows == 0
    with pytest.raises(ValueError, match="No batches"):
        ref.compute()
    ref.update(t[:5], p[:5])
    with pytest.raises(ValueError, match="trailing shape"):
        ref.update(t[:5, :1], p[:5, :1])
