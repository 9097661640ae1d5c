"""``python -m oocmetrics report STORE``: PNG plots and a Markdown summary of one stored epoch.

    python -m oocmetrics report runs/exp1 --split val [--epoch 3] [--out DIR]

writes to ``DIR`` (default ``<STORE>-report/<split>-epoch=<k>/``, beside the store: a directory inside
a zarr store that is not zarr makes every zarr listing of it warn):

- ``per_output.png``: each output's metrics as bars, with the block-bootstrap interval of
  :mod:`oocmetrics.intervals` as error bars when that module is available;
- ``abs_error.png``: the log-spaced histogram of |y_true - y_pred| with the exact quantiles marked;
- ``per_step.png`` (data of shape (rows, steps, outputs)): RMSE and MAE per step, pooled over the
  outputs, and the RMSE per step of the best, median and worst output;
- ``per_group.png`` (epochs that store a ``groups`` array): each group's RMSE;
- ``report.md`` (every number above, embedding the PNGs) and ``report.json`` (the same, strict JSON).

Passes over the data: the exact quantiles take 2-3 (radix select), the breakdowns one more
(:func:`oocmetrics.breakdown.analyze`); the metrics come from the partials stored with each chunk.
matplotlib is imported only here, and used through :class:`matplotlib.figure.Figure` (no pyplot, no
global backend switch), so importing oocmetrics never needs it.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from oocmetrics.breakdown import analyze, to_json
from oocmetrics.compute import DEFAULT_QUANTILES
from oocmetrics.errors import StoreError
from oocmetrics.metrics import EpochMetrics, order_statistics_needed, resolve_metrics
from oocmetrics.stored import compute_stored

__all__ = ["write_report", "default_out_dir", "NO_MATPLOTLIB"]

NO_MATPLOTLIB = "The report draws its plots with matplotlib, which is not installed: pip install matplotlib"
_BARS = ("rmse", "mae", "r2", "pearson_r", "nrmse", "max_error")  # per-output panels, when computed
_TABLE_GROUPS = 50  # groups listed in report.md and drawn in per_group.png (all of them in report.json)


def _figure_class() -> Any:
    """matplotlib's Figure (rendered by its Agg canvas on save); ImportError naming the fix if missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(NO_MATPLOTLIB) from exc
    return Figure


def default_out_dir(path: str | Path, split: str, epoch: int) -> Path:
    """``<STORE>-report/<split>-epoch=<k>``: beside the store, never inside the zarr hierarchy."""
    root = Path(path).resolve()
    return root.parent / f"{root.name}-report" / f"{split}-epoch={epoch}"


def _save(fig: Any, path: Path) -> Path:
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    return path


def _floats(values: Any) -> np.ndarray:
    """A list from strict JSON (None for NaN, "inf" strings) as a float64 array."""
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


