"""DDP merge cost: one epoch recorded by one process vs split over 2 ranks (gloo), same samples.

Each rank records its DistributedSampler-style share (strided, the total padded to a multiple of the
world size with copies of the first samples, ids = sample indices) of a seed-shaped epoch (batches
of 16 x 500 x 20 float32, ``SyntheticEpoch``), then calls ``compute()``: a collective that exchanges
id sets, merged partials and row hashes. Timed: ``compute()`` after each process's last ``update``;
memory: each process's peak RSS (VmHWM). The DDP epoch end is timed from the last ``update`` on
any rank to the moment every rank has its result (a rank that finished early waits in the
collective; that wait is not merge cost). Results are checked equal (1e-12 relative); a table is
printed and JSON goes to ``--out``.

    python benchmarks/run_ddp.py --quick          # 1,000 batches (~1 min)
    python benchmarks/run_ddp.py                  # the seed's 11,014 batches (14 GB written twice, ~5 min)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SEED_BATCHES, SyntheticEpoch, fmt_bytes, machine_info, rel_error, write_json  # noqa: E402

ROWS = 16  # samples per batch


def worker(store: str, out: str, rank: int, world: int, init: str, batches: int) -> None:
    import torch.distributed as dist

    import oocmetrics

    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    import dask

    # dask imports its scheduler machinery (distributed, when installed) at its first compute: a
    # one-time ~0.4 s a training run pays in its first epoch only; pay it before timing, in both runs
    dask.compute(dask.delayed(int)(0))
    epoch = SyntheticEpoch(batches)
    n = batches * ROWS - 1  # odd: the sampler pads one copy of sample 0 for 2 ranks
    total = -(-n // world) * world
    mine = [i % n for i in range(rank, total, world)]  # DistributedSampler(shuffle=False)
    t0 = time.perf_counter()
    with oocmetrics.Recorder(store, "val", mode="overwrite") as rec:
        cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for a in range(0, len(mine), ROWS):
            idx = mine[a:a + ROWS]
            rows_t, rows_p = [], []
            for i in idx:
                b = i // ROWS
                if b not in cache:
                    if len(cache) > 2 * world + 2:
                        cache.pop(min(cache))
                    cache[b] = epoch.batch(b)
                rows_t.append(cache[b][0][i % ROWS])
                rows_p.append(cache[b][1][i % ROWS])
            rec.update(np.stack(rows_t), np.stack(rows_p), ids=np.asarray(idx))
        t1, last_update = time.perf_counter(), time.time()
        res = rec.compute()
        t2, done = time.perf_counter(), time.time()
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world": world, "rows_recorded": len(mine), "record_s": t1 - t0, "compute_s": t2 - t1,
        "last_update_at": last_update, "done_at": done,
        "peak_rss": oocmetrics.peak_rss_bytes(), "metrics": res.to_dict(),
    }))
    if world > 1:
        dist.destroy_process_group()


def run(world: int, batches: int, work: Path) -> list[dict]:
    store, out = work / f"store{world}", work / f"out{world}"
    out.mkdir(parents=True, exist_ok=True)
    init = work / f"init{world}"
    init.unlink(missing_ok=True)
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(store), str(out), str(r), str(world),
                               str(init), str(batches)], env=env) for r in range(world)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"a worker of the {world}-process run failed: exit codes {codes}")
    shutil.rmtree(store, ignore_errors=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=SEED_BATCHES, help="batches of 16 in the epoch")
    ap.add_argument("--quick", action="store_true", help="1,000 batches")
    ap.add_argument("--world", type=int, default=2, help="ranks of the DDP run")
    ap.add_argument("--out", default="bench_out", help="directory for ddp.json (stores are written there, then deleted)")
    ap.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        store, out, rank, world, init, batches = args.worker
        worker(store, out, int(rank), int(world), init, int(batches))
        return 0
    batches = 1000 if args.quick else args.batches
    out = Path(args.out)
    work = out / "ddp_work"
    one = run(1, batches, work)[0]
    ranks = run(args.world, batches, work)
    shutil.rmtree(work, ignore_errors=True)
    ref = one["metrics"]["overall"]
    worst = max(rel_error(r["metrics"]["overall"][k], v) for r in ranks for k, v in ref.items())
    agree = all(r["metrics"]["overall"] == ranks[0]["metrics"]["overall"] for r in ranks)
    # the epoch end as a user sees it: from the last update on any rank until every rank has its result
    # (a rank that finished its updates early waits in the collective: that wait is not merge cost)
    ddp_compute = max(r["done_at"] for r in ranks) - max(r["last_update_at"] for r in ranks)
    print(f"epoch: {batches} batches of (16, 500, 20) float32 = {batches * ROWS - 1} samples, "
          f"{2 * 4 * 16 * 500 * 20 * batches / 1e9:.1f} GB")
    print(f"{'run':<22}{'rows recorded':>14}{'compute() s':>13}{'peak RSS':>10}{'duplicates':>12}")
    print(f"{'1 process':<22}{one['rows_recorded']:>14}{one['compute_s']:>13.3f}{fmt_bytes(one['peak_rss']):>10}"
          f"{one['metrics']['duplicate_rows']:>12}")
    for r in ranks:
        print(f"{'DDP rank ' + str(r['rank']) + ' of ' + str(args.world):<22}{r['rows_recorded']:>14}"
              f"{r['compute_s']:>13.3f}{fmt_bytes(r['peak_rss']):>10}{r['metrics']['duplicate_rows']:>12}")
    print(f"epoch end under DDP, from the last update on any rank to every rank's result: {ddp_compute:.3f} s")
    print(f"merge: {ddp_compute - one['compute_s']:+.3f} s over one process's compute() "
          f"({ddp_compute / max(one['compute_s'], 1e-9):.2f}x); peak RSS per rank "
          f"{fmt_bytes(max(r['peak_rss'] for r in ranks))} vs {fmt_bytes(one['peak_rss'])}; "
          f"ranks agree bit for bit: {agree}; worst relative difference to one process: {worst:.1e}")
    write_json(out / "ddp.json", {
        "machine": machine_info(), "batches": batches, "world": args.world, "one_process": one, "ranks": ranks,
        "ddp_compute_s": ddp_compute, "extra_compute_s": ddp_compute - one["compute_s"],
        "ranks_agree": agree, "max_rel_diff": worst,
    })
    print(f"wrote {out / 'ddp.json'}")
    return 0 if agree and worst <= 1e-12 else 1


if __name__ == "__main__":
    sys.exit(main())
