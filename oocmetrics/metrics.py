"""Metric registry: turns merged partials (see :mod:`oocmetrics.kernels.moments`) into metric values.

Names follow scikit-learn: ``*_error`` lower is better, ``r2`` / ``explained_variance`` /
``pearson_r`` higher is better. Each metric has a value per output (last axis) and an overall value:
the uniform mean over outputs (scikit-learn's ``multioutput="uniform_average"``), except ``max_error``
(max over outputs) and ``r2_variance_weighted`` (scikit-learn's ``"variance_weighted"``).

Edge cases (scikit-learn's choices unless noted):
- constant y_true in an output: r2 and explained_variance are 1.0 for a perfect prediction, else 0.0;
- fewer than two values in an output: r2 is NaN (explained_variance follows the constant rule);
- pearson_r is NaN when y_true or y_pred is constant (as SciPy); nrmse is NaN when y_true's range is 0;
- an output with no finite pair at all (``nonfinite="skip"``): every metric of it is NaN.

:data:`METRICS`, the default, all come from one pass of decomposable partials. Order statistics
(:data:`ORDER_METRICS`: ``median_absolute_error``, scikit-learn's definition, exact) need extra passes
over the data (radix select, usually 3), so they are computed only when asked for by name.
"""
from __future__ import annotations

import copy as _copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from oocmetrics.kernels.moments import (
    C_TP, M2_E, M2_P, M2_T, MAX_AE, MAX_T, MIN_T, N, SAE, SKIPPED, SSE,
)

__all__ = ["METRICS", "ORDER_METRICS", "ALL_METRICS", "EpochMetrics", "finalize", "resolve_metrics"]


