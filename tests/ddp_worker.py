"""One rank of a DDP test run (launched by tests/test_ddp.py, one process per rank, gloo on CPU).

    python tests/ddp_worker.py STORE OUT RANK WORLD INIT_FILE SCENARIO

Scenarios:
- ``sampler``: a dataset of N samples (not divisible by the world size) through DistributedSampler,
  shuffle off and on, uneven batches; each rank records with ids and computes (also with quantiles
  and median_absolute_error);
- ``missing_ids``: rank 0 records ids, the others do not: every rank must get the same ValueError;
- ``empty_rank``: the last rank records nothing; the others' rows are the whole epoch;
- ``damaged_rank``: a chunk file of rank 1's shard is deleted before compute(): every rank must get
  an error (rank 1 its StoreError, the others a RuntimeError naming rank 1), none may hang.
Each rank writes ``OUT/rank<r>.pkl``: its results (or the error it got).
"""
from __future__ import annotations

import datetime
import pickle
import sys
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

import oocmetrics

N = 103  # samples: not divisible by 2, 3 or 4
SHAPE = (7, 3)  # steps x outputs


def sample(i: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample i's (y_true, y_pred): a function of i only, so every copy of it is the same."""
    rng = np.random.default_rng(1000 + i)
    t = rng.normal(5.0, 2.0, SHAPE).astype(np.float32)
    if i == 0:
        t[0, 0] = 1e6  # an outlier in the first sample
    return t, (t + rng.normal(0.0, 0.5, SHAPE)).astype(np.float32)


def batches(indices: list[int], rank: int) -> list[list[int]]:
    """Uneven batches: sizes 5, 1, 7, 3, ... (shifted by rank)."""
    sizes = [5, 1, 7, 3, 4]
    out, k, i = [], rank, 0
    while i < len(indices):
        n = sizes[k % len(sizes)]
        out.append(indices[i:i + n])
        i += n
        k += 1
    return out


def record(rec: oocmetrics.Recorder, indices: list[int], rank: int, with_ids: bool = True) -> None:
    for b in batches(indices, rank):
        t = np.stack([sample(i)[0] for i in b])
        p = np.stack([sample(i)[1] for i in b])
        rec.update(torch.from_numpy(t), torch.from_numpy(p), ids=torch.tensor(b) if with_ids else None)


def main() -> int:
    store, out, rank, world, init, scenario = sys.argv[1:7]
    rank, world = int(rank), int(world)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    results: dict = {}
    try:
        if scenario == "sampler":
            for shuffle in (False, True):
                sampler = DistributedSampler(range(N), num_replicas=world, rank=rank, shuffle=shuffle, seed=7)
                split = f"val_shuffle{int(shuffle)}"
                with oocmetrics.Recorder(store, split, chunk_rows=4) as rec:
                    record(rec, list(sampler), rank)
                    r = rec.compute()
                    q = rec.compute(quantiles=(0.5, 0.9), source="data")
                    results[split] = {"metrics": r.to_dict(), "quantiles": q.to_dict(), "rows": rec.rows,
                                      "indices": list(sampler)}
                rec2 = oocmetrics.Recorder(store, split, mode="resume", chunk_rows=4, keep_epochs=None,
                                           metrics=("mse", "median_absolute_error"))
                try:
                    record(rec2, list(sampler), rank)
                    results[split]["median"] = rec2.compute().to_dict()
                finally:
                    rec2.close()
        elif scenario == "missing_ids":
            with oocmetrics.Recorder(store, "val", chunk_rows=4) as rec:
                indices = list(DistributedSampler(range(N), num_replicas=world, rank=rank, shuffle=False))
                record(rec, indices, rank, with_ids=(rank == 0))
                try:
                    rec.compute()
                    results["error"] = None
                except ValueError as exc:
                    results["error"] = str(exc)
        elif scenario == "damaged_rank":  # rank 1's store loses a chunk file: every rank gets an error, none hangs
            import zarr

            from oocmetrics.store import chunk_key

            with oocmetrics.Recorder(store, "val", chunk_rows=4) as rec:
                record(rec, list(range(rank, 40, world)), rank)
                rec.flush()
                if rank == 1:
                    arr_dir = Path(store) / "val.rank1" / "epoch=0" / "y_pred"
                    (arr_dir / chunk_key(zarr.open_array(str(arr_dir), mode="r"), 0)).unlink()
                for kwargs in ({"source": "data"}, {"quantiles": (0.5,)}):
                    try:
                        rec.compute(**kwargs)
                        results.setdefault("errors", []).append(None)
                    except (oocmetrics.StoreError, RuntimeError) as exc:
                        results.setdefault("errors", []).append(f"{type(exc).__name__}: {exc}")
        elif scenario == "empty_rank":
            with oocmetrics.Recorder(store, "val", chunk_rows=4) as rec:
                if rank < world - 1:
                    record(rec, list(range(rank, 40, world - 1)), rank)
                results["metrics"] = rec.compute(quantiles=(0.5,)).to_dict()
        else:
            raise ValueError(scenario)
    except BaseException:
        results["crash"] = traceback.format_exc()
    Path(out, f"rank{rank}.pkl").write_bytes(pickle.dumps(results))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
