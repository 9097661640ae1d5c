"""What the seed trainer did, kept as baselines for benchmarks and tests (pure NumPy, no store).

Benchmark code, not part of the ``oocmetrics`` package: the scripts in this directory import it as
``baselines`` (run as scripts, their directory is on ``sys.path``), and pytest finds it through
``pythonpath = ["benchmarks"]`` in ``pyproject.toml``. It re-implements the finalisation and the
merge on purpose, so that it stays an independent check of the library's kernels.

* :func:`numpy_metrics` -- the float64 two-pass reference over arrays in RAM ("NumPy in RAM").
* :class:`ConcatRecorder` -- the seed's naive pattern: keep a copy of every batch in Python lists,
  ``np.concatenate`` at epoch end, then :func:`numpy_metrics`. Memory grows with the epoch.
* :class:`SampledRecorder` -- the seed's usual "fix": metrics on the first ``max_batches`` batches
  only. With ``keep_all=True`` (what the seed did) every batch is still appended, so memory still
  grows with the epoch; ``keep_all=False`` is the bounded variant that stops appending. Either way
  the result is *not* the epoch's metric on ordered data.
* :class:`StreamingReference` -- float64 per-batch two-pass partials merged with Chan's formulas in
  a pairwise tree (O(log batches) memory). An independent check of exact out-of-core results.

The recorders share ``update(y_true, y_pred)`` / ``compute()`` / ``reset()`` with
:class:`oocmetrics.Recorder`; ``compute()`` returns a plain ``dict[str, float]`` with the names of
``oocmetrics.METRICS`` (the overall values, as ``EpochMetrics.overall``). Metric definitions are
those of ``docs/API.md``: data of shape ``(rows, *trailing)`` is viewed as ``(M, J)`` with
``J = trailing[-1]`` outputs, overall = uniform mean over outputs, except ``max_error`` (max) and
``r2_variance_weighted`` (scikit-learn's ``multioutput="variance_weighted"``).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

__all__ = [
    "METRICS",
    "ConcatRecorder",
    "SampledRecorder",
    "StreamingReference",
    "numpy_metrics",
    "numpy_metrics_per_output",
    "to_numpy",
]

# Same names and order as oocmetrics.METRICS (kept here so this module needs no other oocmetrics code).
METRICS: tuple[str, ...] = (
    "mse",
    "rmse",
    "mae",
    "r2",
    "r2_variance_weighted",
    "explained_variance",
    "pearson_r",
    "nrmse",
    "max_error",
)

_BLOCK_ROWS = 8_192  # rows per block in numpy_metrics: 4 float64 (J, B) buffers stay in cache (2x faster than 64K)


# ----------------------------------------------------------------------------------------------
# input handling
# ----------------------------------------------------------------------------------------------
def to_numpy(x: Any, name: str = "y", *, copy: bool = False) -> np.ndarray:
    """A torch tensor (any device, requires_grad ok) or array-like as a NumPy float array.

    Torch tensors go through ``.detach().cpu().numpy()`` as in the seed trainer (bfloat16, which
    NumPy lacks, is widened to float32 first). For a CPU tensor ``.numpy()`` is a *view* of the
    tensor's memory; ``copy=True`` returns an independent copy (what a recorder that keeps batches
    must do: a training loop may reuse its output buffers).
    """
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        t = x.detach()
        if not t.is_floating_point():
            raise TypeError(f"Expected `{name}` to be a floating-point tensor, but got {t.dtype}.")
        on_cpu = t.device.type == "cpu"
        if str(t.dtype) == "torch.bfloat16":
            t, on_cpu = t.float(), False  # .float() already made a new tensor
        arr = t.cpu().numpy()
        return arr.copy() if copy and on_cpu else arr
    arr = x if isinstance(x, np.ndarray) else np.asarray(x)
    if arr.dtype.kind != "f":
        raise TypeError(f"Expected `{name}` to be a floating-point array or tensor, but got dtype {arr.dtype}.")
    return arr.copy() if copy else arr


def _as_2d(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate once; return float arrays viewed as (M, J)."""
    t = to_numpy(y_true, "y_true")
    p = to_numpy(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"Expected `y_pred` to have the shape of `y_true` {t.shape}, but got {p.shape}.")
    if t.ndim == 0:
        raise ValueError("Expected `y_true` to have at least one dimension (rows), but got a scalar.")
    if t.size == 0:
        raise ValueError(f"Expected at least one value, but `y_true` has shape {t.shape}.")
    j = 1 if t.ndim == 1 else t.shape[-1]
    return t.reshape(-1, j), p.reshape(-1, j)


