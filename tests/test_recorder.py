"""Recorder end to end: store round trips, epochs, modes, bad input and writer failures."""
from __future__ import annotations

import errno
import json
import math

import numpy as np
import pytest
import torch
import zarr

import oocmetrics
from oocmetrics import store as store_mod
from reference import assert_matches


def _batches(rng, n_batches, shape=(5, 6, 3), *, offset=0.0, last=None, dtype=np.float32):
    out = []
    for b in range(n_batches):
        rows = last if (last is not None and b == n_batches - 1) else shape[0]
        t = (offset + rng.standard_normal((rows, *shape[1:]))).astype(dtype)
        p = (t + 0.3 * rng.standard_normal(t.shape) + 0.05 * b).astype(dtype)  # drifting error
        out.append((t, p))
    return out


def _cat(batches):
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


@pytest.mark.parametrize("chunk_rows", [1, 3, 7, 64])
def test_epoch_matches_reference_with_batches_cut_by_chunks(tmp_path, rng, chunk_rows):
    batches = _batches(rng, 11, last=2)  # uneven last batch; 5-row batches cut by 3/7-row chunks
    with oocmetrics.Recorder(tmp_path / "run", "val", chunk_rows=chunk_rows, split_every=2) as rec:
        for t, p in batches:
            rec.update(t, p)
        res = rec.compute()
        assert (rec.rows, rec.batches) == (52, 11)
    t, p = _cat(batches)
    assert_matches(res, t, p)
    assert (res.n_rows, res.epoch, res.split, res.extra["batches"]) == (52, 0, "val", 11)
    # what is on disk: exactly the rows, in order, and the durable count in the attributes
    g = zarr.open_group(str(tmp_path / "run" / "val" / "epoch=0"), mode="r")
    np.testing.assert_array_equal(g["y_true"][:], t)
    np.testing.assert_array_equal(g["y_pred"][:], p)
    assert g.attrs["rows"] == 52 and g.attrs["complete"] is True and g.attrs["batches"] == 11


def test_torch_inputs_any_float_dtype_and_requires_grad(tmp_path, rng):
    t = torch.randn(8, 10, 4, dtype=torch.float64)
    p = (t + 0.1 * torch.randn_like(t)).requires_grad_(True)
    with oocmetrics.Recorder(tmp_path / "r", "train", chunk_rows=3) as rec:
        rec.update(t, p)
        rec.update(t.float(), p.detach().float())  # narrower dtypes cast safely into the f64 store
        res = rec.compute()
    T = torch.cat([t, t.float().double()]).numpy()
    P = torch.cat([p.detach(), p.detach().float().double()]).numpy()
    assert_matches(res, T, P)
    # float16 / bfloat16 are stored as float32 (widening is exact)
    for dt in (torch.float16, torch.bfloat16):
        t16 = torch.randn(6, 4).to(dt)
        p16 = (t16.float() + 0.25).to(dt)
        with oocmetrics.Recorder(tmp_path / str(dt), "val") as rec:
            rec.update(t16, p16)
            res = rec.compute()
        assert zarr.open_array(str(tmp_path / str(dt) / "val" / "epoch=0" / "y_true"), mode="r").dtype == np.float32
        assert_matches(res, t16.float().numpy(), p16.float().numpy())


def test_compute_mid_epoch_then_continue(tmp_path, rng):
    batches = _batches(rng, 9)
    with oocmetrics.Recorder(tmp_path / "r", "val", chunk_rows=4) as rec:
        for i, (t, p) in enumerate(batches):
            rec.update(t, p)
            if i in (2, 5):
                first = rec.compute()
                again = rec.compute()  # cached until the next update, but a fresh copy each call
                assert again is not first and again.overall == first.overall
                assert_matches(first, *_cat(batches[: i + 1]))
                first.overall["mse"] = -1.0
                first.per_output["mse"][:] = -1.0
                assert rec.compute()["mse"] >= 0 and (rec.compute().per_output["mse"] >= 0).all()
        assert_matches(rec.compute(), *_cat(batches))


