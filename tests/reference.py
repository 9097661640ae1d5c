"""Independent float64 references: scikit-learn, SciPy and NumPy two-pass, never oocmetrics kernels."""
from __future__ import annotations

import numpy as np
from scipy import stats
from sklearn import metrics as skm


def as_2d(y: np.ndarray) -> np.ndarray:
    """(rows, *trailing) -> (M, J) float64, as oocmetrics views it."""
    y = np.asarray(y, dtype=np.float64)
    return y.reshape(-1, 1) if y.ndim == 1 else y.reshape(-1, y.shape[-1])


def _pearson(t: np.ndarray, p: np.ndarray) -> float:
    if t.size < 2 or np.ptp(t) == 0 or np.ptp(p) == 0:
        return float("nan")
    return float(stats.pearsonr(t, p).statistic)


def reference(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """(overall, per_output) for every metric in oocmetrics.METRICS, from scikit-learn / SciPy."""
    T, P = as_2d(y_true), as_2d(y_pred)
    J = T.shape[1]
    per = {
        "mse": skm.mean_squared_error(T, P, multioutput="raw_values"),
        "rmse": skm.root_mean_squared_error(T, P, multioutput="raw_values"),
        "mae": skm.mean_absolute_error(T, P, multioutput="raw_values"),
        "explained_variance": skm.explained_variance_score(T, P, multioutput="raw_values"),
        "max_error": np.array([skm.max_error(T[:, j], P[:, j]) for j in range(J)]),
        "pearson_r": np.array([_pearson(T[:, j], P[:, j]) for j in range(J)]),
    }
    if T.shape[0] >= 2:
        per["r2"] = skm.r2_score(T, P, multioutput="raw_values")
        r2_vw = float(skm.r2_score(T, P, multioutput="variance_weighted"))
    else:
        per["r2"] = np.full(J, np.nan)
        r2_vw = float("nan")
    rng = T.max(axis=0) - T.min(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        per["nrmse"] = np.where(rng > 0, per["rmse"] / rng, np.nan)
    overall = {k: float(np.mean(v)) for k, v in per.items()}
    overall["max_error"] = float(np.max(per["max_error"]))
    overall["r2_variance_weighted"] = r2_vw
    return overall, per


def assert_matches(result, y_true, y_pred, *, rtol: float = 1e-9, atol: float = 1e-12) -> None:
    """Every overall and per-output value of an EpochMetrics equals the reference."""
    overall, per = reference(y_true, y_pred)
    for name, ref in overall.items():
        np.testing.assert_allclose(result.overall[name], ref, rtol=rtol, atol=atol, err_msg=name)
    for name, ref in per.items():
        np.testing.assert_allclose(result.per_output[name], ref, rtol=rtol, atol=atol, err_msg=name)


def exact_sums(t, p) -> dict:
    """One output's sums in exact rational arithmetic (``fractions.Fraction``): n, sse, sst (of t),
    spp (of p), cov (t, p) and see (of the centred error), for references that round only at the end."""
    from fractions import Fraction

    tt = [Fraction(float(v)) for v in t]
    pp = [Fraction(float(v)) for v in p]
    n = len(tt)
    e = [a - b for a, b in zip(tt, pp)]
    mt, mp, me = sum(tt) / n, sum(pp) / n, sum(e) / n
    return {
        "n": n,
        "sse": sum(x * x for x in e),
        "sst": sum((a - mt) ** 2 for a in tt),
        "spp": sum((b - mp) ** 2 for b in pp),
        "cov": sum((a - mt) * (b - mp) for a, b in zip(tt, pp)),
        "see": sum((x - me) ** 2 for x in e),
    }
