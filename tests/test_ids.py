"""Sample ids in one process: each id counted once (first copy wins), copies checked, bad ids refused."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import oocmetrics
from oocmetrics.compute import RowBlocks
from oocmetrics.dedup import plan_shard, summarize_ids
from oocmetrics.stored import compute_stored


def data(n: int, seed: int = 0, shape: tuple[int, ...] = (3, 2)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = rng.normal(10.0, 3.0, (n, *shape))
    t[0] = 1e8  # an outlier in the first row
    return t, t + rng.normal(0.0, 1.0, (n, *shape))


def assert_same_metrics(got: oocmetrics.EpochMetrics, ref: oocmetrics.EpochMetrics, rel: float = 1e-14) -> None:
    assert got.n_rows == ref.n_rows
    for name in ref.overall:
        np.testing.assert_allclose(got.overall[name], ref.overall[name], rtol=rel, err_msg=name)
    for name in ref.per_output:
        np.testing.assert_allclose(got.per_output[name], ref.per_output[name], rtol=rel, err_msg=name)


def record(path: Path, t: np.ndarray, p: np.ndarray, ids: np.ndarray, sizes: list[int], **kwargs):
    rec = oocmetrics.Recorder(path, "val", **kwargs)
    i = 0
    for n in sizes:
        rec.update(t[i:i + n], p[i:i + n], ids=ids[i:i + n])
        i += n
    return rec


def test_a_sample_recorded_twice_counts_once_and_the_first_copy_wins(tmp_path: Path) -> None:
    t, p = data(30)
    ids = np.arange(30)
    ids[[7, 19, 29]] = [3, 3, 0]  # rows 7, 19 repeat id 3 (row 3); row 29 repeats id 0 (row 0)
    p[[7, 19, 29]] = p[[3, 3, 0]]
    t[[7, 19, 29]] = t[[3, 3, 0]]
    with record(tmp_path / "run", t, p, ids, [4, 9, 1, 16], chunk_rows=6) as rec:
        got = rec.compute(quantiles=(0.5, 0.9))
        data_pass = rec.compute(source="data", quantiles=(0.5, 0.9))
    keep = np.setdiff1d(np.arange(30), [7, 19, 29])
    ref = oocmetrics.compute_arrays(t[keep], p[keep], quantiles=(0.5, 0.9))
    assert_same_metrics(got, ref)
    assert got.extra["duplicate_rows"] == 3 and got.extra["conflicting_predictions"] == 0
    np.testing.assert_array_equal(got.quantiles["pooled"], ref.quantiles["pooled"])  # exact: order stats too
    assert got.to_dict()["overall"] == data_pass.to_dict()["overall"]  # partials + re-read chunks == data pass
    after = compute_stored(tmp_path / "run", "val")
    assert after.to_dict()["overall"] == got.to_dict()["overall"]


def test_copies_that_disagree_are_reported(tmp_path: Path) -> None:
    t, p = data(12)
    ids = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 2, 5])
    t[10], p[10] = t[2], p[2] + 1.0  # same target, another prediction: the first copy (row 2) wins
    t[11], p[11] = t[5] + 1.0, p[5]  # another target for id 5: the ids are wrong
    with record(tmp_path / "run", t, p, ids, [12], chunk_rows=5) as rec:
        got = rec.compute()
    assert got.extra["duplicate_rows"] == 2
    assert got.extra["conflicting_predictions"] == 1 and got.extra["conflicting_targets"] == 1
    assert got.extra["conflicting_ids"] == [2, 5]
    assert_same_metrics(got, oocmetrics.compute_arrays(t[:10], p[:10]))


def test_only_the_chunks_holding_copies_are_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    t, p = data(100)
    ids = np.arange(100)
    ids[95] = 12  # chunk 0..9 of 10 rows: the copies are in chunks 1 and 9
    with record(tmp_path / "run", t, p, ids, [100], chunk_rows=10) as rec:
        rec.flush()
        reads: list[int] = []
        real = RowBlocks.read

        def counting(self, i, **kwargs):
            reads.append(i)
            return real(self, i, **kwargs)

        monkeypatch.setattr(RowBlocks, "read", counting)
        got = rec.compute()
    assert sorted(reads) == [1, 9]
    assert got.extra["source"] == "partials"
    keep = np.setdiff1d(np.arange(100), [95])
    assert_same_metrics(got, oocmetrics.compute_arrays(t[keep], p[keep]))


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 60), n_ids=st.integers(1, 40), chunk=st.integers(1, 13), seed=st.integers(0, 2**16),
)
def test_random_duplicates_match_the_first_copies(tmp_path_factory, n: int, n_ids: int, chunk: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, n_ids, n)
    base_t, base_p = data(n_ids, seed)
    t, p = base_t[ids], base_p[ids]  # every copy of an id holds the same values
    sizes = []
    while sum(sizes) < n:
        sizes.append(int(rng.integers(1, 9)))
    with record(tmp_path_factory.mktemp("ids"), t, p, ids, sizes, chunk_rows=chunk) as rec:
        got = rec.compute()
    _, first = np.unique(ids, return_index=True)
    keep = np.sort(first)
    assert_same_metrics(got, oocmetrics.compute_arrays(t[keep], p[keep]), rel=1e-12)
    assert got.extra["duplicate_rows"] == n - keep.size
    assert got.extra["conflicting_targets"] == 0 and got.extra["conflicting_predictions"] == 0


def test_plan_drops_later_copies_across_shards() -> None:
    a, b = np.array([5, 1, 5, 9]), np.array([9, 2, 1, 2])
    summaries = [summarize_ids(a), summarize_ids(b)]
    involved_a, drop_a = plan_shard(a, 0, summaries)
    involved_b, drop_b = plan_shard(b, 1, summaries)
    assert drop_a.tolist() == [2]  # the second 5
    assert involved_a.tolist() == [0, 1, 2, 3]  # 5 twice, 1 and 9 also in shard 1
    assert drop_b.tolist() == [0, 2, 3]  # 9 and 1 were in shard 0; the second 2
    assert involved_b.tolist() == [0, 1, 2, 3]


def test_ids_as_torch_tensors_and_groups_are_stored(tmp_path: Path) -> None:
    t, p = data(20, shape=(2,))
    with oocmetrics.Recorder(tmp_path / "run", "val", chunk_rows=7) as rec:
        for i in range(0, 20, 5):
            rec.update(torch.from_numpy(t[i:i + 5]), torch.from_numpy(p[i:i + 5]),
                       ids=torch.arange(i, i + 5, dtype=torch.int32), groups=torch.tensor([i // 10] * 5))
    import zarr
    g = zarr.open_group(str(tmp_path / "run" / "val" / "epoch=0"), mode="r")
    np.testing.assert_array_equal(g["ids"][:], np.arange(20))
    np.testing.assert_array_equal(g["groups"][:], np.repeat([0, 1], 10))
    assert g.attrs["labels"] == ["ids", "groups"]


@pytest.mark.parametrize("ids, error, match", [
    (np.arange(3), ValueError, r"shape \(3,\); expected \(4,\)"),
    (np.arange(4.0), TypeError, "expected integers"),
    (np.ones(4, bool), TypeError, "expected integers"),
    (torch.arange(4.0), TypeError, "expected integers"),
    ([0, 1, 2, 3.5], TypeError, "expected integers"),
])
def test_bad_ids_are_refused_and_nothing_is_recorded(tmp_path: Path, ids, error, match) -> None:
    t, p = data(4)
    with oocmetrics.Recorder(tmp_path / "run", "val") as rec:
        with pytest.raises(error, match=match):
            rec.update(t, p, ids=ids)
        assert rec.rows == 0
        rec.update(t, p, ids=np.arange(4))
        assert rec.rows == 4


def test_ids_with_some_batches_only_are_refused(tmp_path: Path) -> None:
    t, p = data(8)
    with oocmetrics.Recorder(tmp_path / "run", "val") as rec:
        rec.update(t[:4], p[:4], ids=np.arange(4))
        with pytest.raises(ValueError, match="Pass ids= / groups= with every batch"):
            rec.update(t[4:], p[4:])
        rec.reset()
        rec.update(t[:4], p[:4])
        with pytest.raises(ValueError, match="with every batch of an epoch, or with none"):
            rec.update(t[4:], p[4:], ids=np.arange(4, 8))
        assert rec.rows == 4


def test_intervals_count_each_id_once(tmp_path: Path) -> None:
    from oocmetrics.intervals import stored_intervals

    t, p = data(300)
    ids = np.arange(300) % 250  # the last 50 rows repeat the first 50 ids
    t[250:], p[250:] = t[:50], p[:50]
    with record(tmp_path / "run", t, p, ids, [7] * 42 + [6], chunk_rows=10):
        pass
    ci = stored_intervals(tmp_path / "run", "val", n_boot=200)
    exact = compute_stored(tmp_path / "run", "val")
    assert ci["source"] == "stored partials" and ci["blocks"] == 30
    assert any("50 duplicate rows" in note for note in ci["notes"])
    for name in ("mse", "mae", "r2"):
        assert ci["estimate"][name] == pytest.approx(exact.overall[name], rel=1e-12)
        low, high = ci["overall"][name]
        assert low <= exact.overall[name] <= high


def test_cli_by_group_matches_each_group_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from oocmetrics.__main__ import main

    t, p = data(40)
    groups = np.repeat([7, 3, 9, 3], 10)  # group 3 in two runs of rows; ids all distinct
    with oocmetrics.Recorder(tmp_path / "run", "val", chunk_rows=6) as rec:
        for i in range(0, 40, 8):
            rec.update(t[i:i + 8], p[i:i + 8], ids=np.arange(i, i + 8), groups=groups[i:i + 8])
    assert main(["compute", str(tmp_path / "run"), "--split", "val", "--by", "group", "--json",
                 str(tmp_path / "g.json")]) == 0
    assert "3 groups" in capsys.readouterr().out
    got = json.loads((tmp_path / "g.json").read_text())
    assert got["groups"] == [3, 7, 9] and got["rows"] == [20, 10, 10]
    for k, g in enumerate(got["groups"]):
        ref = oocmetrics.compute_arrays(t[groups == g], p[groups == g])
        for name in ("mse", "mae", "r2"):
            assert got["overall"][name][k] == pytest.approx(ref.overall[name], rel=1e-12), (g, name)
    with oocmetrics.Recorder(tmp_path / "plain", "val") as rec:
        rec.update(t, p)
    assert main(["compute", str(tmp_path / "plain"), "--split", "val", "--by", "group"]) == 2
    assert "stores no groups" in capsys.readouterr().err


@pytest.mark.parametrize("compressed", [False, True])
def test_a_missing_chunk_file_is_an_error_not_zeros(tmp_path: Path, compressed: bool) -> None:
    import zarr
    from zarr.codecs import ZstdCodec

    from oocmetrics.store import chunk_key

    t, p = data(30)
    kwargs = {"compressors": [ZstdCodec(level=1)]} if compressed else {}
    with oocmetrics.Recorder(tmp_path / "run", "val", chunk_rows=10, **kwargs) as rec:
        rec.update(t, p)
    arr_dir = tmp_path / "run" / "val" / "epoch=0" / "y_pred"
    (arr_dir / chunk_key(zarr.open_array(str(arr_dir), mode="r"), 1)).unlink()
    with pytest.raises(oocmetrics.StoreError, match="is missing: it holds rows 10-19"):
        compute_stored(tmp_path / "run", "val", source="data")
