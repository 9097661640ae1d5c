"""What a run leaves for people: a metrics table per epoch, the history (JSON + CSV), a PNG plot.

The plot needs matplotlib (the ``trainer`` extra); without it the trainer warns once at start-up
(:func:`can_plot`) and writes everything but ``history.png``.

History rows are ``EpochResult.row()`` dicts: one per epoch and split (train, val, and test after
the last epoch) with the loss, every overall metric, rows, seconds and peak RSS. Files are written
to a temporary name and renamed, so a run killed mid-write leaves the previous version intact.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any

__all__ = ["NO_MATPLOTLIB", "can_plot", "format_table", "write_history", "plot_history", "write_json"]

_LEADING = ("epoch", "split", "loss")
_TRAILING = ("n_rows", "n_batches", "seconds", "compute_seconds", "peak_rss_mb", "peak_anon_mb")


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    """JSON with NaN written as null (strict JSON readers reject NaN)."""
    _atomic_write(path, json.dumps(_nan_to_none(obj), indent=1).encode())


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    middle: list[str] = []
    for r in rows:
        middle += [k for k in r if k not in _LEADING + _TRAILING and k not in middle]
    present = {k for r in rows for k in r}
    return [c for c in _LEADING if c in present] + middle + [c for c in _TRAILING if c in present]


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table: one line per split, a column per metric, plus seconds and peak RSS."""
    cols = [c for c in _columns(rows) if c not in ("epoch", "n_batches", "compute_seconds", "peak_anon_mb")]
    width = {c: max(10, len(c)) for c in cols}
    width["split"] = 5
    lines = ["  ".join(f"{c:>{width[c]}}" for c in cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            if isinstance(v, float):
                v = f"{v:.1f}" if c in ("seconds", "peak_rss_mb") else f"{v:.6g}"
            cells.append(f"{v!s:>{width[c]}}")
        lines.append("  ".join(cells))
    return "\n".join(lines)


def write_history(out: Path, rows: list[dict[str, Any]]) -> tuple[Path, Path]:
    """``<out>/history.json`` (a list of rows) and ``<out>/history.csv`` (same rows, one per line)."""
    json_path, csv_path = out / "history.json", out / "history.csv"
    write_json(json_path, rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_columns(rows), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _atomic_write(csv_path, buf.getvalue().encode())
    return json_path, csv_path


NO_MATPLOTLIB = "matplotlib is not installed: history.png will not be written; pip install matplotlib"


def can_plot() -> bool:
    """Whether matplotlib imports, so :func:`plot_history` can run. Ask at start-up, not after an epoch."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


_PANELS = ("loss", "rmse", "mae", "r2", "pearson_r", "max_error")


def plot_history(path: Path, rows: list[dict[str, Any]], title: str = "",
                 per_step: dict[str, Any] | None = None) -> Path:
    """Loss and metric curves per split (test as a single marker after the last epoch), the exact
    |error| quantiles of val per epoch, and val's per-step RMSE of the last epoch (``per_step``:
    ``{epoch: {"rmse": [...], "mae": [...]}}``); needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = [p for p in _PANELS if any(p in r for r in rows)]
    quantile_cols = sorted({k for r in rows for k in r if k.startswith("abs_err_p")})
    if quantile_cols:
        panels.append("val |error| quantiles")
    if per_step:
        panels.append("val error per step")
    epochs = [r["epoch"] for r in rows] or [0]
    ncols = 3
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    styles = {"train": dict(color="tab:blue", marker="o"), "val": dict(color="tab:orange", marker="s"),
              "test": dict(color="tab:green", marker="*", markersize=12, linestyle="none")}
    for ax, name in zip(axes.flat, panels):
        if name == "val |error| quantiles":
            for col in quantile_cols:
                pts = [(r["epoch"], r[col]) for r in rows if r["split"] == "val" and r.get(col) is not None]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, marker="s", label=f"q{col[len('abs_err_p'):]}")
            ax.set_title(name + " (exact)")
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
            continue
        if name == "val error per step":
            last = max(per_step, key=int)  # type: ignore[arg-type]
            for key, style in (("rmse", "-"), ("mae", "--")):
                ax.plot(per_step[last][key], style, label=key)  # type: ignore[index]
            ax.set_title(f"val error per step (epoch {last})")
            ax.set_xlabel("step in window")
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
            continue
        for split, style in styles.items():
            pts = [(r["epoch"], r[name]) for r in rows if r["split"] == split and r.get(name) is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, label=split, **style)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.set_xlim(min(epochs) - 0.4, max(epochs) + 0.4)
        if max(epochs) - min(epochs) <= 10:
            ax.set_xticks(range(min(epochs), max(epochs) + 1))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    axes.flat[0].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