def test_reset_retention_and_epochs(tmp_path, rng):
    path = tmp_path / "r"
    with oocmetrics.Recorder(path, "train", chunk_rows=4, keep_epochs=1) as rec:
        results = []
        for epoch in range(3):
            batches = _batches(rng, 3, offset=epoch)
            for t, p in batches:
                rec.update(t, p)
            results.append((rec.compute(), batches))
            assert rec.stored_epochs()[-1] == epoch
            rec.reset()
            assert rec.epoch == epoch + 1 and rec.rows == 0
            assert rec.stored_epochs() == [epoch]  # only the finished epoch stays
    for (res, batches) in results:
        assert_matches(res, *_cat(batches))
    with oocmetrics.Recorder(tmp_path / "all", "train", keep_epochs=None) as rec:
        for epoch in range(3):
            rec.update(*_batches(rng, 1)[0])
            rec.reset()
        assert rec.stored_epochs() == [0, 1, 2]


def test_modes_create_overwrite_resume(tmp_path, rng):
    path = tmp_path / "r"
    t, p = _batches(rng, 1)[0]
    with oocmetrics.Recorder(path, "val") as rec:
        rec.update(t, p)
    with pytest.raises(oocmetrics.StoreError, match=r"already holds epoch\(s\) \[0\].*mode='overwrite'.*mode='resume'"):
        oocmetrics.Recorder(path, "val")
    # another split of the same run is independent
    with oocmetrics.Recorder(path, "test") as rec:
        rec.update(t, p)
    with oocmetrics.Recorder(path, "val", mode="resume") as rec:
        assert rec.epoch == 1
        rec.update(t, p)
    with oocmetrics.Recorder(path, "val", mode="overwrite") as rec:
        assert rec.epoch == 0 and rec.stored_epochs() == []
        rec.update(t + 1, p)
        res = rec.compute()
    assert_matches(res, t + 1, p)
    assert sorted(zarr.open_group(str(path), mode="r").group_keys()) == [".oocmetrics", "test", "val"]


def test_foreign_paths_are_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(oocmetrics.StoreError, match="is a file"):
        oocmetrics.Recorder(tmp_path / "file")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "notes.txt").write_text("x")
    with pytest.raises(oocmetrics.StoreError, match="not an oocmetrics store"):
        oocmetrics.Recorder(tmp_path / "dir")
    zarr.open_group(str(tmp_path / "other"), mode="w").attrs["x"] = 1
    with pytest.raises(oocmetrics.StoreError, match="another program or format"):
        oocmetrics.Recorder(tmp_path / "other")


def test_bad_batches_raise_and_lose_nothing(tmp_path, rng):
    good = _batches(rng, 2)
    with oocmetrics.Recorder(tmp_path / "r", "val", chunk_rows=4) as rec:
        rec.update(*good[0])
        t, p = good[1]
        with pytest.raises(ValueError, match=r"Expected y_pred to have the shape of y_true \(5, 6, 3\), but got \(5, 6, 2\)"):
            rec.update(t, p[..., :2])
        with pytest.raises(ValueError, match=r"Batch 1 has trailing shape \(6, 2\), but this epoch's batches have \(6, 3\)"):
            rec.update(t[..., :2], p[..., :2])
        with pytest.raises(TypeError, match="y_true has dtype int64; expected a floating dtype"):
            rec.update(t.astype(np.int64), p)
        with pytest.raises(TypeError, match="y_pred has dtype torch.int32"):
            rec.update(torch.from_numpy(t), torch.zeros(t.shape, dtype=torch.int32))
        with pytest.raises(TypeError, match="y_true is a list"):
            rec.update(t.tolist(), p)
        with pytest.raises(ValueError, match="y_true is a scalar"):
            rec.update(np.array(1.0, np.float32), np.array(1.0, np.float32))
        with pytest.raises(TypeError, match="y_true is a float32; expected a NumPy array"):
            rec.update(np.float32(1.0), np.float32(1.0))
        with pytest.raises(TypeError, match="this epoch stores float32 .* lose precision"):
            rec.update(t.astype(np.float64), p)
        bad = p.copy()
        bad[2, 0, 1] = np.nan
        bad[3, 1, 1] = np.inf
        with pytest.raises(ValueError, match=r"y_pred in batch 1 \(rows 5-9 of this epoch\) has 2 non-finite .*nonfinite='skip'"):
            rec.update(t, bad)
        rec.update(t, p)  # the good batch after all the bad ones
        res = rec.compute()
        assert rec.batches == 2
    assert_matches(res, *_cat(good))