# ----------------------------------------------------------------------------------------------
# finalisation: per-output statistics -> metrics (shared by numpy_metrics and StreamingReference)
# ----------------------------------------------------------------------------------------------
def _r2_like(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """1 - num/den with scikit-learn's force_finite rule for den == 0."""
    out = np.ones_like(num, dtype=np.float64)
    ok = den != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        out[ok] = 1.0 - num[ok] / den[ok]
    out[~ok & (num != 0)] = 0.0
    return out


def _finalize(s: dict[str, np.ndarray], metrics: Iterable[str]) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Metrics from per-output float64 statistics.

    ``s`` holds arrays of shape (J,): ``n`` (values per output), ``sse`` = sum e^2, ``sae`` = sum |e|,
    ``max_ae``, ``min_t``, ``max_t``, and centred sums ``m2_t``, ``m2_p``, ``m2_e`` and ``c_tp``
    (co-moment of y_true and y_pred), with e = y_true - y_pred.
    """
    n = s["n"].astype(np.float64)
    per: dict[str, np.ndarray] = {}
    overall: dict[str, float] = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        mse = s["sse"] / n
        rmse = np.sqrt(mse)
        r2 = _r2_like(s["sse"], s["m2_t"])
        if n[0] < 2:  # scikit-learn: R^2 is not well defined with fewer than two samples
            r2 = np.full_like(r2, np.nan)
        rng = s["max_t"] - s["min_t"]
        denom = np.sqrt(s["m2_t"] * s["m2_p"])
        pearson = np.where(denom > 0, s["c_tp"] / np.where(denom > 0, denom, 1.0), np.nan)
        nrmse = np.where(rng > 0, rmse / np.where(rng > 0, rng, 1.0), np.nan)
        table = {
            "mse": mse,
            "rmse": rmse,
            "mae": s["sae"] / n,
            "r2": r2,
            "explained_variance": _r2_like(s["m2_e"], s["m2_t"]),
            "pearson_r": pearson,
            "nrmse": nrmse,
            "max_error": s["max_ae"].astype(np.float64),
        }
    for name in metrics:
        if name == "r2_variance_weighted":
            w = s["m2_t"]
            if n[0] < 2:
                v = math.nan
            elif np.any(w != 0):
                v = float(np.average(r2, weights=w))
            else:  # every output constant: scikit-learn falls back to uniform weights
                v = float(np.mean(r2))
            per[name] = r2.copy()
            overall[name] = v
        elif name in table:
            per[name] = table[name]
            overall[name] = float(np.max(table[name]) if name == "max_error" else np.mean(table[name]))
        else:
            raise ValueError(f"Unknown metric {name!r}; expected one of {METRICS}.")
    return overall, per


def _check_metrics(metrics: Iterable[str] | None) -> tuple[str, ...]:
    names = METRICS if metrics is None else tuple(metrics)
    bad = [m for m in names if m not in METRICS]
    if bad:
        raise ValueError(f"Unknown metric(s) {bad}; expected names from {METRICS}.")
    return names


# ----------------------------------------------------------------------------------------------
# NumPy in RAM: float64, two passes, blocked so temporaries stay small
# ----------------------------------------------------------------------------------------------
def _moments_two_pass(t: np.ndarray, p: np.ndarray, block_rows: int = _BLOCK_ROWS) -> dict[str, np.ndarray]:
    """Per-output float64 statistics of (M, J) arrays in two passes over row blocks.

    Each block is copied (and widened) into (J, B) float64 buffers so every sum runs along a
    contiguous axis (NumPy's pairwise summation); block sums are added with math.fsum (exact).
    """
    m, j = t.shape
    buf = np.empty((4, j, min(block_rows, m)))  # T, P, E and scratch, each (J, B), C-contiguous
    blocks = range(0, m, block_rows)

    def load(lo: int) -> tuple[np.ndarray, ...]:
        b = min(block_rows, m - lo)
        T, P, E, W = buf[:, :, :b]
        np.copyto(T, t[lo : lo + b].T)  # transpose + widen to float64 in one copy
        np.copyto(P, p[lo : lo + b].T)
        np.subtract(T, P, out=E)
        return T, P, E, W

    # pass 1: plain sums and extremes
    sums: dict[str, list[np.ndarray]] = {"t": [], "p": [], "e": [], "sse": [], "sae": []}
    max_ae = np.zeros(j)
    min_t = np.full(j, np.inf)
    max_t = np.full(j, -np.inf)
    for lo in blocks:
        T, P, E, W = load(lo)
        sums["t"].append(T.sum(axis=1))
        sums["p"].append(P.sum(axis=1))
        sums["e"].append(E.sum(axis=1))
        sums["sse"].append(np.multiply(E, E, out=W).sum(axis=1))
        np.abs(E, out=W)
        sums["sae"].append(W.sum(axis=1))
        np.maximum(max_ae, W.max(axis=1), out=max_ae)
        np.minimum(min_t, T.min(axis=1), out=min_t)
        np.maximum(max_t, T.max(axis=1), out=max_t)
    tot = {k: np.array([math.fsum(col) for col in np.array(v).T]) for k, v in sums.items()}
    mean_t, mean_p, mean_e = tot["t"] / m, tot["p"] / m, tot["e"] / m
    # pass 2: centred sums around the global means
    cen: dict[str, list[np.ndarray]] = {"m2_t": [], "m2_p": [], "m2_e": [], "c_tp": []}
    for lo in blocks:
        T, P, E, W = load(lo)
        T -= mean_t[:, None]
        P -= mean_p[:, None]
        E -= mean_e[:, None]
        cen["m2_t"].append(np.multiply(T, T, out=W).sum(axis=1))
        cen["m2_p"].append(np.multiply(P, P, out=W).sum(axis=1))
        cen["m2_e"].append(np.multiply(E, E, out=W).sum(axis=1))
        cen["c_tp"].append(np.multiply(T, P, out=W).sum(axis=1))
    out = {k: np.array([math.fsum(col) for col in np.array(v).T]) for k, v in cen.items()}
    out.update(
        n=np.full(j, m, dtype=np.int64),
        sse=tot["sse"],
        sae=tot["sae"],
        max_ae=max_ae,
        min_t=min_t,
        max_t=max_t,
    )
    return out


def numpy_metrics_per_output(
    y_true: Any, y_pred: Any, *, metrics: Iterable[str] | None = None
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Like :func:`numpy_metrics`, returning ``(overall, per_output)``; per_output[name] has shape (J,)."""
    names = _check_metrics(metrics)
    t, p = _as_2d(y_true, y_pred)
    return _finalize(_moments_two_pass(t, p), names)


def numpy_metrics(y_true: Any, y_pred: Any, *, metrics: Iterable[str] | None = None) -> dict[str, float]:
    """Float64 two-pass reference metrics over arrays in RAM (the "NumPy in RAM" baseline).

    ``y_true`` and ``y_pred``: NumPy float arrays or torch tensors of the same shape
    ``(rows, *trailing)``. Returns ``{name: overall value}`` for ``metrics`` (default: all of
    :data:`METRICS`). Memory: the inputs plus 4 * J * 8,192 float64 of scratch.
    """
    return numpy_metrics_per_output(y_true, y_pred, metrics=metrics)[0]


# ----------------------------------------------------------------------------------------------
# the seed's recorders
# ----------------------------------------------------------------------------------------------
class _ListRecorder:
    """Shared state of the list-based baselines: validation and the lists of batch copies."""

    def __init__(self, *, metrics: Iterable[str] | None = None) -> None:
        self.metrics = _check_metrics(metrics)
        self.epoch = 0
        self._trues: list[np.ndarray] = []
        self._preds: list[np.ndarray] = []
        self._trailing: tuple[int, ...] | None = None
        self.rows = 0
        self.batches = 0

    def _checked(self, y_true: Any, y_pred: Any, *, copy: bool) -> tuple[np.ndarray, np.ndarray]:
        """Both inputs as NumPy arrays (the seed's ``.detach().cpu().numpy()``), shapes validated.

        ``copy=True``: independent copies, as a recorder that keeps batches needs (a CPU tensor's
        ``.numpy()`` is a view, and training loops may reuse output buffers).
        """
        t = to_numpy(y_true, "y_true", copy=copy)
        p = to_numpy(y_pred, "y_pred", copy=copy)
        if t.shape != p.shape:
            raise ValueError(f"Expected `y_pred` to have shape {t.shape} (as `y_true`), but got {p.shape}.")
        if t.ndim == 0:
            raise ValueError("Expected `y_true` to have a batch dimension, but got a scalar.")
        if self._trailing is None:
            self._trailing = t.shape[1:]
        elif t.shape[1:] != self._trailing:
            raise ValueError(
                f"Expected trailing shape {self._trailing} for this epoch, but got {t.shape[1:]} "
                f"(batch {self.batches}); call reset() to start an epoch with a new shape."
            )
        return t, p

    def _compute_on(self, n_batches: int) -> dict[str, float]:
        if n_batches == 0:
            raise ValueError("No batches recorded in this epoch; call update() before compute().")
        y_true = np.concatenate(self._trues[:n_batches])
        y_pred = np.concatenate(self._preds[:n_batches])
        return numpy_metrics(y_true, y_pred, metrics=self.metrics)

    @property
    def held_bytes(self) -> int:
        """Bytes of batch copies held in the lists."""
        return sum(a.nbytes for a in self._trues) + sum(a.nbytes for a in self._preds)

    def reset(self) -> None:
        """Start the next epoch: drop every kept batch."""
        self._trues.clear()
        self._preds.clear()
        self._trailing = None
        self.rows = 0
        self.batches = 0
        self.epoch += 1

    def close(self) -> None:
        self._trues.clear()
        self._preds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ConcatRecorder(_ListRecorder):
    """The seed's naive pattern: every batch copied into lists, ``np.concatenate`` at epoch end.

    Exact, but memory is O(epoch): the lists hold every value, and ``compute()`` needs as much
    again for the concatenated arrays (about 4x the bytes of one array in total).
    """

    def update(self, y_true: Any, y_pred: Any) -> None:
        t, p = self._checked(y_true, y_pred, copy=True)
        self._trues.append(t)
        self._preds.append(p)
        self.rows += t.shape[0]
        self.batches += 1

    def compute(self) -> dict[str, float]:
        """Metrics over every recorded row (float64 two-pass)."""
        return self._compute_on(len(self._trues))


class SampledRecorder(_ListRecorder):
    """The seed's "fix": metrics over the first ``max_batches`` batches of the epoch only.

    ``keep_all=True`` reproduces the seed: every batch is still appended to the lists (memory grows
    with the epoch) although only the first ``max_batches`` are used. ``keep_all=False`` is the
    bounded variant: batches after ``max_batches`` are not kept. On ordered data (by subject,
    session, time) the first batches are not a sample of the epoch: the result is biased.
    """

    def __init__(self, max_batches: int = 1000, keep_all: bool = True, *, metrics: Iterable[str] | None = None) -> None:
        if isinstance(max_batches, bool) or not isinstance(max_batches, (int, np.integer)):
            raise TypeError(f"Expected `max_batches` to be an int, but got {type(max_batches).__name__}.")
        if max_batches < 1:
            raise ValueError(f"Expected `max_batches` >= 1, but got {max_batches}.")
        super().__init__(metrics=metrics)
        self.max_batches = int(max_batches)
        self.keep_all = bool(keep_all)

    def update(self, y_true: Any, y_pred: Any) -> None:
        keep = self.keep_all or self.batches < self.max_batches
        t, p = self._checked(y_true, y_pred, copy=keep)
        if keep:
            self._trues.append(t)
            self._preds.append(p)
        self.rows += t.shape[0]
        self.batches += 1

    def compute(self) -> dict[str, float]:
        """Metrics over the first ``max_batches`` batches (not the epoch)."""
        return self._compute_on(min(self.max_batches, len(self._trues)))


# ----------------------------------------------------------------------------------------------
# streaming float64 reference: exact up to rounding, O(log n_batches) memory
# ----------------------------------------------------------------------------------------------
_SUMMED = ("sse", "sae")


def _batch_moments(t: np.ndarray, p: np.ndarray, scratch: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Two-pass float64 statistics of one (m, J) batch, sums along contiguous axes (pairwise).

    ``scratch``: optional float64 buffer of shape (4, J, m) reused between batches (fresh
    multi-MB temporaries per batch cost more in page faults than the arithmetic).
    """
    m, j = t.shape
    if scratch is None or scratch.shape != (4, j, m):
        scratch = np.empty((4, j, m))
    T, P, E, W = scratch  # (J, m) each, C-contiguous: each output's values are contiguous
    np.copyto(T, t.T)
    np.copyto(P, p.T)
    np.subtract(T, P, out=E)
    np.abs(E, out=W)
    s = {
        "n": np.full(j, m, dtype=np.int64),
        "max_ae": W.max(axis=1),
        "sae": W.sum(axis=1),
        "sse": np.multiply(E, E, out=W).sum(axis=1),
        "min_t": T.min(axis=1),
        "max_t": T.max(axis=1),
        "mean_t": T.sum(axis=1) / m,
        "mean_p": P.sum(axis=1) / m,
        "mean_e": E.sum(axis=1) / m,
    }
    T -= s["mean_t"][:, None]
    P -= s["mean_p"][:, None]
    E -= s["mean_e"][:, None]
    s["m2_t"] = np.multiply(T, T, out=W).sum(axis=1)
    s["m2_p"] = np.multiply(P, P, out=W).sum(axis=1)
    s["m2_e"] = np.multiply(E, E, out=W).sum(axis=1)
    s["c_tp"] = np.multiply(T, P, out=W).sum(axis=1)
    return s


def _merge(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Chan et al.'s pairwise update of (n, mean, M2, co-moment); plain sums add."""
    na, nb = a["n"].astype(np.float64), b["n"].astype(np.float64)
    n = na + nb
    f = na * nb / n
    d_t = b["mean_t"] - a["mean_t"]
    d_p = b["mean_p"] - a["mean_p"]
    d_e = b["mean_e"] - a["mean_e"]
    return {
        "n": a["n"] + b["n"],
        "sse": a["sse"] + b["sse"],
        "sae": a["sae"] + b["sae"],
        "max_ae": np.maximum(a["max_ae"], b["max_ae"]),
        "min_t": np.minimum(a["min_t"], b["min_t"]),
        "max_t": np.maximum(a["max_t"], b["max_t"]),
        "mean_t": a["mean_t"] + d_t * (nb / n),
        "mean_p": a["mean_p"] + d_p * (nb / n),
        "mean_e": a["mean_e"] + d_e * (nb / n),
        "m2_t": a["m2_t"] + b["m2_t"] + d_t * d_t * f,
        "m2_p": a["m2_p"] + b["m2_p"] + d_p * d_p * f,
        "m2_e": a["m2_e"] + b["m2_e"] + d_e * d_e * f,
        "c_tp": a["c_tp"] + b["c_tp"] + d_t * d_p * f,
    }


class StreamingReference:
    """Exact metrics by streaming float64 accumulation, batch by batch, in O(log batches) memory.

    Each batch is reduced in float64 with two passes; batch partials merge with Chan's formulas in a
    pairwise tree (a binary counter of partials: the partial of 2^k batches merges with its equal),
    so rounding error grows like log(batches) rather than batches. Independent of the oocmetrics
    kernels: the benchmarks use it to verify :class:`oocmetrics.Recorder`.
    """

    def __init__(self, *, metrics: Iterable[str] | None = None) -> None:
        self.metrics = _check_metrics(metrics)
        self.epoch = 0
        self.reset_state()

    def reset_state(self) -> None:
        self._stack: list[tuple[int, dict[str, np.ndarray]]] = []  # (level, partial), levels decreasing
        self._scratch: np.ndarray | None = None
        self._trailing: tuple[int, ...] | None = None
        self.rows = 0
        self.batches = 0

    def update(self, y_true: Any, y_pred: Any) -> None:
        y_true, y_pred = to_numpy(y_true, "y_true"), to_numpy(y_pred, "y_pred")
        t, p = _as_2d(y_true, y_pred)
        trailing = tuple(y_true.shape[1:])
        if self._trailing is None:
            self._trailing = trailing
        elif trailing != self._trailing:
            raise ValueError(f"Expected trailing shape {self._trailing} for this epoch, but got {trailing}.")
        if self._scratch is None or self._scratch.shape[1:] != (t.shape[1], t.shape[0]):
            self._scratch = np.empty((4, t.shape[1], t.shape[0]))
        part, level = _batch_moments(t, p, self._scratch), 0
        while self._stack and self._stack[-1][0] == level:
            _, prev = self._stack.pop()
            part, level = _merge(prev, part), level + 1
        self._stack.append((level, part))
        self.rows += int(y_true.shape[0])
        self.batches += 1

    def partials(self) -> dict[str, np.ndarray]:
        """The merged per-output statistics of the epoch so far."""
        if not self._stack:
            raise ValueError("No batches recorded in this epoch; call update() before compute().")
        acc = self._stack[-1][1]
        for _, part in reversed(self._stack[:-1]):  # older (bigger) partials on the left
            acc = _merge(part, acc)
        return acc

    def compute_per_output(self) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        return _finalize(self.partials(), self.metrics)

    def compute(self) -> dict[str, float]:
        return self.compute_per_output()[0]

    def reset(self) -> None:
        self.reset_state()
        self.epoch += 1
