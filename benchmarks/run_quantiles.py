"""Exact quantiles of |y_true - y_pred|: oocmetrics' radix select vs ``np.quantile``, same bits.

Builds (rows, 20) float32 y_true / y_pred in RAM (``--values`` in all), then times

* ``oocmetrics.compute_arrays(t, p, ["mae"], quantiles=Q)``: every quantile per output *and*
  pooled over all outputs, from one radix select (plus the one-pass metrics' pass);
* ``np.quantile(E, Q, axis=0)`` + ``np.quantile(E, Q)`` on the float64 |e| array ``E`` already
  computed (its construction is not timed: the comparison favours NumPy);

checks the results are the same bits and prints a table; JSON goes to ``--out``.

    python benchmarks/run_quantiles.py --quick            # 20 M values, ~1 min
    python benchmarks/run_quantiles.py                    # 320 M values (needs ~16 GB of RAM)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, write_json  # noqa: E402

import oocmetrics  # noqa: E402

QUANTILES = (0.5, 0.9, 0.95, 0.99)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--values", type=float, default=320e6, help="values in all (rows x outputs)")
    ap.add_argument("--quick", action="store_true", help="20 M values")
    ap.add_argument("--outputs", type=int, default=20)
    ap.add_argument("--quantiles", type=float, nargs="+", default=list(QUANTILES))
    ap.add_argument("--repeat", type=int, default=1, help="timed runs of each (best is reported)")
    ap.add_argument("--out", default="bench_out", help="directory for quantiles.json")
    args = ap.parse_args(argv)
    n_values = int(20e6 if args.quick else args.values)
    J = args.outputs
    rows = n_values // J
    q = np.asarray(args.quantiles, dtype=np.float64)

    rng = np.random.default_rng(0)
    t = rng.standard_normal((rows, J), dtype=np.float32)
    p = t + rng.standard_normal((rows, J), dtype=np.float32) * np.float32(0.1)
    oocmetrics.compute_arrays(t[:100], p[:100], ["mae"], quantiles=q, chunk_rows=7)  # load the kernels

    ours, res = [], None
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        res = oocmetrics.compute_arrays(t, p, ["mae"], quantiles=q)
        ours.append(time.perf_counter() - t0)

    E = np.abs(t.astype(np.float64) - p.astype(np.float64))
    del t, p
    numpy_per, numpy_pooled = [], []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        ref_per = np.quantile(E, q, axis=0)
        numpy_per.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ref_pooled = np.quantile(E.reshape(-1), q)
        numpy_pooled.append(time.perf_counter() - t0)

    same = bool(np.array_equal(res.quantiles["per_output"].view(np.uint64), ref_per.view(np.uint64))
                and np.array_equal(res.quantiles["pooled"].view(np.uint64), ref_pooled.view(np.uint64)))
    t_ours, t_np = min(ours), min(numpy_per) + min(numpy_pooled)
    out = {
        "values": rows * J, "rows": rows, "outputs": J, "quantiles": q.tolist(),
        "oocmetrics_s": t_ours, "numpy_per_output_s": min(numpy_per), "numpy_pooled_s": min(numpy_pooled),
        "numpy_s": t_np, "speedup": t_np / t_ours, "same_bits": same, "target_speedup": 10.0,
        "machine": machine_info(),
    }
    print(f"{rows * J / 1e6:.0f} M values ({rows} rows x {J} outputs), quantiles {q.tolist()}, per output + pooled")
    print(f"  {'method':<44}{'seconds':>10}")
    print(f"  {'oocmetrics compute_arrays(quantiles=...)':<44}{t_ours:>10.2f}")
    print(f"  {'np.quantile(E, q, axis=0)':<44}{min(numpy_per):>10.2f}")
    print(f"  {'np.quantile(E.ravel(), q)':<44}{min(numpy_pooled):>10.2f}")
    print(f"  {'np.quantile total':<44}{t_np:>10.2f}")
    print(f"  speedup {t_np / t_ours:.1f}x (target >= 10x); same bits: {same}")
    path = Path(args.out) / "quantiles.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, out)
    print(f"wrote {path}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