def test_nonfinite_skip_stores_and_counts(tmp_path, rng):
    t, p = _batches(rng, 1, dtype=np.float64)[0]
    p[0, 0, 0] = np.nan
    with oocmetrics.Recorder(tmp_path / "r", nonfinite="skip") as rec:
        rec.update(t, p)
        res = rec.compute()
    assert res.n_skipped == 1 and res.n_values == t.size - 1
    assert math.isfinite(res["mse"])


def test_empty_epoch_closed_recorder_and_bad_arguments(tmp_path, rng):
    rec = oocmetrics.Recorder(tmp_path / "r", "val")
    with pytest.raises(ValueError, match=r"No rows recorded in epoch 0 of split 'val'.*call update"):
        rec.compute()
    rec.update(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32))  # an empty batch is a no-op
    with pytest.raises(ValueError, match="No rows recorded"):
        rec.compute()
    rec.close()
    rec.close()  # idempotent
    assert rec.closed
    for call in (lambda: rec.update(np.zeros((1, 3)), np.zeros((1, 3))), rec.compute, rec.reset, rec.flush):
        with pytest.raises(RuntimeError, match="on a closed Recorder"):
            call()
    for kwargs, match in [
        (dict(split="a/b"), "not a valid name"), (dict(nonfinite="ignore"), "nonfinite="),
        (dict(mode="append"), "mode="), (dict(chunk_rows=0), "chunk_rows="),
        (dict(chunk_mb=0), "chunk_mb="), (dict(queue_chunks=0), "queue_chunks="),
        (dict(keep_epochs=-1), "keep_epochs="), (dict(split_every=1), "split_every="),
        (dict(metrics=["msee"]), "Unknown metric"),
    ]:
        with pytest.raises(ValueError, match=match):
            oocmetrics.Recorder(tmp_path / "x", **kwargs)


def test_full_disk_surfaces_then_retry_loses_nothing(tmp_path, rng, monkeypatch):
    batches = _batches(rng, 8)
    real = store_mod.EpochStore.write_chunk
    state = {"fail": False}

    def flaky(self, index, *args, **kwargs):
        if state["fail"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, index, *args, **kwargs)

    monkeypatch.setattr(store_mod.EpochStore, "write_chunk", flaky)
    rec = oocmetrics.Recorder(tmp_path / "r", "train", chunk_rows=4, queue_chunks=1)
    rec.update(*batches[0])
    rec.flush()
    state["fail"] = True
    with pytest.raises(oocmetrics.WriterError, match=r"the disk is full.*\d+ rows of this epoch are durable.*\d+ rows are held.*retry\(\)"):
        for t, p in batches[1:]:
            rec.update(t, p)
        rec.compute()
    with pytest.raises(oocmetrics.WriterError):  # stays failed, never silent
        rec.compute()
    durable = zarr.open_group(str(tmp_path / "r" / "train" / "epoch=0"), mode="r").attrs["rows"]
    assert durable >= 5
    state["fail"] = False
    rec.retry()
    for t, p in batches[rec.batches:]:
        rec.update(t, p)
    res = rec.compute()
    rec.close()
    assert_matches(res, *_cat(batches))