def _interval_bars(intervals: dict[str, Any] | None, key: str, J: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(low, high) per output of metric ``key`` from :mod:`oocmetrics.intervals`' dict, or None."""
    entry = ((intervals or {}).get("per_output") or {}).get(key)
    if not isinstance(entry, (list, tuple)) or len(entry) != 2:
        return None
    low, high = _floats(entry[0]), _floats(entry[1])
    return (low, high) if low.shape == high.shape == (J,) else None


def _intervals(result: EpochMetrics, path: str | Path, split: str, names: tuple[str, ...]) -> tuple[Any, str]:
    """The result's intervals, else :func:`oocmetrics.intervals.stored_intervals` when that module
    exists; with a note for report.md saying where they came from, or why there are none."""
    have = getattr(result, "intervals", None)
    if have is not None:
        return have, "as computed with the metrics"
    try:
        from oocmetrics.intervals import stored_intervals
    except ImportError:
        return None, "no intervals: oocmetrics.intervals is not available in this installation"
    try:
        return stored_intervals(path, split, result.epoch, metrics=names), ""
    except (ValueError, StoreError) as exc:  # e.g. an epoch of one row: no bootstrap
        return None, f"no intervals: {exc}"


def _per_output_png(Figure: Any, out: Path, result: EpochMetrics, intervals: Any) -> Path:
    keys = [k for k in _BARS if k in result.per_output] or list(result.per_output)[:6]
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    J = len(next(iter(result.per_output.values())))
    fig = Figure(figsize=(min(18.0, max(4.5, 0.16 * J + 1.5) * cols), 3.0 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).reshape(-1)
    x = np.arange(J)
    for ax, key in zip(axes, keys):
        values = np.asarray(result.per_output[key], dtype=np.float64)
        bars = _interval_bars(intervals, key, J)
        yerr = None
        if bars is not None:
            low, high = bars
            yerr = np.nan_to_num(np.stack([values - low, high - values]), nan=0.0).clip(min=0.0)
        ax.bar(x, np.nan_to_num(values, nan=0.0), yerr=yerr, capsize=2 if yerr is not None else 0,
               color="tab:blue", ecolor="black", error_kw={"linewidth": 0.8})
        ax.set_title(key + (" (95% interval)" if bars is not None else ""))
        ax.set_xlabel("output")
        ax.set_xticks(x if J <= 30 else x[:: -(-J // 30)])
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    fig.suptitle(f"{result.split} epoch {result.epoch}: metrics per output ({result.n_rows} rows)")
    return _save(fig, out / "per_output.png")


def _histogram_png(Figure: Any, out: Path, hist: dict[str, Any], quantiles: dict[str, Any] | None) -> Path:
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    edges, counts = np.asarray(hist["edges"]), np.asarray(hist["counts"])
    if counts.size:
        # the bins split each octave linearly, so their log widths differ (by up to 1.125 / 1.0667):
        # draw counts per decade of |e|, a density on the log axis, not raw counts per bin
        edges = np.minimum(edges, np.finfo(np.float64).max)
        ax.stairs(counts / np.log10(edges[1:] / edges[:-1]), edges, fill=True, color="tab:blue", alpha=0.6)
        ax.set_xscale("log")
    else:
        ax.text(0.5, 0.5, "no |e| > 0 to draw on a log axis", ha="center", va="center", transform=ax.transAxes)
    if quantiles is not None and counts.size:
        colors = ("tab:green", "tab:orange", "tab:red", "tab:purple", "tab:brown", "tab:pink")
        for i, (q, v) in enumerate(zip(quantiles["q"], np.asarray(quantiles["pooled"], dtype=np.float64))):
            if np.isfinite(v) and v > 0:
                ax.axvline(v, color=colors[i % len(colors)], linestyle="--", linewidth=1.2, label=f"q{q:g} = {v:.4g}")
        ax.legend(title="exact quantiles", fontsize=8)
    extra = [f"{hist['zero']} pairs with |e| = 0 (not drawn)"] if hist["zero"] else []
    extra += [f"{hist['inf']} with |e| = inf"] if hist["inf"] else []
    ax.set_title(f"|y_true - y_pred| over {hist['n']} finite pairs, {hist['bins_per_octave']} bins per octave"
                 + ("\n" + "; ".join(extra) if extra else ""))
    ax.set_xlabel("|y_true - y_pred|")
    ax.set_ylabel("pairs per decade of |e|")
    ax.grid(alpha=0.3)
    return _save(fig, out / "abs_error.png")


def _chosen_outputs(result: EpochMetrics, J: int) -> list[tuple[str, int]]:
    """(label, output) of the best, median and worst output by overall RMSE (or MAE)."""
    key = "rmse" if "rmse" in result.per_output else ("mae" if "mae" in result.per_output else None)
    if key is None or J == 1:
        return [("output 0", 0)]
    v = np.asarray(result.per_output[key], dtype=np.float64)
    order = np.argsort(np.where(np.isnan(v), np.inf, v), kind="stable")
    picks = [("best", int(order[0])), ("median", int(order[len(order) // 2])), ("worst", int(order[-1]))]
    seen: set[int] = set()
    return [(f"{label} ({key}): output {j}", j) for label, j in picks if not (j in seen or seen.add(j))]


def _per_step_png(Figure: Any, out: Path, br: dict[str, Any], result: EpochMetrics) -> Path:
    pooled = br["per_step_pooled"]
    steps = np.arange(br["steps"])
    fig = Figure(figsize=(12, 4), layout="constrained")
    left, right = fig.subplots(1, 2)
    left.plot(steps, pooled["rmse"], label="RMSE", color="tab:blue")
    left.plot(steps, pooled["mae"], label="MAE", color="tab:orange")
    left.set_title(f"pooled over the {br['outputs']} outputs")
    key = "rmse" if "rmse" in br["per_step"] else next(iter(br["per_step"]))
    for label, j in _chosen_outputs(result, br["outputs"]):
        right.plot(steps, br["per_step"][key][:, j], label=label, linewidth=1)
    right.plot(steps, pooled["rmse"] if key == "rmse" else br["per_step_overall"][key], color="black",
               linestyle="--", linewidth=1, label="pooled" if key == "rmse" else "mean over outputs")
    right.set_title(f"{key.upper()} per step of single outputs")
    for ax in (left, right):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{br['split']} epoch {br['epoch']}: error per time step ({br['n_rows']} rows)")
    return _save(fig, out / "per_step.png")


def _per_group_png(Figure: Any, out: Path, groups: dict[str, Any]) -> Path:
    key = "rmse" if "rmse" in groups["overall"] else next(iter(groups["overall"]))
    ids = groups["groups"][:_TABLE_GROUPS]
    values = np.asarray(groups["overall"][key][:_TABLE_GROUPS], dtype=np.float64)
    fig = Figure(figsize=(max(6, 0.3 * ids.size + 2), 4), layout="constrained")
    ax = fig.subplots()
    x = np.arange(ids.size)
    ax.bar(x, np.nan_to_num(values, nan=0.0), color="tab:blue")
    ax.set_xticks(x, [str(g) for g in ids], rotation=90 if ids.size > 20 else 0, fontsize=8)
    ax.set_xlabel("group")
    ax.set_title(f"{key} per group" + (f" (first {_TABLE_GROUPS} of {groups['groups'].size})"
                                       if groups["groups"].size > _TABLE_GROUPS else ""))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out / "per_group.png")


def _cell(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    v = float(v)
    return "NaN" if v != v else f"{v:.6g}"


def _table(header: list[str], rows: Iterable[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c if isinstance(c, str) else _cell(c) for c in r) + " |" for r in rows]
    return lines + [""]


def _markdown(
    path: str | Path, result: EpochMetrics, br: dict[str, Any], intervals: Any, note: str, pngs: dict[str, Path],
) -> str:
    J = len(next(iter(result.per_output.values())))
    shape = tuple(br["shape"][1:])
    state = "complete" if result.extra.get("complete", br["complete"]) else "INCOMPLETE (durable rows only)"
    md = [
        f"# oocmetrics report: {path}, split `{result.split}`, epoch {result.epoch}", "",
        f"{result.n_rows} rows of shape {shape}, {result.n_values} values, {result.n_skipped} skipped "
        f"(non-finite); epoch {state}. Every number is exact (float64 partials merged in a fixed tree).", "",
    ]
    if result.extra.get("duplicate_rows"):
        md += [f"{result.extra['duplicate_rows']} rows repeat a sample id recorded earlier and are left out of "
               f"every number (the first copy counts); copies with other targets: "
               f"{result.extra.get('conflicting_targets', 0)}, other predictions: "
               f"{result.extra.get('conflicting_predictions', 0)}.", ""]
    md += [
        "## Metrics", "",
    ]
    iv_over = (intervals or {}).get("overall") or {}
    header = ["metric", "overall"] + ([f"{100 * intervals['level']:g}% interval"] if iv_over else [])
    md += _table(header, [
        [name, value] + ([("[" + ", ".join(_cell(x) for x in _floats(iv_over[name])) + "]") if name in iv_over
                          else "–"] if iv_over else [])
        for name, value in result.overall.items()
    ])
    if intervals is not None:
        md += [f"Intervals: {intervals.get('method', '')}{'; ' + note if note else ''}.", ""]
        md += [f"- {n}" for n in intervals.get("notes", [])] + [
            f"- {k}: no interval ({why})" for k, why in (intervals.get("excluded") or {}).items()]
        md += [""]
    elif note:
        md += [f"_{note}._", ""]
    md += ["### Per output", ""]
    keys = list(result.per_output)
    md += _table(["output"] + keys, [[str(j)] + [result.per_output[k][j] for k in keys] for j in range(J)])
    md += [f"![metrics per output]({pngs['per_output'].name})", ""]

    md += ["## |y_true - y_pred|", ""]
    q = result.quantiles
    if q is not None:
        md += ["Exact quantiles (NumPy's linear rule), pooled over every output's finite pairs:", ""]
        md += _table(["q", "pooled \\|e\\|"] + [f"output {j}" for j in range(min(J, 8))] + (["…"] if J > 8 else []), [
            [f"{qq:g}", q["pooled"][i]] + list(np.asarray(q["per_output"])[i, :8]) + (["…"] if J > 8 else [])
            for i, qq in enumerate(q["q"])
        ])
    hist = br["abs_error_histogram"]
    md += [f"Histogram: {hist['n']} finite pairs, {hist['bins_per_octave']} log-spaced bins per octave; "
           f"{hist['zero']} with |e| = 0, {hist['inf']} with |e| = inf.", "",
           f"![histogram of abs error]({pngs['abs_error'].name})", ""]

    md += ["## Per time step", ""]
    if "per_step" in br:
        pooled = br["per_step_pooled"]
        ok = np.flatnonzero(~np.isnan(pooled["rmse"]))
        if ok.size:
            lo, hi = ok[np.argmin(pooled["rmse"][ok])], ok[np.argmax(pooled["rmse"][ok])]
            md += [f"{br['steps']} steps x {br['outputs']} outputs. Pooled RMSE is lowest at step {lo} "
                   f"({pooled['rmse'][lo]:.6g}) and highest at step {hi} ({pooled['rmse'][hi]:.6g}); pooled MAE "
                   f"ranges {np.nanmin(pooled['mae']):.6g} to {np.nanmax(pooled['mae']):.6g}. Every metric per "
                   f"(step, output) is in report.json (`breakdown.per_step`).", ""]
        md += [f"![error per step]({pngs['per_step'].name})", ""]
    else:
        md += [f"No step axis: the data are {shape} per row (a per-step breakdown needs (steps, outputs)).", ""]

    md += ["## Per group", ""]
    groups = br.get("per_group")
    if groups is None:
        md += ["No groups recorded in this epoch (no `groups` array beside y_true).", ""]
    else:
        G = groups["groups"].size
        names = [n for n in ("rmse", "mae", "r2", "pearson_r") if n in groups["overall"]] or list(groups["overall"])[:4]
        md += [f"{G} groups" + (f"; the first {_TABLE_GROUPS} by id below, all of them in report.json" if G > _TABLE_GROUPS
                                else "") + ". Values are over each group's rows alone (uniform mean over outputs).", ""]
        md += _table(["group", "rows"] + names, [
            [str(int(groups["groups"][i])), groups["rows"][i]] + [groups["overall"][n][i] for n in names]
            for i in range(min(G, _TABLE_GROUPS))
        ])
        md += [f"![metrics per group]({pngs['per_group'].name})", ""]
    return "\n".join(md)


def write_report(
    path: str | Path, split: str = "train", epoch: int | None = None, *, out: str | Path | None = None,
    metrics: Iterable[str] | None = None, quantiles: Iterable[float] = DEFAULT_QUANTILES,
    scheduler: Any = None, progress: bool = False,
) -> Path:
    """Write the report of a stored epoch (default: the last) to ``out`` (default:
    :func:`default_out_dir`) and return the path of its ``report.md``.

    ``metrics``: the metrics shown (default: the one-pass suite); order statistics such as
    ``median_absolute_error`` appear in the tables but not per step or per group. ImportError (naming
    ``pip install matplotlib``) when matplotlib is missing; StoreError / ValueError for a missing or
    unreadable store, split or epoch.
    """
    Figure = _figure_class()
    names = resolve_metrics(metrics)
    decomposable = tuple(m for m in names if m not in order_statistics_needed(names))
    if not decomposable:
        raise ValueError(f"metrics={list(names)} holds no decomposable metric; add one, e.g. 'rmse'.")
    result = compute_stored(path, split, epoch, metrics=names, quantiles=tuple(quantiles),
                            scheduler=scheduler, progress=progress)
    br = analyze(path, split, result.epoch, metrics=decomposable, scheduler=scheduler, progress=progress)
    intervals, note = _intervals(result, path, split, decomposable)
    target = Path(out) if out is not None else default_out_dir(path, split, result.epoch)
    target.mkdir(parents=True, exist_ok=True)
    pngs = {"per_output": _per_output_png(Figure, target, result, intervals),
            "abs_error": _histogram_png(Figure, target, br["abs_error_histogram"], result.quantiles)}
    if "per_step" in br:
        pngs["per_step"] = _per_step_png(Figure, target, br, result)
    if br.get("per_group") is not None:
        pngs["per_group"] = _per_group_png(Figure, target, br["per_group"])
    md = target / "report.md"
    body = {"store": str(path), "metrics": result.to_dict(), "breakdown": to_json(br),
            "intervals": to_json(intervals) if intervals is not None else None,
            "pngs": sorted(p.name for p in pngs.values())}
    (target / "report.json").write_text(json.dumps(body, allow_nan=False))
    tmp = md.with_name(md.name + ".tmp")
    tmp.write_text(_markdown(path, result, br, intervals, note, pngs))
    os.replace(tmp, md)
    return md


def cli_report(args: Any) -> int:
    """``python -m oocmetrics report STORE [--split S] [--epoch K] [--out DIR]``."""
    try:
        _figure_class()
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    md = write_report(args.path, args.split, args.epoch, out=args.out, progress=args.progress)
    pngs = sorted(p.name for p in md.parent.glob("*.png"))
    print(f"wrote {md} ({', '.join(pngs)})")
    return 0