def _force_finite_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """1 - num/den with scikit-learn's force_finite rule for den == 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = 1.0 - num / den
    out = np.where(den == 0.0, np.where(num == 0.0, 1.0, 0.0), out)
    return out


def _mse(P: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return P[SSE] / P[N]


def _rmse(P: np.ndarray) -> np.ndarray:
    return np.sqrt(_mse(P))


def _mae(P: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return P[SAE] / P[N]


def _r2(P: np.ndarray) -> np.ndarray:
    out = _force_finite_ratio(P[SSE], P[M2_T])
    return np.where(P[N] < 2, np.nan, out)


def _explained_variance(P: np.ndarray) -> np.ndarray:
    out = _force_finite_ratio(P[M2_E], P[M2_T])
    return np.where(P[N] < 1, np.nan, out)


def _pearson_r(P: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        den = np.sqrt(P[M2_T]) * np.sqrt(P[M2_P])
        r = P[C_TP] / den
    r = np.where(den > 0.0, np.clip(r, -1.0, 1.0), np.nan)
    return r


def _nrmse(P: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # range of +-1.7e308 is inf
        rng = P[MAX_T] - P[MIN_T]
        out = _rmse(P) / rng
    return np.where(rng > 0.0, out, np.nan)


def _max_error(P: np.ndarray) -> np.ndarray:
    return np.where(P[N] > 0, P[MAX_AE], np.nan)


def _mean(values: np.ndarray, P: np.ndarray) -> float:
    return float(np.mean(values)) if values.size else float("nan")


def _max(values: np.ndarray, P: np.ndarray) -> float:
    return float(np.max(values)) if values.size else float("nan")


def _variance_weighted(values: np.ndarray, P: np.ndarray) -> float:
    weights = P[M2_T]
    if not np.any(weights != 0.0):  # all outputs constant: scikit-learn falls back to uniform
        return _mean(values, P)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # inf / NaN after an overflow
        return float(np.average(values, weights=weights))


def _median_absolute_error(P: np.ndarray, order_stats: dict[str, np.ndarray]) -> np.ndarray:
    return order_stats["median_absolute_error"]


@dataclass(frozen=True)
class _Metric:
    per_output: Callable[..., np.ndarray]
    overall: Callable[[np.ndarray, np.ndarray], float]
    per_output_key: str  # name of the per-output array (variants share one)
    order_statistic: bool = False  # needs extra passes; per_output then takes (P, order_stats)


_REGISTRY: dict[str, _Metric] = {
    "mse": _Metric(_mse, _mean, "mse"),
    "rmse": _Metric(_rmse, _mean, "rmse"),
    "mae": _Metric(_mae, _mean, "mae"),
    "r2": _Metric(_r2, _mean, "r2"),
    "r2_variance_weighted": _Metric(_r2, _variance_weighted, "r2"),
    "explained_variance": _Metric(_explained_variance, _mean, "explained_variance"),
    "pearson_r": _Metric(_pearson_r, _mean, "pearson_r"),
    "nrmse": _Metric(_nrmse, _mean, "nrmse"),
    "max_error": _Metric(_max_error, _max, "max_error"),
    "median_absolute_error": _Metric(_median_absolute_error, _mean, "median_absolute_error", True),
}

METRICS: tuple[str, ...] = tuple(k for k, v in _REGISTRY.items() if not v.order_statistic)
"""The default suite (``metrics=None``): every decomposable metric, all from one pass."""
ORDER_METRICS: tuple[str, ...] = tuple(k for k, v in _REGISTRY.items() if v.order_statistic)
"""Exact order statistics, computed only when named (they cost extra passes over the data)."""
ALL_METRICS: tuple[str, ...] = METRICS + ORDER_METRICS
"""Every name ``metrics=`` accepts."""


def resolve_metrics(metrics: Iterable[str] | str | None) -> tuple[str, ...]:
    """Validate a metric selection; None means the default suite :data:`METRICS`.

    Accepts a name, or any iterable of names (a generator too: it is consumed here, once, so entry
    points resolve once and pass the returned tuple on). Duplicates are dropped, order is kept.
    """
    if metrics is None:
        return METRICS
    if isinstance(metrics, str):
        metrics = (metrics,)
    names = tuple(metrics)
    unknown = [m for m in names if not isinstance(m, str) or m not in _REGISTRY]
    if unknown:
        raise ValueError(
            f"Unknown metric(s) {unknown}; choose from {list(ALL_METRICS)} or pass metrics=None "
            f"for the default suite."
        )
    if not names:
        raise ValueError(
            f"metrics is empty; choose from {list(ALL_METRICS)} or pass metrics=None for the default suite."
        )
    return tuple(dict.fromkeys(names))


def _json_float(v: float) -> float | str | None:
    """A float for strict JSON: NaN -> None, +inf / -inf -> "inf" / "-inf", else the float."""
    v = float(v)
    if math.isnan(v):
        return None
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return v


def _json_tree(v: Any) -> Any:
    """A nested dict / list / array of numbers for strict JSON: floats as :func:`_json_float`."""
    if isinstance(v, dict):
        return {str(k): _json_tree(x) for k, x in v.items()}
    if isinstance(v, np.ndarray):
        return _json_tree(v.tolist())
    if isinstance(v, (list, tuple)):
        return [_json_tree(x) for x in v]
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return _json_float(v)
    return v


def _values_equal(a: Any, b: Any) -> bool:
    """Equality of result values: NaN equals NaN, arrays compare element-wise (shape included)."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            return False
        try:
            return bool(np.array_equal(a, b, equal_nan=True))
        except TypeError:  # non-numeric arrays
            return bool(np.array_equal(a, b))
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_values_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_values_equal(x, y) for x, y in zip(a, b))
    return bool(a == b)


