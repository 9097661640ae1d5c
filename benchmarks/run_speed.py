"""Ingestion and epoch-end speed of oocmetrics against the seed's patterns, torchmetrics and zarr.

Per-batch cost on the training thread, for (16, 500, 20) float32 (y_true, y_pred) batches, 1.28 MB
a pair:

* ``memcpy`` (the unit): one ``np.copyto`` of each array into a 16 MiB ring buffer, the least any
  recorder that keeps the data must do (``memcpy_paced``: the same with a 2 ms sleep between
  batches, the unit for the paced run below);
* ``seed_view``: ``list.append(t.detach().cpu().numpy())`` -- on a CPU tensor ``.numpy()`` is a
  view, so this costs nothing here (on a GPU it is a device-to-host copy), but it keeps every
  batch's tensor alive and records garbage if the loop reuses its output buffers;
* ``seed_copy``: the same with ``.copy()`` (allocation + page faults + copy);
* ``torchmetrics``: streaming ``update`` of MeanSquaredError + R2Score + PearsonCorrCoef;
* ``oocmetrics``: ``Recorder.update`` at default settings; ingestion = bytes / (updates + flush);
  ``oocmetrics_warm``: the same right after pre-touching as much memory as it will write (see
  ``pretouch``: on this VM the first touch of memory freed earlier is slow); ``oocmetrics_paced``: the same with a 2 ms simulated training step between batches, so the
  background writer keeps up (the cost a real loop sees);
* ``zarr_append``: ``zarr.Array.append`` per batch into zarr v3 arrays at zarr's defaults (auto
  chunks, which are (1, 500, 20) here, and zstd) -- the naive store; ``zarr_append_batchchunk_nocodec``:
  its best case, one chunk per batch and no codec;
* ``zarr_whole_chunks_warm`` (the ingestion target's baseline): zarr alone writing the same bytes as
  whole 8 MiB chunks (the Recorder's default layout), right after the warm ingestion.

Targets (the guide's aims; each a ratio within one run): ingestion >= 90% of zarr's whole-chunk
writes of the same bytes; ``update`` <= 2x a memcpy of the batch; ``compute()`` < 1 s after the last
``update``; a recompute from the data >= 4 GB/s.

Epoch end, at sizes that fit in RAM: ``Recorder.compute()`` against NumPy in RAM
(``np.concatenate`` of the lists + ``numpy_metrics``) and against loading the stored arrays with
zarr + ``numpy_metrics``; each NumPy path runs twice (the first pays for fresh memory), the
ratios use its faster run. Machine figures measured in the same run: memcpy, filling fresh memory,
writing a 1 GiB file with and without fsync, zarr whole-chunk writes. Everything runs ``--repeat``
times (default 3); ratios are taken within a run and the report gives their median (shared, noisy
machines: compare ratios, not absolute numbers).

    python benchmarks/run_speed.py --quick                   # CI, ~15 s, one run
    flock /tmp/oocm-heavy.lock python benchmarks/run_speed.py --out bench_out/speed

Outputs under ``--out``: ``speed.json``, ``speed.png`` and a table on stdout.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BATCH_SHAPE, GB, MB, SyntheticEpoch, machine_info, rel_error, write_json  # noqa: E402

PAIR_BYTES = 2 * 4 * int(np.prod(BATCH_SHAPE))  # y_true + y_pred of one batch
TARGETS = {
    "ingestion_vs_zarr_chunks": 0.9,  # >= 90% of zarr's own whole-chunk writes of the same bytes, same disk, same run
    "update_vs_memcpy": 2.0,  # <= 2x one memcpy of the batch
    "compute_after_last_update_s": 1.0,  # compute() from stored partials, timed from the last update
    "recompute_gbps": 4.0,  # compute(source="data"): a full pass over the stored data
}


# ----------------------------------------------------------------------------------------------
# machine figures
# ----------------------------------------------------------------------------------------------
def measure_memcpy(nbytes: int, repeats: int) -> float:
    """GB/s of np.copyto between two large float32 arrays (bytes copied / time), median of repeats."""
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in
    times = []
    for _ in range(repeats):
        c0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - c0)
    return nbytes / float(np.median(times)) / GB


def measure_first_touch(nbytes: int) -> float:
    """GB/s of filling freshly allocated memory (np.ones): page faults, plus this VM's first touch."""
    c0 = time.perf_counter()
    a = np.ones(nbytes // 8)
    dt = time.perf_counter() - c0
    del a
    return nbytes / dt / GB


def pretouch(nbytes: int) -> None:
    """Allocate, fill and free ``nbytes``: the guest's memory is backed again for a few seconds.

    On this machine (a VM with virtio_balloon free page reporting) memory freed by any process is
    handed back to the host within seconds, and the next first touch of a page -- anonymous memory
    or page cache -- runs at ~0.5 GB/s. Measurements labelled "warm" run right after this.
    """
    a = np.ones(nbytes // 8)
    del a


def measure_zarr_chunk_write(path: Path, nbytes: int) -> float:
    """GB/s of writing whole 16 MiB chunks into a preallocated zarr v3 array, no codec, one thread.

    The ceiling for a chunk-aligned writer through zarr (what oocmetrics' ChunkWriter does).
    """
    import zarr

    rows = (16 << 20) // (PAIR_BYTES // 2 // BATCH_SHAPE[0])
    chunk = np.random.default_rng(0).random((rows, *BATCH_SHAPE[1:]), dtype=np.float32)
    n = max(1, nbytes // chunk.nbytes)
    arr = zarr.create_array(store=str(path), shape=(n * rows, *BATCH_SHAPE[1:]), chunks=chunk.shape,
                            dtype="float32", compressors=None, fill_value=0.0)
    c0 = time.perf_counter()
    for i in range(n):
        arr[i * rows : (i + 1) * rows] = chunk
    dt = time.perf_counter() - c0
    shutil.rmtree(path, ignore_errors=True)
    return n * chunk.nbytes / dt / GB


def zarr_whole_chunks(path: Path, pool: list[tuple[Any, Any]], n: int) -> dict[str, float]:
    """zarr alone writing the bytes of ``n`` batch pairs as whole 8 MiB chunks (the Recorder's default
    chunk, no codec, preallocated y_true / y_pred arrays, one thread), data copied from the same batch
    pool into one chunk buffer per array as the Recorder does: the ceiling a chunk writer through zarr
    can reach on this disk. Wall clock, GB/s of y_true + y_pred."""
    import zarr

    rows = n * BATCH_SHAPE[0]
    chunk_rows = (8 << 20) // (PAIR_BYTES // 2 // BATCH_SHAPE[0])
    arrs = [zarr.create_array(store=str(path / a), shape=(rows, *BATCH_SHAPE[1:]), chunks=(chunk_rows, *BATCH_SHAPE[1:]),
                              dtype="float32", compressors=None, fill_value=0.0, config={"write_empty_chunks": True})
            for a in ("y_true", "y_pred")]
    bufs = [np.empty((chunk_rows, *BATCH_SHAPE[1:]), np.float32) for _ in arrs]
    c0 = time.perf_counter()
    fill, start, b = 0, 0, 0
    for i in range(n):
        t, p = pool[i % len(pool)]
        src = (t.numpy(), p.numpy())
        done = 0
        while done < BATCH_SHAPE[0]:
            k = min(BATCH_SHAPE[0] - done, chunk_rows - fill)
            for buf, x in zip(bufs, src):
                buf[fill:fill + k] = x[done:done + k]
            fill, done = fill + k, done + k
            if fill == chunk_rows or (i == n - 1 and done == BATCH_SHAPE[0]):
                for arr, buf in zip(arrs, bufs):
                    arr[start:start + fill] = buf[:fill]
                start, fill, b = start + fill, 0, b + 1
    dt = time.perf_counter() - c0
    shutil.rmtree(path, ignore_errors=True)
    return {"wall_s": dt, "MBps": n * PAIR_BYTES / dt / 1e6, "chunks": b}


def measure_disk_write(path: Path, nbytes: int, fsync: bool) -> float:
    """GB/s writing ``nbytes`` in 16 MiB blocks (with a final fsync when asked); file removed after."""
    block = np.random.default_rng(0).integers(0, 255, 16 << 20, dtype=np.uint8).tobytes()
    n_blocks = max(1, nbytes // len(block))
    c0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(n_blocks):
            f.write(block)
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    dt = time.perf_counter() - c0
    path.unlink()
    return n_blocks * len(block) / dt / GB


# ----------------------------------------------------------------------------------------------
# per-batch costs
# ----------------------------------------------------------------------------------------------
def stats(times: np.ndarray, wall: float | None = None) -> dict[str, float]:
    total = float(times.sum()) if wall is None else wall
    return {
        "n": int(times.size),
        "median_ms": float(np.median(times) * 1e3),
        "mean_ms": float(times.mean() * 1e3),
        "p90_ms": float(np.percentile(times, 90) * 1e3),
        "p99_ms": float(np.percentile(times, 99) * 1e3),
        "max_ms": float(times.max() * 1e3),
        "total_s": total,
        "MBps": times.size * PAIR_BYTES / total / MB,
    }


def time_calls(fn: Callable[[Any, Any], None], pool: list[tuple[Any, Any]], n: int,
               after: Callable[[int], None] | None = None, step_s: float = 0.0) -> np.ndarray:
    """Time ``fn(y_true, y_pred)`` per call over ``n`` batches cycled from ``pool``."""
    times = np.empty(n)
    clock = time.perf_counter
    for i in range(n):
        t, p = pool[i % len(pool)]
        c0 = clock()
        fn(t, p)
        times[i] = clock() - c0
        if after is not None:
            after(i)
        if step_s:
            time.sleep(step_s)  # the simulated training step: the GIL and a core are free meanwhile
    return times


def warm_up(work: Path) -> None:
    """Load oocmetrics' compiled kernels once, as a training run would before its first epoch."""
    import oocmetrics

    t = np.random.default_rng(1).normal(size=(64, 500, 20)).astype(np.float32)
    oocmetrics.compute_arrays(t, t * 0.5)
    with oocmetrics.Recorder(work / "warm-up", split="warm", mode="overwrite") as rec:
        rec.update(t, t * 0.5)
        rec.compute()
    shutil.rmtree(work / "warm-up", ignore_errors=True)


def bench_per_batch(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch
    import torchmetrics
    import zarr

    import oocmetrics

    torch.set_grad_enabled(False)
    warm_up(work)
    gen = SyntheticEpoch(args.pool_batches, seed=args.seed)
    np_pool = [gen.batch(i) for i in range(args.pool_batches)]  # 16 distinct batches: 20 MB, beyond L2
    pool = [(torch.from_numpy(t), torch.from_numpy(p)) for t, p in np_pool]
    n = args.batches
    out: dict[str, Any] = {}

    # the unit: one memcpy of the batch (both arrays) into a 16 MiB ring, as a chunk buffer
    slots = max(1, (16 << 20) // (PAIR_BYTES // 2))
    ring_t = np.empty((slots, *BATCH_SHAPE), np.float32)
    ring_p = np.empty_like(ring_t)
    ring_t.fill(0)
    ring_p.fill(0)
    k = [0]

    def memcpy(t, p):
        s = k[0] % slots
        np.copyto(ring_t[s], t.numpy())
        np.copyto(ring_p[s], p.numpy())
        k[0] += 1

    out["memcpy"] = stats(time_calls(memcpy, pool, n))
    n_paced = min(n, args.paced_batches)
    out["memcpy_paced"] = {**stats(time_calls(memcpy, pool, n_paced, step_s=args.step_ms / 1e3)), "step_ms": args.step_ms}
    del out["memcpy_paced"]["MBps"]  # includes the simulated steps: not a throughput
    del ring_t, ring_p

    lt: list[np.ndarray] = []
    lp: list[np.ndarray] = []

    def clear(i: int) -> None:  # bound the benchmark's memory; the seed never clears
        if i % 256 == 255:
            lt.clear()
            lp.clear()

    def seed_view(t, p):
        lt.append(t.detach().cpu().numpy())
        lp.append(p.detach().cpu().numpy())

    def seed_copy(t, p):
        lt.append(t.detach().cpu().numpy().copy())
        lp.append(p.detach().cpu().numpy().copy())

    out["seed_view"] = stats(time_calls(seed_view, pool, n, clear))
    lt.clear(), lp.clear()
    out["seed_copy"] = stats(time_calls(seed_copy, pool, n, clear))
    lt.clear(), lp.clear()
    gc.collect()

    tm = [torchmetrics.MeanSquaredError(), torchmetrics.R2Score(),
          torchmetrics.PearsonCorrCoef(num_outputs=BATCH_SHAPE[-1])]

    def tm_update(t, p):
        p2, t2 = p.reshape(-1, BATCH_SHAPE[-1]), t.reshape(-1, BATCH_SHAPE[-1])
        for m in tm:
            m.update(p2, t2)  # torchmetrics takes (preds, target)

    out["torchmetrics"] = stats(time_calls(tm_update, pool, n))
    tm_res = {type(m).__name__: float(m.compute().mean()) for m in tm}

    def ingest(name: str, *, warm: bool) -> tuple[dict[str, float], list[float]]:
        """oocmetrics at default settings: ingestion = updates + flush, wall clock."""
        root = work / name
        rec = oocmetrics.Recorder(root, split="speed", mode="overwrite")
        if warm:  # back the page cache it will fill first (see pretouch)
            pretouch(int(1.2 * n * PAIR_BYTES))
        c0 = time.perf_counter()
        times = time_calls(rec.update, pool, n)
        c1 = time.perf_counter()
        rec.flush()
        c2 = time.perf_counter()
        rec.close()
        shutil.rmtree(root, ignore_errors=True)
        return {**stats(times, wall=c2 - c0), "flush_s": c2 - c1}, times

    out["oocmetrics"], times = ingest("ooc-ingest", warm=False)
    out["oocmetrics"]["first_update_ms"] = times[0] * 1e3
    out["oocmetrics_warm"], _ = ingest("ooc-ingest-warm", warm=True)
    # the baseline of the same bytes: zarr writing whole chunks of the Recorder's default layout
    pretouch(int(1.2 * n * PAIR_BYTES))
    out["zarr_whole_chunks_warm"] = zarr_whole_chunks(work / "zarr-whole", pool, n)

    root = work / "ooc-paced"
    rec = oocmetrics.Recorder(root, split="speed", mode="overwrite")
    times = time_calls(rec.update, pool, n_paced, step_s=args.step_ms / 1e3)
    rec.close()
    shutil.rmtree(root, ignore_errors=True)
    out["oocmetrics_paced"] = {**stats(times), "step_ms": args.step_ms}
    del out["oocmetrics_paced"]["MBps"]  # includes the simulated steps: not a throughput

    # the naive store: zarr v3 defaults (auto chunks, zstd), and its best case (one chunk per batch, no codec)
    for name, chunks, codecs in (("zarr_append", "auto", "auto"), ("zarr_append_batchchunk_nocodec", BATCH_SHAPE, None)):
        d = work / name
        arrs = [zarr.create_array(store=str(d / a), shape=(0, *BATCH_SHAPE[1:]), chunks=chunks,
                                  dtype="float32", compressors=codecs) for a in ("y_true", "y_pred")]

        def append(t, p, arrs=arrs):
            arrs[0].append(t.numpy(), axis=0)
            arrs[1].append(p.numpy(), axis=0)

        times = time_calls(append, pool, args.zarr_batches)
        assert arrs[0].shape[0] == args.zarr_batches * BATCH_SHAPE[0]
        out[name] = {**stats(times), "chunks": list(arrs[0].chunks), "codecs": str(arrs[0].compressors)}
        shutil.rmtree(d, ignore_errors=True)
    out["_torchmetrics_values"] = tm_res
    return out


# ----------------------------------------------------------------------------------------------
# epoch-end compute
# ----------------------------------------------------------------------------------------------
def bench_compute(args: argparse.Namespace, work: Path, n: int) -> dict[str, Any]:
    import zarr

    import oocmetrics
    from baselines import numpy_metrics

    epoch = SyntheticEpoch(n, seed=args.seed)
    root = work / f"ooc-compute-{n}"
    rec = oocmetrics.Recorder(root, split="val", mode="overwrite")
    lt, lp = [], []
    for i in range(n):
        t, p = epoch.batch(i)
        rec.update(t, p)
        lt.append(t)  # fresh arrays every batch: the seed's lists
        lp.append(p)
    # no flush first: compute() is timed from the last update, writing the last chunks included
    r: dict[str, Any] = {"n_batches": n, "data_bytes": epoch.nbytes}

    c0 = time.perf_counter()
    res = rec.compute()  # merges the partials the writer stored with each chunk
    r["ooc_compute_s"] = time.perf_counter() - c0
    r["ooc_compute_source"] = res.extra.get("source")
    ooc = dict(res.overall)
    c0 = time.perf_counter()
    res_data = rec.compute(source="data")  # the same metrics recomputed from the stored data
    r["ooc_recompute_s"] = time.perf_counter() - c0
    r["ooc_recompute_GBps"] = epoch.nbytes / GB / r["ooc_recompute_s"]
    r["partials_equal_data_bitwise"] = all(
        np.array_equal(res.per_output[k], res_data.per_output[k], equal_nan=True) for k in res.per_output)

    # NumPy in RAM, twice: on this VM the first pass over freshly allocated memory pays a first-touch
    # cost (see figures["first_touch_GBps"]); the second reuses just-freed pages. Both are reported;
    # the ratios use the faster one (the baseline's best case).
    firsts: dict[str, float] = {}
    for rep in range(2):
        c0 = time.perf_counter()
        yt, yp = np.concatenate(lt), np.concatenate(lp)
        c1 = time.perf_counter()
        ref = numpy_metrics(yt, yp)
        c2 = time.perf_counter()
        cur = {"numpy_concat_s": c1 - c0, "numpy_metrics_s": c2 - c1, "numpy_concat_compute_s": c2 - c0}
        if rep == 0:
            firsts = cur
            del yt, yp
        else:
            r.update(cur if cur["numpy_concat_compute_s"] <= firsts["numpy_concat_compute_s"] else firsts)
    r["numpy_concat_compute_first_s"] = firsts["numpy_concat_compute_s"]
    c0 = time.perf_counter()
    oocmetrics.compute_arrays(yt, yp)
    r["ooc_kernels_in_ram_s"] = time.perf_counter() - c0
    del yt, yp, lt, lp
    rec.close()
    gc.collect()

    # NumPy after loading the stored arrays with zarr (what a user of the store would do), twice
    g = zarr.open_group(str(root), mode="r")[f"val/epoch={res.epoch}"]
    loads = []
    for rep in range(2):
        c0 = time.perf_counter()
        yt, yp = g["y_true"][: res.n_rows], g["y_pred"][: res.n_rows]
        c1 = time.perf_counter()
        ref2 = numpy_metrics(yt, yp)
        c2 = time.perf_counter()
        loads.append((c2 - c0, c1 - c0))
        del yt, yp
    r["numpy_load_compute_first_s"] = loads[0][0]
    r["numpy_load_compute_s"], r["numpy_load_s"] = min(loads)
    shutil.rmtree(root, ignore_errors=True)
    r["max_rel_diff_vs_numpy"] = max(rel_error(ooc[k], ref[k]) for k in ref)
    r["max_rel_diff_numpy_load"] = max(rel_error(ref2[k], ref[k]) for k in ref)
    gb = epoch.nbytes / GB
    r["ooc_GBps"] = gb / r["ooc_compute_s"]
    r["numpy_concat_compute_GBps"] = gb / r["numpy_concat_compute_s"]
    r["numpy_load_compute_GBps"] = gb / r["numpy_load_compute_s"]
    r["speedup_vs_concat_compute"] = r["numpy_concat_compute_s"] / r["ooc_compute_s"]
    r["speedup_vs_load_compute"] = r["numpy_load_compute_s"] / r["ooc_compute_s"]
    return r


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def _t(target: str, value: float, unit: str, goal: float, higher_is_better: bool = True) -> dict[str, Any]:
    met = value >= goal if higher_is_better else value <= goal
    return {"target": target, "value": value, "unit": unit, "goal": goal, "better": "higher" if higher_is_better
            else "lower", "met": bool(met)}


def targets(pb: dict[str, Any], comp: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = [_t("ingestion >= 90% of zarr's own whole-chunk writes of the same bytes (default settings, updates + "
               "flush, warm page cache, same run)", pb["oocmetrics_warm"]["MBps"] / pb["zarr_whole_chunks_warm"]["MBps"],
               "x", TARGETS["ingestion_vs_zarr_chunks"])]
    g = TARGETS["update_vs_memcpy"]
    rows.append(_t("update <= 2x memcpy of the batch (median, back-to-back)",
                   pb["oocmetrics"]["median_ms"] / pb["memcpy"]["median_ms"], "x", g, False))
    rows.append(_t("update <= 2x memcpy of the batch (mean incl. backpressure waits, back-to-back)",
                   pb["oocmetrics"]["mean_ms"] / pb["memcpy"]["mean_ms"], "x", g, False))
    rows.append(_t("update <= 2x memcpy of the batch (median, both with a 2 ms step between batches)",
                   pb["oocmetrics_paced"]["median_ms"] / pb["memcpy_paced"]["median_ms"], "x", g, False))
    rows.append(_t("update <= 2x memcpy of the batch (mean, both with a 2 ms step between batches)",
                   pb["oocmetrics_paced"]["mean_ms"] / pb["memcpy_paced"]["mean_ms"], "x", g, False))
    for c in comp:
        rows.append(_t(f"compute() from stored partials < 1 s after the last update, {c['n_batches']} batches",
                       c["ooc_compute_s"], "s", TARGETS["compute_after_last_update_s"], False))
        rows.append(_t(f"recompute from data (compute(source='data')) >= 4 GB/s, {c['n_batches']} batches",
                       c["ooc_recompute_GBps"], "GB/s", TARGETS["recompute_gbps"]))
    return rows


PER_BATCH_ROWS = ("memcpy", "memcpy_paced", "seed_view", "seed_copy", "torchmetrics", "oocmetrics", "oocmetrics_warm",
                  "oocmetrics_paced", "zarr_append", "zarr_append_batchchunk_nocodec")


def print_report(fig: dict[str, float], pb: dict[str, Any], comp: list[dict[str, Any]], tg: list[dict[str, Any]]) -> list[str]:
    L = [
        f"machine: memcpy {fig['memcpy_GBps']:.1f} GB/s; first touch of fresh memory {fig['first_touch_GBps']:.2f} GB/s; "
        f"disk write (page cache) {fig['disk_write_GBps']:.2f} GB/s as found, {fig['disk_write_warm_GBps']:.2f} GB/s warm; "
        f"with fsync {fig['disk_write_fsync_GBps']:.2f} / {fig['disk_write_fsync_warm_GBps']:.2f} GB/s; "
        f"zarr whole-chunk writes (16 MiB, no codec, warm) {fig['zarr_chunk_write_warm_GBps']:.2f} GB/s",
        "",
        f"{'per (16,500,20) f32 batch pair':<34}{'median':>10}{'mean':>10}{'p99':>10}{'MB/s':>10}{'x memcpy':>10}",
    ]
    z = pb["zarr_whole_chunks_warm"]
    L.insert(1, f"zarr alone, whole 8 MiB chunks of the same {z['MBps'] * z['wall_s'] / 1e3:.2f} GB (warm): "
                f"{z['MBps'] / 1e3:.2f} GB/s; oocmetrics ingestion (warm) {pb['oocmetrics_warm']['MBps'] / 1e3:.2f} GB/s")
    for name in PER_BATCH_ROWS:
        s = pb[name]
        mbps = f"{s['MBps']:.0f}" if "MBps" in s else "-"
        unit = pb["memcpy_paced" if name.endswith("_paced") else "memcpy"]["median_ms"]
        L.append(f"{name:<34}{s['median_ms']:>8.3f}ms{s['mean_ms']:>8.3f}ms{s['p99_ms']:>8.3f}ms{mbps:>10}"
                 f"{s['median_ms'] / unit:>9.1f}x")
    L += ["", f"{'epoch-end compute':<18}{'data':>9}{'oocmetrics':>12}{'recompute':>10}{'GB/s':>6}{'bitwise':>8}"
              f"{'concat+np':>11}{'(1st run)':>10}{'load+np':>9}"
              f"{'(1st run)':>10}{'kernels/RAM':>12}{'vs concat':>10}{'vs load':>9}{'max rel diff':>13}"]
    for c in comp:
        L.append(f"{c['n_batches']:>10} batches{c['data_bytes'] / GB:>7.2f}GB{c['ooc_compute_s']:>11.2f}s"
                 f"{c.get('ooc_recompute_s', float('nan')):>9.2f}s{c.get('ooc_recompute_GBps', float('nan')):>6.2f}"
                 f"{'same' if c.get('partials_equal_data_bitwise') else 'DIFF':>8}"
                 f"{c['numpy_concat_compute_s']:>10.2f}s{c['numpy_concat_compute_first_s']:>9.2f}s"
                 f"{c['numpy_load_compute_s']:>8.2f}s{c['numpy_load_compute_first_s']:>9.2f}s"
                 f"{c['ooc_kernels_in_ram_s']:>11.2f}s"
                 f"{c['speedup_vs_concat_compute']:>9.1f}x{c['speedup_vs_load_compute']:>8.1f}x{c['max_rel_diff_vs_numpy']:>13.1e}")
    L += ["", "targets:"]
    for t in tg:
        L.append(f"  [{'met' if t['met'] else 'NOT met'}] {t['target']}: {t['value']:.2f} {t['unit']} (goal {t['goal']:g})")
    for line in L:
        print(line)
    return L


def plot(fig_: dict[str, float], pb: dict[str, Any], comp: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    names = list(PER_BATCH_ROWS)
    vals = [pb[n]["median_ms"] for n in names]
    colors = {"memcpy": "gray", "seed": "tab:orange", "torchmetrics": "tab:purple", "oocmetrics": "tab:blue",
              "zarr": "tab:red"}
    bars = ax1.barh(names, vals, color=[next(c for k, c in colors.items() if n.startswith(k)) for n in names])
    ax1.scatter([pb[n]["mean_ms"] for n in names], names, marker="|", s=150, color="k", zorder=3,
                label="mean (incl. backpressure waits)")
    ax1.legend(fontsize=8, loc="upper right")
    ax1.set_xscale("log")
    ax1.invert_yaxis()
    ax1.bar_label(bars, labels=[f"{v:.3g} ms" for v in vals], fontsize=8, padding=2)
    ax1.set_xlabel("median time per (16, 500, 20) float32 batch pair on the training thread (ms)")
    ax1.set_title(f"Per-batch update cost (memcpy {fig_['memcpy_GBps']:.1f} GB/s)")
    ax1.grid(True, axis="x", which="both", alpha=0.3)
    if comp:
        x = np.arange(len(comp))
        w = 0.27
        for j, (key, label) in enumerate((("ooc_compute_s", "oocmetrics compute()"),
                                          ("numpy_concat_compute_s", "NumPy: concatenate + compute"),
                                          ("numpy_load_compute_s", "NumPy: load store + compute"))):  # faster run
            ax2.bar(x + (j - 1) * w, [c[key] for c in comp], w, label=label)
        for j, key in ((1, "numpy_concat_compute_first_s"), (2, "numpy_load_compute_first_s")):
            ax2.bar(x + (j - 1) * w, [c[key] for c in comp], w, fill=False, edgecolor="gray", ls="--",
                    label="first run (fresh memory)" if j == 1 else None)
        ax2.set_xticks(x, [f"{c['n_batches']} batches\n{c['data_bytes'] / GB:.2f} GB" for c in comp])
        ax2.set_ylabel("epoch-end time (s)")
        ax2.set_title("Epoch-end metrics (all 9), data in page cache")
        ax2.legend(fontsize=8)
        ax2.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench_out", help="output directory (default: bench_out/)")
    ap.add_argument("--quick", action="store_true", help="small sizes for CI (~20 s)")
    ap.add_argument("--batches", type=int, help="batches per per-batch measurement (default 2000; quick 60)")
    ap.add_argument("--zarr-batches", type=int, help="batches for zarr's per-batch append (default 40; quick 4)")
    ap.add_argument("--paced-batches", type=int, default=500, help="batches of the paced oocmetrics run")
    ap.add_argument("--step-ms", type=float, default=2.0, help="simulated training step of the paced run (ms)")
    ap.add_argument("--pool-batches", type=int, default=16, help="distinct input batches cycled through")
    ap.add_argument("--compute-sizes", type=int, nargs="*", help="epoch sizes for compute (default 500 3000; quick 20)")
    ap.add_argument("--disk-mb", type=int, help="file size for the disk-write figure (default 1024; quick 64)")
    ap.add_argument("--memcpy-mb", type=int, help="array size for the memcpy figure (default 256; quick 32)")
    ap.add_argument("--repeat", type=int, help="runs of everything; the report gives medians (default 3; quick 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--replot", action="store_true", help="redraw the table and plot from --out/speed.json")
    args = ap.parse_args(argv)
    q = args.quick
    for name, full, quick in (("batches", 2000, 60), ("zarr_batches", 40, 4), ("compute_sizes", [500, 3000], [20]),
                              ("repeat", 3, 1),
                              ("disk_mb", 1024, 64), ("memcpy_mb", 256, 32)):
        if getattr(args, name) is None:
            setattr(args, name, quick if q else full)
    if q:
        args.paced_batches = min(args.paced_batches, 30)
    return args


def measure_figures(args: argparse.Namespace, work: Path) -> dict[str, float]:
    disk = args.disk_mb << 20
    settle = 0 if args.quick else 5  # let freed memory go back to the host: "as found" = not pre-touched
    figs = {"memcpy_GBps": measure_memcpy(args.memcpy_mb << 20, 3 if args.quick else 7)}
    time.sleep(settle)
    figs["disk_write_GBps"] = measure_disk_write(work / "disk.bin", disk, fsync=False)
    figs["disk_write_fsync_GBps"] = measure_disk_write(work / "disk.bin", disk, fsync=True)
    time.sleep(settle)
    figs["first_touch_GBps"] = measure_first_touch(disk)
    pretouch(2 * disk)
    figs["zarr_chunk_write_warm_GBps"] = measure_zarr_chunk_write(work / "zarr-chunks", disk)
    pretouch(2 * disk)
    figs["disk_write_warm_GBps"] = measure_disk_write(work / "disk.bin", disk, fsync=False)
    pretouch(2 * disk)
    figs["disk_write_fsync_warm_GBps"] = measure_disk_write(work / "disk.bin", disk, fsync=True)
    return figs


def median_tree(items: list[Any]) -> Any:
    """Element-wise median of numeric leaves across runs of the same structure (others: first run's)."""
    first = items[0]
    if isinstance(first, dict):
        return {k: median_tree([it[k] for it in items]) for k in first}
    if isinstance(first, list):
        return [median_tree([it[i] for it in items]) for i in range(len(first))]
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return float(np.median(items)) if isinstance(first, float) else int(np.median(items))
    return first


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.replot:
        doc = json.loads((out / "speed.json").read_text())
        print_report(doc["figures"], doc["per_batch"], doc["compute"], doc["targets"])
        plot(doc["figures"], doc["per_batch"], doc["compute"], out / "speed.png")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    info = machine_info()
    runs = []
    with tempfile.TemporaryDirectory(prefix="run_speed-", dir=out) as tmp:
        work = Path(tmp)
        for rep in range(args.repeat):
            figs = measure_figures(args, work)
            pb = bench_per_batch(args, work)
            comp = [bench_compute(args, work, n) for n in args.compute_sizes]
            tm_values = pb.pop("_torchmetrics_values")
            runs.append({"figures": figs, "per_batch": pb, "compute": comp, "targets": targets(pb, comp)})
            if args.repeat > 1:
                print(f"  run {rep + 1}/{args.repeat}: " + ", ".join(
                    f"{t['value']:.2f}{t['unit']}" for t in runs[-1]["targets"]), flush=True)
    # ratios are taken within each run (machines are noisy); the report gives their median over runs
    agg = median_tree([{k: r[k] for k in ("figures", "per_batch", "compute")} for r in runs])
    tg = []
    for i, t in enumerate(runs[0]["targets"]):
        vals = [r["targets"][i]["value"] for r in runs]
        med = float(np.median(vals))
        tg.append({**t, "value": med, "runs": vals,
                   "met": bool(med >= t["goal"] if t["better"] == "higher" else med <= t["goal"])})
    print(f"\n# run_speed: {args.batches} batches per method ({args.zarr_batches} for zarr), compute at "
          f"{args.compute_sizes} batches; median of {args.repeat} run(s); {info['cpu_count']} cores\n")
    lines = print_report(agg["figures"], agg["per_batch"], agg["compute"], tg)
    doc = {
        "benchmark": "run_speed",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "config": {k: v for k, v in vars(args).items() if k != "out"} | {"batch_shape": BATCH_SHAPE,
                                                                          "pair_bytes": PAIR_BYTES},
        "machine": info,
        "figures": agg["figures"],
        "per_batch": agg["per_batch"],
        "compute": agg["compute"],
        "targets": tg,
        "runs": runs,
        "torchmetrics_values": tm_values,
        "wall_s": time.perf_counter() - t0,
        "table": lines,
    }
    write_json(out / "speed.json", doc)
    plot(agg["figures"], agg["per_batch"], agg["compute"], out / "speed.png")
    print(f"\nwrote {out / 'speed.json'} and {out / 'speed.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
