"""DDP: every rank's compute() equals one process over the unique samples, and ranks agree bit for bit.

Real process groups: one process per rank (tests/ddp_worker.py), gloo on CPU, world sizes 1-4, a
dataset whose size is not divisible by the world size, DistributedSampler with shuffle off and on
(its padding records copies of the first samples), uneven batches, chunks that cut batches.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

import oocmetrics  # noqa: E402
from oocmetrics.stored import compute_stored  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORKER = Path(__file__).with_name("ddp_worker.py")
sys.path.insert(0, str(WORKER.parent))
import ddp_worker  # noqa: E402


def launch(tmp_path: Path, world: int, scenario: str) -> tuple[Path, list[dict]]:
    store, out = tmp_path / f"store-{scenario}-{world}", tmp_path / f"out-{scenario}-{world}"
    out.mkdir()
    init = tmp_path / f"init-{scenario}-{world}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(oocmetrics.__file__).parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(store), str(out), str(r), str(world), str(init), scenario],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(world)]
    logs = [p.communicate(timeout=240)[0].decode(errors="replace") for p in procs]
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} exited {p.returncode}:\n{logs[r]}"
    results = [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(world)]
    for r, res in enumerate(results):
        assert "crash" not in res, f"rank {r}:\n{res['crash']}\n{logs[r]}"
    return store, results


def reference(indices: list[int], **kwargs):
    """One process, in RAM, over the unique samples."""
    t = np.stack([ddp_worker.sample(i)[0] for i in indices])
    p = np.stack([ddp_worker.sample(i)[1] for i in indices])
    return oocmetrics.compute_arrays(t, p, **kwargs)


def assert_close(got: dict, ref, rel: float = 1e-14) -> None:
    for name, value in ref.overall.items():
        np.testing.assert_allclose(got["overall"][name], value, rtol=rel, atol=1e-300, err_msg=name)
    for name, values in ref.per_output.items():
        np.testing.assert_allclose(np.asarray(got["per_output"][name], float), values,
                                   rtol=rel, atol=1e-300, err_msg=name)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_rank_equals_one_process_over_unique_samples(tmp_path: Path, world: int) -> None:
    store, results = launch(tmp_path, world, "sampler")
    unique = list(range(ddp_worker.N))
    ref = reference(unique)
    ref_q = reference(unique, quantiles=(0.5, 0.9))
    ref_med = reference(unique, metrics=("mse", "median_absolute_error"))
    for split in ("val_shuffle0", "val_shuffle1"):
        recorded = sum(r[split]["rows"] for r in results)
        assert recorded == -(-ddp_worker.N // world) * world  # the sampler padded in copies
        seen = sorted(i for r in results for i in r[split]["indices"])
        assert sorted(set(seen)) == unique
        first = results[0][split]
        for r in results[1:]:  # every rank the same bits
            assert r[split]["metrics"] == first["metrics"]
            assert r[split]["quantiles"] == first["quantiles"]
            assert r[split]["median"] == first["median"]
        got = first["metrics"]
        assert got["n_rows"] == ddp_worker.N
        assert got["duplicate_rows"] == recorded - ddp_worker.N
        assert got["conflicting_targets"] == 0 and got["conflicting_predictions"] == 0
        assert_close(got, ref)
        # order statistics and quantiles exchange histograms: bit-equal to np.quantile over the unique rows
        assert first["quantiles"]["quantiles"]["pooled"] == ref_q.quantiles["pooled"].tolist()
        np.testing.assert_array_equal(np.asarray(first["quantiles"]["quantiles"]["per_output"]),
                                      ref_q.quantiles["per_output"])
        np.testing.assert_array_equal(first["median"]["per_output"]["median_absolute_error"],
                                      ref_med.per_output["median_absolute_error"])
        # after the fact, one process over the shards: the same bits as the run's compute()
        after = compute_stored(store, split, epoch=0)
        assert after.to_dict()["overall"] == got["overall"]
        assert after.extra["duplicate_rows"] == got["duplicate_rows"]
        if world > 1:
            assert after.extra["shards"] == world
            pytest.importorskip("xarray")
            ds = oocmetrics.open_epoch(store, split, 0)  # the shards in rank order, rows as recorded
            assert ds.sizes["sample"] == recorded and ds.attrs["shards"] == world
            np.testing.assert_array_equal(ds["rank"].values, np.repeat(np.arange(world), recorded // world))
            np.testing.assert_array_equal(np.sort(np.unique(ds["ids"].values)), unique)
    # the resumed recorders wrote epoch 1 in every shard
    assert compute_stored(store, "val_shuffle0").epoch == 1


def test_ids_missing_on_some_ranks_is_the_same_error_everywhere(tmp_path: Path) -> None:
    _, results = launch(tmp_path, 2, "missing_ids")
    errors = [r["error"] for r in results]
    assert errors[0] is not None and errors[0] == errors[1]
    assert "ids" in errors[0] and "rank 0" in errors[0] and "rank 1" in errors[0]


def test_a_rank_that_recorded_nothing_joins_and_the_others_count(tmp_path: Path) -> None:
    store, results = launch(tmp_path, 3, "empty_rank")
    ref = reference(list(range(40)), quantiles=(0.5,))
    for r in results:
        assert r["metrics"] == results[0]["metrics"]
    assert results[0]["metrics"]["n_rows"] == 40
    assert_close(results[0]["metrics"], ref)
    assert results[0]["metrics"]["quantiles"]["pooled"] == ref.quantiles["pooled"].tolist()


def test_a_read_failure_on_one_rank_is_an_error_on_every_rank(tmp_path: Path) -> None:
    _, results = launch(tmp_path, 2, "damaged_rank")
    for errors in (r["errors"] for r in results):
        assert len(errors) == 2 and all(e is not None for e in errors)  # the data pass, then the quantiles
    assert all(e.startswith("StoreError") and "is missing" in e for e in results[1]["errors"])
    assert all(e.startswith("RuntimeError") and "rank 1: StoreError" in e for e in results[0]["errors"])
