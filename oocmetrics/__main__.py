"""``python -m oocmetrics``: inspect a store and compute metrics after the fact, from what was stored.

    python -m oocmetrics inspect runs/exp1
    python -m oocmetrics compute runs/exp1 --split val [--epoch 3] [--metrics mse r2] [--json out.json]

``compute`` reads only the durable rows (``rows`` in the epoch's attributes), so it also works on an
epoch whose run crashed or whose disk filled up.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from oocmetrics.compute import compute_store_arrays
from oocmetrics.metrics import ALL_METRICS, EpochMetrics
from oocmetrics.store import StoreError, list_epochs, open_epoch_arrays, open_root


def compute_stored(
    path: str | Path, split: str, epoch: int | None = None, *, metrics: Sequence[str] | None = None,
    progress: bool = False,
) -> EpochMetrics:
    """Exact metrics of a stored epoch (default: the last one) of ``split`` in the store at ``path``."""
    root = open_root(path, create=False)
    if split not in root.group_keys():
        raise StoreError(f"No split {split!r} in {path}; stored splits: {sorted(root.group_keys())}.")
    group = root[split]
    epochs = list_epochs(group)
    if not epochs:
        raise StoreError(f"Split {split!r} in {path} holds no epochs.")
    epoch = epochs[-1] if epoch is None else epoch
    y_true, y_pred, info = open_epoch_arrays(group, epoch)
    if info.rows == 0:
        raise ValueError(f"Epoch {epoch} of split {split!r} in {path} has no durable rows.")
    result = compute_store_arrays(
        y_true, y_pred, info.rows, np.asarray(info.shift), metrics=metrics, progress=progress, epoch=epoch, split=split,
    )
    result.extra.update({"batches": info.batches, "complete": info.complete})
    return result


def _inspect(path: str) -> int:
    root = open_root(path, create=False)
    print(f"{path}: oocmetrics store")
    for split in sorted(root.group_keys()):
        group = root[split]
        for epoch in list_epochs(group):
            _, y_pred, info = open_epoch_arrays(group, epoch)
            state = "complete" if info.complete else "INCOMPLETE (run stopped early; rows shown are durable)"
            size_mb = info.rows * int(np.prod(info.trailing_shape or (1,))) * 2 * y_pred.dtype.itemsize / 2**20
            print(
                f"  {split}/epoch={epoch}: {info.rows} rows x {tuple(info.trailing_shape)} {y_pred.dtype}, "
                f"{info.batches} batches, {size_mb:.1f} MiB, {state}, run {info.run_id}, {info.updated}"
            )
    return 0


def _compute(args: argparse.Namespace) -> int:
    result = compute_stored(args.path, args.split, args.epoch, metrics=args.metrics, progress=args.progress)
    width = max(len(k) for k in result.overall)
    print(f"{args.path} {result.split} epoch {result.epoch}: {result.n_rows} rows, "
          f"{result.n_values} values per output set, {result.n_skipped} skipped")
    for name, value in result.overall.items():
        print(f"  {name:<{width}}  {value:.8g}")
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2))
        print(f"wrote {args.json}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m oocmetrics", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_inspect = sub.add_parser("inspect", help="list the splits and epochs of a store")
    p_inspect.add_argument("path", help="store directory (the Recorder's path)")
    p_compute = sub.add_parser("compute", help="exact metrics of a stored epoch")
    p_compute.add_argument("path", help="store directory (the Recorder's path)")
    p_compute.add_argument("--split", default="train", help="split name (default: train)")
    p_compute.add_argument("--epoch", type=int, default=None, help="epoch index (default: the last)")
    p_compute.add_argument("--metrics", nargs="+", choices=ALL_METRICS, default=None,
                           help="metrics (default: the one-pass suite; median_absolute_error on request)")
    p_compute.add_argument("--json", default=None, help="also write the result to this JSON file")
    p_compute.add_argument("--progress", action="store_true", help="show a progress bar")
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            return _inspect(args.path)
        return _compute(args)
    except (StoreError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
