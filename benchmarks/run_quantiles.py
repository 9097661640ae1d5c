"""Exact quantiles of |y_true - y_pred|: oocmetrics' radix select vs ``np.quantile``, same bits.

Builds (rows, 20) float32 y_true / y_pred in RAM (``--values`` in all), then times

* in RAM, ``oocmetrics.compute_arrays(t, p, ["mae"], quantiles=Q)``: every quantile per output *and*
  pooled over all outputs, from one radix select, plus the one-pass metrics' pass (end to end);
  and the radix select alone (``abs_error_quantiles`` on the arrays, counts known);
* from a store: the same arrays recorded with ``oocmetrics.Recorder`` (default 8 MiB chunks) into
  ``--store`` (default: a temporary directory under ``--out``, deleted afterwards), then
  ``oocmetrics.compute_stored(..., quantiles=Q)`` with the page cache warm (one untimed run first;
  the metrics come from the partials stored with the chunks, so only the select reads the data);
  seconds per GB of stored y_true + y_pred, and the peak RSS above the process's RSS before it;
* ``np.quantile(E, Q, axis=0)`` + ``np.quantile(E, Q)`` on the float64 |e| array ``E`` already
  computed in RAM (its construction is not timed: the comparison favours NumPy);

checks all results are the same bits, prints a table with the passes each select took (read from
the ``oocmetrics.compute`` debug log) and writes JSON to ``--out``.

    python benchmarks/run_quantiles.py --quick            # 20 M values, ~10 s
    python benchmarks/run_quantiles.py --values 100e6     # 100 M values (~6 GB of RAM at peak)
    python benchmarks/run_quantiles.py                    # 320 M values (~16 GB of RAM at peak)

Timings are the best of ``--repeat`` runs, wall clock and CPU time of the process (all threads;
NumPy's quantile is single-threaded, ours uses the dask threads). On a shared machine they vary
from run to run: compare ratios taken in the same run.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RSSSampler, machine_info, write_json  # noqa: E402

import oocmetrics  # noqa: E402
from oocmetrics import compute as C  # noqa: E402

QUANTILES = (0.5, 0.9, 0.95, 0.99)
GB = 1e9


class PassLog(logging.Handler):
    """Collects the ``select_pass`` records the order-statistics passes log at DEBUG level."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.passes: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        info = getattr(record, "select_pass", None)
        if info is not None:
            self.passes.append(dict(info))


def best_of(repeat: int, log: PassLog, fn: Callable[[], Any]) -> tuple[float, Any, list[dict[str, Any]], float]:
    """(best seconds, last result, passes of the best run, CPU seconds of this process in it) of
    ``repeat`` runs of ``fn`` (CPU time counts every thread: on a busy machine it shows the work
    when the wall time shows the waiting too)."""
    best, result, passes, cpu = float("inf"), None, [], float("nan")
    for _ in range(repeat):
        log.passes.clear()
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if dt < best:
            best, passes, cpu = dt, list(log.passes), dc
    return best, result, passes, cpu


def same_bits(a: Any, b: Any) -> bool:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return bool(a.shape == b.shape and np.array_equal(a.view(np.uint64), b.view(np.uint64)))