@dataclass(eq=False)
class EpochMetrics(Mapping):
    """Exact metrics of one epoch: ``overall[name]`` floats and ``per_output[name]`` arrays (J,).

    A read-only :class:`~collections.abc.Mapping` over the overall values: ``result["mse"]``,
    ``list(result)`` (the metric names, in the order asked for), ``len(result)``, ``dict(result)``
    and ``result.items()`` all work. ``a == b`` between two results compares every attribute (NaN
    equals NaN, per-output arrays element-wise); against any other mapping, the overall values.
    """

    overall: dict[str, float]
    per_output: dict[str, np.ndarray]
    n_rows: int
    n_values: int
    n_skipped: int
    epoch: int | None = None
    split: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    quantiles: dict[str, Any] | None = None
    """Exact quantiles of |e| when asked for (``quantiles=``), else None: ``{"q": [Q floats],
    "per_output": (Q, J) float64 array, "pooled": (Q,) float64 array}``, NumPy's ``method="linear"``
    (``per_output[i, j] == np.quantile(|e|[:, j], q[i])``, ``pooled[i]`` over all outputs' values)."""
    intervals: dict[str, Any] | None = None
    """Confidence intervals when asked for (see :mod:`oocmetrics.intervals`), else None: ``{"level",
    "method", "n_boot", "seed", "blocks", "overall": {name: [low, high]}, "per_output": {name: [[low]*J,
    [high]*J]}, ...}``."""

    def __getitem__(self, name: str) -> float:
        try:
            return self.overall[name]
        except KeyError:
            raise KeyError(f"{name!r} was not computed; available: {list(self.overall)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.overall)

    def __len__(self) -> int:
        return len(self.overall)

    def __contains__(self, name: object) -> bool:
        return name in self.overall

    def __eq__(self, other: object) -> bool:
        if isinstance(other, EpochMetrics):
            return all(
                _values_equal(getattr(self, f), getattr(other, f))
                for f in ("overall", "per_output", "n_rows", "n_values", "n_skipped", "epoch", "split", "extra",
                          "quantiles", "intervals")
            )
        if isinstance(other, Mapping):
            return _values_equal(dict(self.overall), dict(other.items()))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable

    def copy(self) -> "EpochMetrics":
        """A deep copy: new dicts, copied per-output arrays and a deep-copied ``extra``."""
        return EpochMetrics(
            overall=dict(self.overall),
            per_output={k: np.array(v, copy=True) for k, v in self.per_output.items()},
            n_rows=self.n_rows,
            n_values=self.n_values,
            n_skipped=self.n_skipped,
            epoch=self.epoch,
            split=self.split,
            extra=_copy.deepcopy(self.extra),
            quantiles=_copy.deepcopy(self.quantiles),
            intervals=_copy.deepcopy(self.intervals),
        )

    def to_dict(self) -> dict[str, Any]:
        """Strict-JSON-ready dict (``json.dumps(..., allow_nan=False)`` succeeds).

        Undefined values (NaN) become None (null); infinite values (an overflow, e.g. e = y_true -
        y_pred beyond float64's range) become the strings ``"inf"`` / ``"-inf"``; ``float(s)`` reads
        them back.
        """
        out = {
            "epoch": self.epoch,
            "split": self.split,
            "n_rows": self.n_rows,
            "n_values": self.n_values,
            "n_skipped": self.n_skipped,
            "overall": {k: _json_float(v) for k, v in self.overall.items()},
            "per_output": {k: [_json_float(x) for x in np.asarray(v).tolist()] for k, v in self.per_output.items()},
            **self.extra,
        }
        if self.quantiles is not None:  # {"q": [...], "per_output": [[J values] per q], "pooled": [...]}
            out["quantiles"] = {
                "q": [float(x) for x in self.quantiles["q"]],
                "per_output": [[_json_float(x) for x in row] for row in np.asarray(self.quantiles["per_output"]).tolist()],
                "pooled": [_json_float(x) for x in np.asarray(self.quantiles["pooled"]).tolist()],
            }
        if self.intervals is not None:  # {"overall": {name: [low, high]}, "per_output": {name: [[low..], [high..]]}, ..}
            out["intervals"] = _json_tree(self.intervals)
        return out

    def __repr__(self) -> str:
        vals = ", ".join(f"{k}={v:.6g}" for k, v in self.overall.items())
        where = f"{self.split} epoch {self.epoch}, " if self.split is not None else ""
        return f"EpochMetrics({where}{self.n_rows} rows: {vals})"


def finalize(
    partials: np.ndarray,
    metrics: Iterable[str] | None = None,
    *,
    n_rows: int,
    order_stats: dict[str, np.ndarray] | None = None,
    epoch: int | None = None,
    split: str | None = None,
) -> EpochMetrics:
    """Metric values from fully merged partials (K, J) and any order statistics computed for them.

    ``metrics`` is resolved once here (a generator is consumed once); callers that also need the
    selection elsewhere should pass the tuple :func:`resolve_metrics` returned.
    """
    names = resolve_metrics(metrics)
    overall: dict[str, float] = {}
    per_output: dict[str, np.ndarray] = {}
    for name in names:
        spec = _REGISTRY[name]
        if spec.per_output_key not in per_output:
            if spec.order_statistic:
                per_output[spec.per_output_key] = spec.per_output(partials, order_stats or {})
            else:
                per_output[spec.per_output_key] = spec.per_output(partials)
        overall[name] = spec.overall(per_output[spec.per_output_key], partials)
    return EpochMetrics(
        overall=overall,
        per_output=per_output,
        n_rows=int(n_rows),
        n_values=int(partials[N].sum()),
        n_skipped=int(partials[SKIPPED].sum()),
        epoch=epoch,
        split=split,
    )


def order_statistics_needed(metrics: Iterable[str] | None) -> tuple[str, ...]:
    """The order-statistic metrics in a selection (they need passes beyond the partials)."""
    return tuple(m for m in resolve_metrics(metrics) if _REGISTRY[m].order_statistic)