def test_close_in_context_manager_keeps_rows_when_the_loop_fails(tmp_path, rng):
    batches = _batches(rng, 3)
    with pytest.raises(KeyError):
        with oocmetrics.Recorder(tmp_path / "r", "val", chunk_rows=4) as rec:
            for t, p in batches:
                rec.update(t, p)
            raise KeyError("training crashed")
    g = zarr.open_group(str(tmp_path / "r" / "val" / "epoch=0"), mode="r")
    assert g.attrs["rows"] == 15 and g.attrs["complete"] is False  # durable, but not a finished epoch


def test_result_serializes_to_json(tmp_path, rng):
    with oocmetrics.Recorder(tmp_path / "r") as rec:
        rec.update(*_batches(rng, 1)[0])
        res = rec.compute()
    data = json.loads(json.dumps(res.to_dict()))
    assert data["overall"]["mse"] == res["mse"] and len(data["per_output"]["r2"]) == 3
    assert "train epoch 0, 5 rows" in repr(res)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_bf16_and_grad(tmp_path):
    gen = torch.Generator(device="cuda").manual_seed(0)
    t = torch.randn(16, 500, 20, device="cuda", generator=gen)
    p = (t + 0.1 * torch.randn(t.shape, device="cuda", generator=gen)).requires_grad_(True)
    with oocmetrics.Recorder(tmp_path / "gpu", "val", chunk_rows=5) as rec:
        for _ in range(3):
            rec.update(t, p * 1.0)
        rec.update(t.bfloat16(), p.detach().bfloat16())
        res = rec.compute()
    T = torch.cat([t] * 3 + [t.bfloat16().float()]).cpu().numpy()
    P = torch.cat([p.detach()] * 3 + [p.detach().bfloat16().float()]).cpu().numpy()
    assert_matches(res, T, P)


def test_median_absolute_error_through_the_store(tmp_path, rng):
    from sklearn.metrics import median_absolute_error

    batches = _batches(rng, 7, last=3)
    with oocmetrics.Recorder(tmp_path / "r", metrics=["median_absolute_error", "rmse"], chunk_rows=4) as rec:
        for t, p in batches:
            rec.update(t, p)
        res = rec.compute()
    t, p = _cat(batches)
    T, P = t.reshape(-1, 3).astype(np.float64), p.reshape(-1, 3).astype(np.float64)
    np.testing.assert_array_equal(res.per_output["median_absolute_error"],
                                  median_absolute_error(T, P, multioutput="raw_values"))
    assert list(res.overall) == ["median_absolute_error", "rmse"]


def test_keep_epochs_zero_holds_one_epoch_and_close_keeps_the_last(tmp_path, rng):
    with oocmetrics.Recorder(tmp_path / "r", keep_epochs=0, chunk_rows=4) as rec:
        for epoch in range(3):
            rec.update(*_batches(rng, 2)[0])
            rec.flush()
            assert rec.stored_epochs() == [epoch]  # only the epoch being written
            rec.reset()
        rec.update(*_batches(rng, 1)[0])
    assert rec.stored_epochs() == [3]


def test_buffers_are_reused_across_epochs_of_the_same_layout(tmp_path, rng):
    with oocmetrics.Recorder(tmp_path / "r", chunk_rows=4, queue_chunks=1) as rec:
        for t, p in _batches(rng, 3):
            rec.update(t, p)
        rec.reset()
        before = {id(a) for pair in rec._spare for a in pair}
        assert len(before) == 4  # (queue_chunks + 1) pairs
        for t, p in _batches(rng, 3):
            rec.update(t, p)
        in_use = {id(rec._pos.buf[0]), id(rec._pos.buf[1])}
        assert in_use <= before
        rec.reset()
        rec.update(*_batches(rng, 1, shape=(5, 6, 2))[0])  # another layout: fresh buffers
        assert rec._spare == [] and rec._pos.buf[0].shape == (4, 6, 2)


def test_to_dict_is_strict_json(tmp_path):
    res = oocmetrics.compute_arrays(np.ones((4, 2)), np.ones((4, 2)) + [[0, 1]] * 4)
    data = res.to_dict()
    assert data["overall"]["pearson_r"] is None and data["per_output"]["pearson_r"] == [None, None]
    json.dumps(data, allow_nan=False)
