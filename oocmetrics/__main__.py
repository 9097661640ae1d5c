"""``python -m oocmetrics``: inspect a store and compute metrics after the fact, from what was stored.

    python -m oocmetrics inspect runs/exp1
    python -m oocmetrics compute runs/exp1 --split val [--epoch 3] [--metrics mse r2] [--json out.json]
    python -m oocmetrics compute runs/exp1 --split val --quantiles 0.5 0.9 0.99   # exact quantiles of |e|
    python -m oocmetrics verify runs/exp1 --split val [--epoch 3]
    python -m oocmetrics compute runs/exp1 --split val --by step [--json steps.json]   # per time step
    python -m oocmetrics compute runs/exp1 --split val --by group                      # per group
    python -m oocmetrics report runs/exp1 --split val [--epoch 3] [--out DIR]          # PNGs + report.md

``compute`` merges the partials stored with each chunk (``--source data`` recomputes from the data);
``verify`` does both and checks that they agree bit for bit (exit 1 if not).

Both read only durable rows (``rows`` in an epoch's attributes) and take no lock, so they work while a
run is writing, after it crashed, or after its disk filled up. Exit code 2: no such store, split or
epoch, or a damaged one (the message names the file).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from oocmetrics.errors import StoreError
from oocmetrics.metrics import ALL_METRICS
from oocmetrics.store import open_epoch_arrays, open_root, scan_split
from oocmetrics.stored import compute_stored, splits

__all__ = ["main"]


def _inspect(path: str) -> int:
    root = open_root(path, create=False)
    print(f"{path}: oocmetrics store")
    for split in splits(root):
        stored, bad = scan_split(root / split)
        if not stored and not bad:
            print(f"  {split}: no epochs")
        for epoch, info in stored.items():
            state = "complete" if info.complete else "INCOMPLETE (run stopped or still writing; rows shown are durable)"
            try:
                _, y_pred, _ = open_epoch_arrays(root / split, epoch)
                dtype = y_pred.dtype
                size_mb = info.rows * int(np.prod(info.trailing_shape or (1,))) * 2 * dtype.itemsize / 2**20
                what = f"{dtype}, {size_mb:.1f} MiB"
            except StoreError as exc:
                what = f"arrays unreadable: {exc}"
            print(f"  {split}/epoch={epoch}: {info.rows} rows x {tuple(info.trailing_shape)} {what}, "
                  f"{info.batches} batches, {state}, run {info.run_id}, {info.updated}")
        for name, why in bad.items():
            print(f"  {split}/{name}: IGNORED, {why}")
    return 0


@contextlib.contextmanager
def _scheduler(address: str | None) -> Iterator[object]:
    """``--scheduler``: None (local threads), a local dask scheduler name, or a dask.distributed
    address (a Client connected for the command, closed after it)."""
    if address is None or address in ("threads", "sync", "processes"):
        yield address
        return
    try:
        from distributed import Client
    except ImportError:
        raise ValueError(f"--scheduler {address} needs dask.distributed: pip install distributed") from None
    try:
        client = Client(address, timeout=30)
    except OSError as exc:
        raise ValueError(f"--scheduler {address}: cannot reach a dask scheduler there ({exc}).") from exc
    with client:
        yield client


def _verify(args: argparse.Namespace) -> int:
    with _scheduler(args.scheduler) as scheduler:
        data = compute_stored(args.path, args.split, args.epoch, progress=args.progress, source="data",
                              scheduler=scheduler)
        stored = compute_stored(args.path, args.split, args.epoch, source="auto", scheduler=scheduler)
    where = f"{args.path} {data.split} epoch {data.epoch} ({data.n_rows} rows)"
    if stored.extra.get("source") != "partials":
        print(f"{where}: no stored partials cover the rows; computed from the data only")
        return 0
    differ = [k for k in data.per_output
              if not np.array_equal(data.per_output[k], stored.per_output[k], equal_nan=True)]
    if differ:
        print(f"{where}: stored partials DIFFER from a recompute from the data in {differ}", file=sys.stderr)
        return 1
    print(f"{where}: stored partials equal a recompute from the data, bit for bit "
          f"({len(data.overall)} metrics x {len(next(iter(data.per_output.values())))} outputs)")
    return 0


def _compute(args: argparse.Namespace) -> int:
    with _scheduler(args.scheduler) as scheduler:
        result = compute_stored(args.path, args.split, args.epoch, metrics=args.metrics, progress=args.progress,
                                source=args.source, quantiles=args.quantiles, scheduler=scheduler)
        if args.intervals is not None:
            from oocmetrics.intervals import stored_intervals

            result.intervals = stored_intervals(args.path, args.split, result.epoch, metrics=args.metrics,
                                                level=args.intervals, scheduler=scheduler)
    width = max(len(k) for k in result.overall)
    print(f"{args.path} {result.split} epoch {result.epoch}: {result.n_rows} rows, "
          f"{result.n_values} values, {result.n_skipped} skipped"
          f"{'' if result.extra.get('complete') else ' (INCOMPLETE epoch: durable rows only)'}")
    if "shards" in result.extra:
        print(f"  combined {result.extra['shards']} DDP shards")
    if "duplicate_rows" in result.extra:
        x = result.extra
        print(f"  {x['duplicate_rows']} duplicate rows left out (sample ids: the first copy counts); copies that "
              f"differ: {x['conflicting_targets']} in y_true, {x['conflicting_predictions']} in y_pred"
              f"{' (ids ' + str(x['conflicting_ids']) + ')' if x.get('conflicting_ids') else ''}")
    ci = result.intervals
    for name, value in result.overall.items():
        bounds = ci["overall"].get(name) if ci is not None else None
        ci_text = f"  [{bounds[0]:.8g}, {bounds[1]:.8g}]" if bounds is not None and None not in bounds else ""
        print(f"  {name:<{width}}  {value:.8g}{ci_text}")
    if ci is not None:
        print(f"  {ci['level']:.0%} intervals: {ci['method']}")
        for name, why in ci["excluded"].items():
            print(f"    no interval for {name}: {why}")
    if result.quantiles is not None:
        per = np.asarray(result.quantiles["per_output"])
        print(f"  quantiles of |y_true - y_pred| (exact; pooled over all outputs, then per output):")
        for i, q in enumerate(result.quantiles["q"]):
            cells = " ".join(f"{v:.8g}" for v in per[i])
            print(f"    q={q:<6g} pooled {result.quantiles['pooled'][i]:.8g}  per output [{cells}]")
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2, allow_nan=False))
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
    p_compute.add_argument("--epoch", type=int, default=None, help="epoch number (default: the last)")
    p_compute.add_argument("--metrics", nargs="+", choices=ALL_METRICS, default=None,
                           help="metrics (default: the one-pass suite; median_absolute_error on request)")
    p_compute.add_argument("--quantiles", nargs="+", type=float, default=None, metavar="Q",
                           help="also exact quantiles of |y_true - y_pred| in [0, 1], per output and pooled "
                                "(e.g. 0.5 0.9 0.99)")
    p_compute.add_argument("--intervals", nargs="?", type=float, const=0.95, default=None, metavar="LEVEL",
                           help="also bootstrap confidence intervals at this level (default 0.95): a block "
                                "bootstrap over the stored chunks (see oocmetrics.intervals)")
    p_compute.add_argument("--json", default=None, help="also write the result to this JSON file")
    p_compute.add_argument("--progress", action="store_true", help="show a progress bar")
    p_compute.add_argument("--by", choices=("step", "group"), default=None,
                           help="step: every metric per (step, output) of (rows, steps, outputs) data; group: "
                                "every metric per group (recorded with update(..., groups=)); as JSON, one "
                                "pass over the data (see oocmetrics.breakdown)")
    p_compute.add_argument("--source", choices=("auto", "partials", "data"), default="auto",
                           help="auto: merge the partials stored with each chunk when they cover the rows; "
                                "data: recompute from the data (same bits)")
    p_verify = sub.add_parser("verify", help="check that stored partials equal a recompute from the data")
    p_verify.add_argument("path", help="store directory (the Recorder's path)")
    p_verify.add_argument("--split", default="train", help="split name (default: train)")
    p_verify.add_argument("--epoch", type=int, default=None, help="epoch number (default: the last)")
    p_verify.add_argument("--progress", action="store_true", help="show a progress bar")
    for p in (p_compute, p_verify):
        p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="run the passes on a dask.distributed cluster (e.g. tcp://10.0.0.5:8786; its "
                            "workers must see the store at the same path), or 'threads' (default), "
                            "'processes', 'sync'")
    p_report = sub.add_parser("report", help="PNG plots and report.md of a stored epoch (needs matplotlib)")
    p_report.add_argument("path", help="store directory (the Recorder's path)")
    p_report.add_argument("--split", default="train", help="split name (default: train)")
    p_report.add_argument("--epoch", type=int, default=None, help="epoch number (default: the last)")
    p_report.add_argument("--out", default=None,
                          help="output directory (default: <STORE>-report/<split>-epoch=<k>, beside the store)")
    p_report.add_argument("--progress", action="store_true", help="show a progress bar")
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            return _inspect(args.path)
        if args.command == "report":
            from oocmetrics.report import cli_report

            return cli_report(args)
        if args.command == "compute" and args.by is not None:
            from oocmetrics.breakdown import cli_by_step

            return cli_by_step(args)
        if args.command == "verify":
            return _verify(args)
        return _compute(args)
    except (StoreError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
