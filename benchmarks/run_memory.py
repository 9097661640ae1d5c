"""Peak memory, time and accuracy of epoch-level metrics: exact (oocmetrics) vs sampled vs naive.

Every (strategy, epoch size) runs in its own subprocess over the same deterministic synthetic
epoch of (16, 500, 20) float32 batches, generated batch by batch (never materialised) and ordered
like real recordings (subjects in order, error growing over the epoch). Each subprocess measures:

* peak RSS of the whole process, sampled every 50 ms by a thread, per phase (epoch loop, compute),
  and the kernel's high-water mark (VmHWM; stored under the key ``ru_maxrss``, which on Linux would
  include the parent's peak);
* wall time of the strategy's ``update`` calls, ``compute`` and ``close``;
* every metric's relative error against a float64 streaming reference computed in the same
  process (``StreamingReference`` in ``benchmarks/baselines.py``: per-batch two-pass float64
  partials merged pairwise with Chan's formulas, independent of the oocmetrics kernels). So the
  exact strategy is verified, not assumed.

Strategies: ``exact`` (``oocmetrics.Recorder``; its store lives under ``--out`` and is deleted
after each run), ``exact_quantiles`` (the same with ``quantiles=True``: every ``compute()`` also
takes the exact |error| quantiles per output and pooled), ``sampled`` (the seed: first ``--sample-batches`` batches, but every batch kept
in lists), ``sampled_bounded`` (same, stops keeping batches), ``naive`` (every batch in lists,
``np.concatenate`` at the end). A list-based strategy that cannot fit in the memory available now
is skipped; one that runs the machine low anyway is killed by the driver and reported as killed.

    python benchmarks/run_memory.py --quick                 # CI: 20 and 80 batches, ~30 s
    flock /tmp/oocm-heavy.lock python benchmarks/run_memory.py --out bench_out/memory
    python benchmarks/run_memory.py --sizes 100 1000 --strategies exact naive
    python benchmarks/run_memory.py --sizes 11014 --strategies exact_quantiles   # quantiles at the seed's scale

Outputs under ``--out``: ``memory.json``, ``memory.png`` and a table on stdout.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    BATCH_SHAPE,
    GB,
    SEED_BATCHES,
    RSSSampler,
    SyntheticEpoch,
    fmt_bytes,
    machine_info,
    rel_error,
    ru_maxrss_bytes,
    write_json,
)

STRATEGIES = ("exact", "exact_quantiles", "sampled", "sampled_bounded", "naive")
DEFAULT_SIZES = (100, 300, 1000, 3000, 6000, SEED_BATCHES)
QUICK_SIZES = (20, 80)
QUICK_STRATEGIES = ("exact", "sampled", "naive")  # ~4 s a subprocess (imports): keep CI short
BASE_PROCESS_BYTES = 1.0 * GB  # interpreter + torch + oocmetrics + dask threads, with margin


# ----------------------------------------------------------------------------------------------
# child: one strategy, one epoch size
# ----------------------------------------------------------------------------------------------
def _make_strategy(name: str, args: argparse.Namespace, store: Path | None):
    from baselines import ConcatRecorder, SampledRecorder

    if name in ("exact", "exact_quantiles"):
        import oocmetrics

        # exact_quantiles: compute() also takes the exact quantiles 0.5, 0.9, 0.95, 0.99 of |e|,
        # per output (20) and pooled: the radix-select passes over the whole stored epoch
        return oocmetrics.Recorder(store, split="train", mode="overwrite", quantiles=name == "exact_quantiles")
    if name == "sampled":
        return SampledRecorder(max_batches=args.sample_batches, keep_all=True)
    if name == "sampled_bounded":
        return SampledRecorder(max_batches=args.sample_batches, keep_all=False)
    if name == "naive":
        return ConcatRecorder()
    raise ValueError(f"Unknown strategy {name!r}; expected one of {STRATEGIES}.")


def child_main(args: argparse.Namespace) -> int:
    try:  # if memory runs out, let the kernel pick this process, not someone else's
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:
        pass
    t_start = time.perf_counter()
    # the same imports and warm-up in every strategy's process, so RSS differences are the strategy's
    import torch

    import oocmetrics
    from baselines import StreamingReference, numpy_metrics

    torch.set_grad_enabled(False)
    warm_t = np.random.default_rng(1).normal(size=(64, 3)).astype(np.float32)
    oocmetrics.compute_arrays(warm_t, warm_t * 0.5)  # numba kernels loaded/compiled before measuring
    numpy_metrics(warm_t, warm_t * 0.5)

    epoch = SyntheticEpoch(args.n_batches, seed=args.seed)
    ref = StreamingReference()
    store = Path(args.store) if args.store else None
    strat = _make_strategy(args.strategy, args, store)
    gc.collect()
    sampler = RSSSampler(interval=args.sample_interval).start()
    rss_start = sampler.rss()
    t_import = time.perf_counter() - t_start

    sampler.phase("epoch")
    t_gen = t_update = t_ref = 0.0
    clock = time.perf_counter
    for i in range(args.n_batches):
        c0 = clock()
        y_true, y_pred = epoch.batch(i)
        yt, yp = torch.from_numpy(y_true), torch.from_numpy(y_pred)  # what a training loop hands over
        c1 = clock()
        strat.update(yt, yp)
        c2 = clock()
        ref.update(y_true, y_pred)
        c3 = clock()
        t_gen += c1 - c0
        t_update += c2 - c1
        t_ref += c3 - c2
        del y_true, y_pred, yt, yp
    rss_epoch_end = sampler.rss()

    sampler.phase("compute")
    c0 = clock()
    res = strat.compute()
    t_compute = clock() - c0
    got = dict(res.overall) if hasattr(res, "overall") else dict(res)
    rss_compute_end = sampler.rss()

    sampler.phase("close")
    c0 = clock()
    extra: dict[str, Any] = {}
    if args.strategy.startswith("exact"):
        extra = {"n_rows": res.n_rows, "n_values": res.n_values, "n_skipped": res.n_skipped}
        strat.close()
        extra["store_bytes"] = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    else:
        extra = {"held_bytes": strat.held_bytes, "rows": strat.rows}
        strat.close()
    t_close = clock() - c0
    peaks = sampler.stop()
    maxrss = ru_maxrss_bytes()
    if store is not None:
        shutil.rmtree(store, ignore_errors=True)

    c0 = clock()
    want = ref.compute()
    t_ref += clock() - c0
    result = {
        "strategy": args.strategy,
        "n_batches": args.n_batches,
        "status": "ok",
        "data_bytes": epoch.nbytes,
        "sample_batches": args.sample_batches if args.strategy.startswith("sampled") else None,
        "rss_start": rss_start,
        "rss_peak_epoch": peaks.get("epoch"),
        "rss_peak_compute": peaks.get("compute"),
        "rss_peak": max(peaks.values()),
        "rss_epoch_end": rss_epoch_end,
        "rss_compute_end": rss_compute_end,
        "ru_maxrss": maxrss,
        "rss_samples": sampler.samples,
        "t_update_s": t_update,
        "t_compute_s": t_compute,
        "t_close_s": t_close,
        "t_strategy_s": t_update + t_compute + t_close,
        "t_generate_s": t_gen,
        "t_reference_s": t_ref,
        "t_setup_s": t_import,
        "t_total_s": time.perf_counter() - t_start,
        "metrics": got,
        "reference": want,
        "rel_error": {k: rel_error(got[k], want[k]) for k in want},
        **extra,
    }
    write_json(Path(args.result), result)
    return 0


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------
def estimate_bytes(strategy: str, n_batches: int, sample_batches: int) -> int:
    """RAM a strategy needs beyond a bare process: lists + concatenated copies of both arrays."""
    per_batch = 2 * 4 * int(np.prod(BATCH_SHAPE))  # y_true + y_pred
    sample = min(sample_batches, n_batches) * per_batch
    if strategy == "naive":  # lists + np.concatenate, both arrays: ~4x the bytes of one array
        return 2 * n_batches * per_batch
    if strategy == "sampled":
        return n_batches * per_batch + sample
    if strategy == "sampled_bounded":
        return 2 * sample
    return 0  # exact: a few chunk buffers, counted in BASE_PROCESS_BYTES


def run_child(args: argparse.Namespace, strategy: str, n: int, workdir: Path) -> dict[str, Any]:
    """Run one configuration in a subprocess under a memory watchdog; return its result record."""
    base = {"strategy": strategy, "n_batches": n, "data_bytes": 2 * 4 * int(np.prod(BATCH_SHAPE)) * n}
    need = estimate_bytes(strategy, n, args.sample_batches) + BASE_PROCESS_BYTES
    avail = psutil.virtual_memory().available
    if need > avail - args.reserve_gb * GB:
        return {**base, "status": "skipped", "reason": (
            f"needs ~{need / GB:.1f} GB, {avail / GB:.1f} GB available ({args.reserve_gb:g} GB kept free)"
        )}
    store = None
    if strategy.startswith("exact"):
        store = workdir / f"store-{n}"
        free = shutil.disk_usage(workdir).free
        if base["data_bytes"] * 1.1 > free - 5 * GB:
            return {**base, "status": "skipped", "reason": (
                f"store needs ~{base['data_bytes'] / GB:.1f} GB disk, {free / GB:.1f} GB free"
            )}
    result_path = workdir / f"result-{strategy}-{n}.json"
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--child",
        "--strategy", strategy, "--n-batches", str(n), "--seed", str(args.seed),
        "--sample-batches", str(args.sample_batches), "--sample-interval", str(args.sample_interval),
        "--result", str(result_path),
    ] + (["--store", str(store)] if store else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps = psutil.Process(proc.pid)
    killed = None
    watch_peak = 0
    t0 = time.monotonic()
    try:
        while proc.poll() is None:
            try:
                watch_peak = max(watch_peak, ps.memory_info().rss)
            except psutil.NoSuchProcess:
                break
            avail = psutil.virtual_memory().available
            if avail < args.kill_below_gb * GB:
                killed = f"killed by the driver: {avail / GB:.2f} GB available (< {args.kill_below_gb:g} GB)"
            elif time.monotonic() - t0 > args.timeout:
                killed = f"killed by the driver: over the {args.timeout:g} s timeout"
            if killed:
                proc.kill()
                break
            time.sleep(0.1)
        out, _ = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if store is not None:
            shutil.rmtree(store, ignore_errors=True)
    if killed or proc.returncode != 0 or not result_path.exists():
        reason = killed or f"exit code {proc.returncode}" + (" (SIGKILL: out of memory?)" if proc.returncode == -9 else "")
        return {**base, "status": "killed" if killed or proc.returncode == -9 else "error", "reason": reason,
                "driver_rss_peak": watch_peak, "log_tail": (out or "")[-3000:]}
    result = json.loads(result_path.read_text())
    result_path.unlink()
    result["driver_rss_peak"] = watch_peak  # the driver's own 100 ms samples, a cross-check
    return result


def _fmt_err(x: float | None) -> str:
    if x is None:
        return "-"
    return "0" if x == 0 else f"{x:.1e}"


def print_table(results: list[dict[str, Any]]) -> list[str]:
    lines = [
        f"{'strategy':<16}{'batches':>8}{'data':>10}{'peak RSS':>10}{'ru_maxrss':>10}{'RSS start':>10}"
        f"{'update':>9}{'compute':>9}{'total':>9}   {'rel.err mse':>11}{'r2':>9}{'pearson':>9}{'max rel.err':>12}  status",
    ]
    for r in results:
        if r["status"] != "ok":
            lines.append(
                f"{r['strategy']:<16}{r['n_batches']:>8}{fmt_bytes(r['data_bytes']):>10}"
                f"{'-':>10}{'-':>10}{'-':>10}{'-':>9}{'-':>9}{'-':>9}   {'':>41}  {r['status']}: {r.get('reason', '')}"
            )
            continue
        err = r["rel_error"]
        lines.append(
            f"{r['strategy']:<16}{r['n_batches']:>8}{fmt_bytes(r['data_bytes']):>10}{fmt_bytes(r['rss_peak']):>10}"
            f"{fmt_bytes(r['ru_maxrss']):>10}{fmt_bytes(r['rss_start']):>10}"
            f"{r['t_update_s']:>8.2f}s{r['t_compute_s']:>8.2f}s{r['t_strategy_s']:>8.2f}s"
            f"   {_fmt_err(err['mse']):>11}{_fmt_err(err['r2']):>9}{_fmt_err(err['pearson_r']):>9}"
            f"{_fmt_err(max(err.values())):>12}  ok"
        )
    for line in lines:
        print(line)
    return lines


def plot(results: list[dict[str, Any]], path: Path, sample_batches: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    markers = {"exact": "o", "exact_quantiles": "x", "sampled": "s", "sampled_bounded": "^", "naive": "D"}
    sizes = sorted({r["n_batches"] for r in results})
    for strat in STRATEGIES:
        rs = [r for r in results if r["strategy"] == strat]
        ok = [r for r in rs if r["status"] == "ok"]
        if ok:
            ax1.plot([r["n_batches"] for r in ok], [max(r["rss_peak"], r["ru_maxrss"]) / GB for r in ok],
                     marker=markers.get(strat, "o"), label=strat)
        for r in rs:
            if r["status"] != "ok":
                ax1.annotate(f"{strat}: {r['status']}", (r["n_batches"], 0.0), xycoords=("data", "axes fraction"),
                             rotation=90, fontsize=7, va="bottom", ha="right", color="gray")
    ax1.plot(sizes, [2 * 4 * int(np.prod(BATCH_SHAPE)) * n / GB for n in sizes], "k:", label="y_true + y_pred bytes")
    ax1.axvline(SEED_BATCHES, color="gray", lw=0.5)
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel(f"batches per epoch ({'x'.join(map(str, BATCH_SHAPE))} float32)")
    ax1.set_ylabel("peak RSS of the process (GB)")
    ax1.set_title("Peak memory over one epoch + compute")
    ax1.legend(fontsize=8)
    ax1.grid(True, which="both", alpha=0.3)

    # the sampled strategies give the same values; below sample_batches they see the whole epoch
    samp = [r for r in results if r["strategy"] in ("sampled", "sampled_bounded") and r["status"] == "ok"
            and r["n_batches"] > sample_batches]
    by_n: dict[int, dict[str, float]] = {}
    for r in samp:
        by_n.setdefault(r["n_batches"], r["rel_error"])
    ns = sorted(by_n)
    if ns:
        for name in by_n[ns[0]]:
            ax2.plot(ns, [by_n[n][name] for n in ns], marker=".", label=f"sampled {name}")
    ax2.axvline(sample_batches, color="gray", lw=0.8, ls=":")
    ax2.annotate(f"epochs <= {sample_batches} batches:\nsampled = whole epoch", (sample_batches, 0.85),
                 xycoords=("data", "axes fraction"), ha="right", fontsize=8, color="gray")
    exact = [r for r in results if r["strategy"] == "exact" and r["status"] == "ok"]
    if exact:
        ax2.plot([r["n_batches"] for r in exact], [max(max(r["rel_error"].values()), 1e-17) for r in exact],
                 "k--", marker="o", label="exact (oocmetrics), max over metrics")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("batches per epoch")
    ax2.set_ylabel("relative error vs float64 full-epoch value")
    ax2.set_title(f"Sampled metrics (first {sample_batches} batches) on ordered data")
    ax2.legend(fontsize=7, ncol=2, loc="center right")
    ax2.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_out", help="output directory (default: bench_out/)")
    ap.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES}, sampling 10 batches: < 1 min, for CI")
    ap.add_argument("--sizes", type=int, nargs="+", help=f"epoch sizes in batches (default {DEFAULT_SIZES})")
    ap.add_argument("--strategies", nargs="+", choices=STRATEGIES,
                    help=f"default: all of {STRATEGIES}; with --quick: {QUICK_STRATEGIES}")
    ap.add_argument("--sample-batches", type=int, help="batches the sampled strategies use (default 1000; 10 with --quick)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reserve-gb", type=float, default=2.0, help="RAM to leave free when deciding to skip (GB)")
    ap.add_argument("--kill-below-gb", type=float, default=1.0, help="kill a run if available RAM falls below (GB)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per configuration")
    ap.add_argument("--sample-interval", type=float, default=0.05, help="RSS sampling interval (s)")
    ap.add_argument("--replot", action="store_true", help="redraw the table and plot from --out/memory.json")
    # child mode (internal)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--strategy", help=argparse.SUPPRESS)
    ap.add_argument("--n-batches", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.sample_batches is None:
        args.sample_batches = 10 if args.quick else 1000
    if args.sizes is None:
        args.sizes = list(QUICK_SIZES if args.quick else DEFAULT_SIZES)
    if args.strategies is None:
        args.strategies = list(QUICK_STRATEGIES if args.quick else STRATEGIES)
    if any(n < 1 for n in args.sizes):
        ap.error("--sizes must be positive")
    if args.sample_batches < 1:
        ap.error("--sample-batches must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    out = Path(args.out)
    if args.replot:
        doc = json.loads((out / "memory.json").read_text())
        print_table(doc["results"])
        plot(doc["results"], out / "memory.png", doc["config"]["sample_batches"])
        return 0
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    print(f"# run_memory: sizes {args.sizes}, strategies {args.strategies}, sampled = first {args.sample_batches} "
          f"batches; {info['cpu_count']} cores, {info['mem_available_gb_at_start']} GB available", flush=True)
    results: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="run_memory-", dir=out) as tmp:
        for n in sorted(args.sizes):
            for strat in args.strategies:
                r = run_child(args, strat, n, Path(tmp))
                results.append(r)
                if r["status"] == "ok":
                    print(f"  {strat:<16}{n:>7} batches: peak RSS {fmt_bytes(max(r['rss_peak'], r['ru_maxrss']))}, "
                          f"{r['t_strategy_s']:.2f} s, max rel. error {max(r['rel_error'].values()):.1e}", flush=True)
                else:
                    print(f"  {strat:<16}{n:>7} batches: {r['status']}: {r.get('reason')}", flush=True)
    print()
    lines = print_table(results)
    doc = {
        "benchmark": "run_memory",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "config": {"sizes": sorted(args.sizes), "strategies": args.strategies, "batch_shape": BATCH_SHAPE,
                   "dtype": "float32", "sample_batches": args.sample_batches, "seed": args.seed,
                   "rss_sample_interval_s": args.sample_interval, "reserve_gb": args.reserve_gb},
        "machine": info,
        "wall_s": time.perf_counter() - t0,
        "results": results,
        "table": lines,
    }
    write_json(out / "memory.json", doc)
    plot(results, out / "memory.png", args.sample_batches)
    print(f"\nwrote {out / 'memory.json'} and {out / 'memory.png'}")
    bad = [r for r in results if r["status"] == "error"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
