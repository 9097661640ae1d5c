"""Epoch-end compute on a dask.distributed cluster: the same bits as local threads, a killed worker retried."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")

import oocmetrics  # noqa: E402
from oocmetrics.__main__ import main  # noqa: E402
from oocmetrics.compute import compute_partials  # noqa: E402
from oocmetrics.stored import compute_stored, open_stored_shards  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from cluster_helpers import KillOnceBlocks  # noqa: E402


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=2, processes=True, dashboard_address=None,
                                  silence_logs=40) as cluster, distributed.Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cluster") / "run"
    rng = np.random.default_rng(3)
    with oocmetrics.Recorder(path, "val", chunk_rows=50) as rec:
        for i in range(40):
            t = rng.normal(3.0, 1.0, (13, 6, 4)).astype(np.float32)
            ids = np.arange(i * 13, i * 13 + 13) % 500  # the last rows repeat the first ids
            rec.update(t, t + rng.normal(0, 0.1, t.shape).astype(np.float32), ids=ids)
    return path


def test_a_cluster_gives_the_bits_of_local_threads(client, store: Path) -> None:
    kwargs = {"source": "data", "metrics": ("mse", "mae", "r2", "median_absolute_error"), "quantiles": (0.5, 0.99)}
    local = compute_stored(store, "val", scheduler="threads", **kwargs).to_dict()
    sync = compute_stored(store, "val", scheduler="sync", **kwargs).to_dict()
    remote = compute_stored(store, "val", scheduler=client, **kwargs).to_dict()
    assert local == sync == remote
    assert remote["duplicate_rows"] == 20
    assert compute_stored(store, "val").to_dict()["overall"]["mse"] == local["overall"]["mse"]


def test_a_worker_killed_mid_compute_is_retried_and_the_result_is_unchanged(client, store: Path, tmp_path: Path) -> None:
    shard = open_stored_shards(store, "val")[0]
    args = (shard.y_true, shard.y_pred, shard.info.rows, shard.info.chunk_rows)
    expected = compute_partials(oocmetrics.compute.RowBlocks(*args), scheduler="sync")
    marker = tmp_path / "killed"
    blocks = KillOnceBlocks(*args, marker=str(marker), victim=5)
    got = compute_partials(blocks, scheduler=client)
    assert marker.exists()  # a worker really died
    np.testing.assert_array_equal(got, expected)


def test_cli_compute_on_a_scheduler_address(client, store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compute", str(store), "--split", "val", "--source", "data", "--scheduler", client.scheduler.address]) == 0
    out = capsys.readouterr().out
    mse = compute_stored(store, "val").overall["mse"]
    assert f"{mse:.8g}" in out


def test_workers_read_the_store_from_an_fsspec_url(client, store: Path) -> None:
    kwargs = {"source": "data", "quantiles": (0.5,)}
    local = compute_stored(store, "val", scheduler="sync", **kwargs).to_dict()
    remote = compute_stored(f"file://{store}", "val", scheduler=client, **kwargs).to_dict()
    assert remote == local


def test_a_store_copied_to_another_filesystem_reads_the_same(client, store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    fs.put(str(store), "/oocm-test/run", recursive=True)
    try:
        url = "memory://oocm-test/run"
        # this process's memory filesystem: the cluster's workers (the default client here) cannot see it
        assert compute_stored(url, "val", quantiles=(0.9,), scheduler="threads").to_dict() == \
            compute_stored(store, "val", quantiles=(0.9,), scheduler="threads").to_dict()
        # what the workers see of it: no chunks, which is an error, not zeros
        with pytest.raises(oocmetrics.StoreError, match="fewer than"):
            compute_stored(url, "val", source="data", scheduler=client)
        assert main(["compute", url, "--split", "val", "--scheduler", "threads"]) == 0
        assert "duplicate rows left out" in capsys.readouterr().out
        assert main(["compute", "memory://oocm-test/nothing", "--split", "val"]) == 2
        with pytest.raises(oocmetrics.StoreError, match="writes to a local path"):
            oocmetrics.Recorder(url, "val2")
    finally:
        fs.rm("/oocm-test", recursive=True)
