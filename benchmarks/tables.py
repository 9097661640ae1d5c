"""Markdown tables from the benchmark JSON files (for benchmarks/RESULTS.md and the README).

    python benchmarks/tables.py bench_out/memory/memory.json bench_out/speed/speed.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

GB, MB = 1e9, 1e6


def _b(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= GB else f"{n / MB:.0f} MB"


def memory_tables(doc: dict) -> list[str]:
    res = doc["results"]
    sizes = doc["config"]["sizes"]
    strategies = doc["config"]["strategies"]
    by = {(r["strategy"], r["n_batches"]): r for r in res}
    L = ["Peak RSS of the whole process (max of 50 ms samples and `ru_maxrss`; the process starts at "
         f"~{_b(min(r['rss_start'] for r in res if r['status'] == 'ok'))} with torch + oocmetrics imported):", "",
         "| batches | y_true + y_pred | " + " | ".join(strategies) + " |",
         "|---:|---:|" + "---:|" * len(strategies)]
    for n in sizes:
        cells = []
        for s in strategies:
            r = by.get((s, n))
            if r is None:
                cells.append("")
            elif r["status"] == "ok":
                cells.append(_b(max(r["rss_peak"], r["ru_maxrss"])))
            else:
                cells.append(f"{r['status']} ({r.get('reason', '')})")
        lines_bytes = 2 * 4 * 16 * 500 * 20 * n
        L.append(f"| {n:,} | {_b(lines_bytes)} | " + " | ".join(cells) + " |")
    L += ["", "Time in the strategy (`update` calls + `compute` + `close`; synthetic data generation and the "
          "reference excluded), and exact's store on disk:", "",
          "| batches | " + " | ".join(f"{s} update / compute" for s in strategies) + " | exact store |",
          "|---:|" + "---:|" * (len(strategies) + 1)]
    for n in sizes:
        cells = []
        for s in strategies:
            r = by.get((s, n))
            cells.append(f"{r['t_update_s']:.2f} s / {r['t_compute_s']:.2f} s" if r and r["status"] == "ok" else "-")
        ex = by.get(("exact", n))
        store = _b(ex["store_bytes"]) if ex and ex["status"] == "ok" else "-"
        L.append(f"| {n:,} | " + " | ".join(cells) + f" | {store} |")
    samp = [r for r in res if r["strategy"] == "sampled" and r["status"] == "ok"
            and r["n_batches"] > doc["config"]["sample_batches"]]
    if samp:
        names = list(samp[0]["reference"])
        L += ["", f"Sampled (first {doc['config']['sample_batches']} batches) against the exact full-epoch value, "
              "signed relative error (sampled_bounded gives identical values):", "",
              "| batches | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
        for r in samp:
            cells = []
            for k in names:
                ref, got = r["reference"][k], r["metrics"][k]
                cells.append(f"{(got - ref) / abs(ref):+.1%}")
            L.append(f"| {r['n_batches']:,} | " + " | ".join(cells) + " |")
    ex = [r for r in res if r["strategy"] in ("exact", "naive") and r["status"] == "ok"]
    if ex:
        worst = {s: max(max(r["rel_error"].values()) for r in ex if r["strategy"] == s)
                 for s in ("exact", "naive") if any(r["strategy"] == s for r in ex)}
        L += ["", "Largest relative error over all metrics and sizes against the in-process float64 streaming "
              "reference: " + ", ".join(f"{s} {v:.1e}" for s, v in worst.items()) + "."]
    return L


def speed_tables(doc: dict) -> list[str]:
    f = doc["figures"]
    pb = doc["per_batch"]
    L = [f"Machine figures measured in the same run (median of {doc['config']['repeat']} runs): memcpy "
         f"{f['memcpy_GBps']:.1f} GB/s; filling freshly allocated memory {f['first_touch_GBps']:.2f} GB/s; "
         f"writing a {doc['config']['disk_mb']} MiB file: {f['disk_write_GBps']:.2f} GB/s (page cache, as found), "
         f"{f['disk_write_warm_GBps']:.2f} GB/s (page cache, warm), {f['disk_write_fsync_GBps']:.2f} / "
         f"{f['disk_write_fsync_warm_GBps']:.2f} GB/s with fsync; zarr whole 16 MiB chunk writes (no codec, warm) "
         f"{f['zarr_chunk_write_warm_GBps']:.2f} GB/s.", "",
         "| per (16, 500, 20) float32 batch pair (1.28 MB) | median | mean | p99 | MB/s | median / memcpy |",
         "|---|---:|---:|---:|---:|---:|"]
    for name, s in pb.items():
        unit = pb["memcpy_paced" if name.endswith("_paced") else "memcpy"]["median_ms"]
        mbps = f"{s['MBps']:.0f}" if "MBps" in s else "-"
        L.append(f"| `{name}` | {s['median_ms']:.3f} ms | {s['mean_ms']:.3f} ms | {s['p99_ms']:.2f} ms | {mbps} | "
                 f"{s['median_ms'] / unit:.1f}x |")
    L += ["", "| epoch end | data | oocmetrics `compute()` | NumPy: concatenate + compute | (first run) | "
          "NumPy: load store + compute | (first run) | `compute_arrays` in RAM | max rel. diff |",
          "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in doc["compute"]:
        L.append(f"| {c['n_batches']:,} batches | {_b(c['data_bytes'])} | {c['ooc_compute_s']:.2f} s "
                 f"({c['ooc_GBps']:.2f} GB/s) | {c['numpy_concat_compute_s']:.2f} s | "
                 f"{c['numpy_concat_compute_first_s']:.2f} s | {c['numpy_load_compute_s']:.2f} s | "
                 f"{c['numpy_load_compute_first_s']:.2f} s | {c['ooc_kernels_in_ram_s']:.2f} s | "
                 f"{c['max_rel_diff_vs_numpy']:.0e} |")
    L += ["", "| target | measured (median of runs; each run) | |", "|---|---|---|"]
    for t in doc["targets"]:
        runs = ", ".join(f"{v:.2f}" for v in t.get("runs", []))
        L.append(f"| {t['target']} | {t['value']:.2f} {t['unit']} ({runs}) | {'met' if t['met'] else '**not met**'} |")
    return L


def main(argv: list[str]) -> int:
    for path in argv:
        doc = json.loads(Path(path).read_text())
        print(f"<!-- from {path}: {doc['command']} ({doc['machine']['time']}, code {doc['machine'].get('code', '?')}) -->")
        lines = memory_tables(doc) if doc["benchmark"] == "run_memory" else speed_tables(doc)
        print("\n".join(lines))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["bench_out/memory/memory.json", "bench_out/speed/speed.json"]))