def describe(passes: list[dict[str, Any]]) -> str:
    """'N passes: ...' from the logged levels (a level may read the data more than once)."""
    parts = []
    for p in passes:
        if p["kind"] == "histogram":
            extra = f", gathered {p['gathered']}" if p.get("gathered") is not None else ""
            parts.append(f"hist {p['width']}b/{p['targets']}t {p['seconds']:.3f}s (resolved {p['resolved']}{extra})")
        else:
            parts.append(f"gather {p['candidates']}c {p['seconds']:.3f}s")
    return f"{sum(p['reads'] for p in passes)} passes: " + ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--values", type=float, default=320e6, help="values in all (rows x outputs)")
    ap.add_argument("--quick", action="store_true", help="20 M values")
    ap.add_argument("--outputs", type=int, default=20)
    ap.add_argument("--quantiles", type=float, nargs="+", default=list(QUANTILES))
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of each (best is reported)")
    ap.add_argument("--store", default=None,
                    help="directory for the recorded store, kept afterwards (default: a temporary one under "
                         "--out, deleted unless --keep-store)")
    ap.add_argument("--keep-store", action="store_true", help="do not delete the temporary store afterwards")
    ap.add_argument("--out", default="bench_out", help="directory for quantiles.json")
    args = ap.parse_args(argv)
    n_values = int(20e6 if args.quick else args.values)
    J = args.outputs
    rows = n_values // J
    q = np.asarray(args.quantiles, dtype=np.float64)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = PassLog()
    logger = logging.getLogger("oocmetrics.compute")
    logger.addHandler(log)
    logger.setLevel(logging.DEBUG)

    rng = np.random.default_rng(0)
    t = rng.standard_normal((rows, J), dtype=np.float32)
    p = t + rng.standard_normal((rows, J), dtype=np.float32) * np.float32(0.1)
    oocmetrics.compute_arrays(t[:100], p[:100], ["mae"], quantiles=q, chunk_rows=7)  # load the kernels
    stored_gb = 2 * t.nbytes / GB

    # in RAM: end to end (the metrics' pass + the select), then the select alone
    t_arrays, res, passes_arrays, cpu_arrays = best_of(
        args.repeat, log, lambda: oocmetrics.compute_arrays(t, p, ["mae"], quantiles=q))
    blocks = C.RowBlocks(t, p, rows, max(1, (8 << 20) // (J * 4)))
    counts = np.full(J, rows)
    t_select, _, passes_select, cpu_select = best_of(args.repeat, log, lambda: C.abs_error_quantiles(blocks, counts, q))

    # from a store, page cache warm
    store_root = Path(args.store) if args.store else Path(tempfile.mkdtemp(prefix="quantiles-store-", dir=out_dir))
    batch = 8192
    t0 = time.perf_counter()
    with oocmetrics.Recorder(store_root, "val", metrics=["mae"], mode="overwrite") as rec:
        for a in range(0, rows, batch):
            rec.update(t[a:a + batch], p[a:a + batch])
    t_record = time.perf_counter() - t0
    oocmetrics.compute_stored(store_root, "val", metrics=["mae"], quantiles=q)  # warms the page cache
    sampler = RSSSampler(0.01).start()
    sampler.phase("before")
    base_rss = sampler.rss()
    sampler.phase("compute_stored")
    t_store, stored, passes_store, cpu_store = best_of(
        args.repeat, log, lambda: oocmetrics.compute_stored(store_root, "val", metrics=["mae"], quantiles=q))
    peaks = sampler.stop()
    store_peak_mb = (peaks["compute_stored"] - base_rss) / 2**20
    if args.store is None and not args.keep_store:
        shutil.rmtree(store_root, ignore_errors=True)

    E = np.abs(t.astype(np.float64) - p.astype(np.float64))
    del t, p, blocks
    t_np_per, ref_per, _, cpu_np_per = best_of(args.repeat, log, lambda: np.quantile(E, q, axis=0))
    t_np_pooled, ref_pooled, _, cpu_np_pooled = best_of(args.repeat, log, lambda: np.quantile(E.reshape(-1), q))
    t_np, cpu_np = t_np_per + t_np_pooled, cpu_np_per + cpu_np_pooled

    same = {
        "compute_arrays": same_bits(res.quantiles["per_output"], ref_per)
        and same_bits(res.quantiles["pooled"], ref_pooled),
        "compute_stored": same_bits(stored.quantiles["per_output"], ref_per)
        and same_bits(stored.quantiles["pooled"], ref_pooled),
    }
    doc = {
        "values": rows * J, "rows": rows, "outputs": J, "quantiles": q.tolist(), "repeat": args.repeat,
        "stored_gb": stored_gb, "record_s": t_record,
        "oocmetrics_s": t_arrays, "select_only_s": t_select, "compute_stored_s": t_store,
        "compute_stored_s_per_gb": t_store / stored_gb, "compute_stored_peak_rss_mb": store_peak_mb,
        "numpy_per_output_s": t_np_per, "numpy_pooled_s": t_np_pooled, "numpy_s": t_np,
        "cpu_s": {"compute_arrays": cpu_arrays, "select_only": cpu_select, "compute_stored": cpu_store,
                  "numpy_per_output": cpu_np_per, "numpy_pooled": cpu_np_pooled, "numpy": cpu_np},
        "speedup": t_np / t_arrays, "speedup_select_only": t_np / t_select, "speedup_from_store": t_np / t_store,
        "passes": {"compute_arrays": passes_arrays, "select_only": passes_select, "compute_stored": passes_store},
        "reads_of_the_data": {k: sum(x["reads"] for x in v) for k, v in
                              (("compute_arrays", passes_arrays), ("select_only", passes_select),
                               ("compute_stored", passes_store))},
        "same_bits": all(same.values()), "same_bits_each": same, "target_speedup": 10.0,
        "machine": machine_info(),
    }
    print(f"{rows * J / 1e6:.0f} M values ({rows} rows x {J} outputs, {stored_gb:.2f} GB float32 y_true + y_pred), "
          f"quantiles {q.tolist()}, per output + pooled; best of {args.repeat}")
    print(f"  {'method':<52}{'seconds':>9}{'vs numpy':>10}{'CPU s':>8}{'vs numpy':>10}")
    rows_out = [
        ("oocmetrics compute_arrays(quantiles=...), in RAM", t_arrays, cpu_arrays),
        ("  of which the radix select alone", t_select, cpu_select),
        ("oocmetrics compute_stored(quantiles=...), warm cache", t_store, cpu_store),
        ("np.quantile(E, q, axis=0)", t_np_per, cpu_np_per),
        ("np.quantile(E.ravel(), q)", t_np_pooled, cpu_np_pooled),
        ("np.quantile total (E in RAM, not timed)", t_np, cpu_np),
    ]
    for name, sec, cpu in rows_out:
        print(f"  {name:<52}{sec:>9.3f}{t_np / sec:>9.1f}x{cpu:>8.3f}{cpu_np / cpu:>9.1f}x")
    print(f"  from the store: {t_store / stored_gb:.2f} s per GB stored ({stored_gb / t_store:.2f} GB/s), "
          f"peak RSS +{store_peak_mb:.0f} MB; recording took {t_record:.1f} s")
    print(f"  select in RAM:  {describe(passes_select)}")
    print(f"  compute_stored: {describe(passes_store)}")
    print(f"  speedup {t_np / t_arrays:.1f}x end to end in RAM, {t_np / t_select:.1f}x the select alone, "
          f"{t_np / t_store:.1f}x from the store (target >= 10x); same bits: {all(same.values())}")
    path = out_dir / "quantiles.json"
    write_json(path, doc)
    print(f"wrote {path}")
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
