"""Partials stored as chunks are written: compute() merges them instead of reading the data, and the
result is bit for bit a recompute from the data (the same kernel on the same chunk, the same tree)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import zarr

import oocmetrics


def _same_bits(a: oocmetrics.EpochMetrics, b: oocmetrics.EpochMetrics) -> bool:
    return a.overall.keys() == b.overall.keys() and all(
        np.array_equal(a.per_output[k], b.per_output[k], equal_nan=True) for k in a.per_output
    ) and all((a[k] == b[k]) or (a[k] != a[k] and b[k] != b[k]) for k in a)


def _record(path, batches, **kw):
    rec = oocmetrics.Recorder(path, "val", **kw)
    for t, p in batches:
        rec.update(t, p)
    return rec


def _batches(rng, n, shape, dtype, offset=0.0, nan_every=0):
    out = []
    for b in range(n):
        t = (offset + rng.standard_normal(shape)).astype(dtype)
        p = (t + 1e-3 * rng.standard_normal(shape) + 0.01 * b).astype(dtype)
        if nan_every and b % nan_every == 1:
            p.flat[b % p.size] = np.nan
        out.append((t, p))
    return out


@pytest.mark.parametrize("chunk_rows,split_every", [(1, 2), (3, 2), (7, 8), (64, 3)])
@pytest.mark.parametrize("dtype,shape,offset", [(np.float32, (5, 6, 3), 0.0), (np.float64, (4, 2), 1e8),
                                                (np.float32, (6,), 0.0)])
def test_stored_partials_equal_a_recompute_from_the_data_bit_for_bit(tmp_path, chunk_rows, split_every, dtype,
                                                                     shape, offset):
    rng = np.random.default_rng(chunk_rows * 31 + split_every)
    batches = _batches(rng, 11, shape, dtype, offset, nan_every=4)
    rec = _record(tmp_path / "r", batches, chunk_rows=chunk_rows, split_every=split_every, nonfinite="skip")
    fast = rec.compute()
    slow = rec.compute(source="data")
    assert fast.extra["source"] == "partials" and slow.extra["source"] == "data"
    assert _same_bits(fast, slow)
    assert fast.n_skipped == slow.n_skipped > 0
    rec.close()
    t = np.concatenate([b[0] for b in batches])
    p = np.concatenate([b[1] for b in batches])
    ref = oocmetrics.compute_arrays(t, p, nonfinite="skip")
    for k in fast:
        assert fast[k] == pytest.approx(ref[k], rel=1e-12, abs=1e-15), k
    # after the fact, from the store: the same bits again
    stored = oocmetrics.compute_stored(tmp_path / "r", "val")
    assert stored.extra["source"] == "partials" and _same_bits(stored, slow)


def test_partials_follow_compute_mid_epoch_and_the_compact_rebuild(tmp_path, rng):
    """An epoch first sealed in a chunk of its own size, then grown past a chunk (rebuilt), then sealed
    again mid-chunk: its stored partials still cover exactly its rows."""
    batches = _batches(rng, 9, (5, 3), np.float32)
    rec = oocmetrics.Recorder(tmp_path / "r", "val", chunk_rows=12)
    for i, (t, p) in enumerate(batches):
        rec.update(t, p)
        if i in (0, 3, 5):
            fast, slow = rec.compute(), rec.compute(source="data")
            assert fast.extra["source"] == "partials" and _same_bits(fast, slow), i
    rec.close()
    g = zarr.open_group(str(tmp_path / "r" / "val" / "epoch=0"), mode="r")
    assert g["partials"].shape == (4, len(oocmetrics.kernels.FIELDS), 3)  # 45 rows / 12 = 4 chunks
    assert list(g["partials"].metadata.dimension_names) == ["chunk", "field", "output"]


def test_partials_that_do_not_cover_the_rows_are_not_used(tmp_path, rng):
    """A crash between a chunk's rewrite and its row count leaves partials of more rows than are
    durable: they must be recognised and the data read instead."""
    batches = _batches(rng, 4, (5, 2), np.float64)
    with _record(tmp_path / "r", batches, chunk_rows=8) as rec:
        expected = rec.compute(source="data")
    arr = zarr.open_array(str(tmp_path / "r" / "val" / "epoch=0" / "partials"), mode="r+")
    arr[2] = arr[0]  # chunk 2 holds 4 rows; these partials claim 8
    res = oocmetrics.compute_stored(tmp_path / "r", "val")
    assert res.extra["source"] == "data" and _same_bits(res, expected)
    with pytest.raises(ValueError, match="no stored partials covering"):
        oocmetrics.compute_stored(tmp_path / "r", "val", source="partials")


def test_store_without_partials_is_computed_from_the_data(tmp_path, rng):
    import shutil

    batches = _batches(rng, 3, (5, 2), np.float32)
    with _record(tmp_path / "r", batches, chunk_rows=4) as rec:
        expected = rec.compute()
    shutil.rmtree(tmp_path / "r" / "val" / "epoch=0" / "partials")  # as a store from before partials
    res = oocmetrics.compute_stored(tmp_path / "r", "val")
    assert res.extra["source"] == "data" and _same_bits(res, expected)
    out = subprocess.run([sys.executable, "-m", "oocmetrics", "verify", str(tmp_path / "r"), "--split", "val"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "no stored partials" in out.stdout


def test_cli_verify_and_source(tmp_path, rng):
    batches = _batches(rng, 5, (5, 2), np.float32)
    with _record(tmp_path / "r", batches, chunk_rows=4):
        pass
    run = [sys.executable, "-m", "oocmetrics"]
    ok = subprocess.run([*run, "verify", str(tmp_path / "r"), "--split", "val"], capture_output=True, text=True)
    assert ok.returncode == 0 and "bit for bit" in ok.stdout, ok.stderr
    data = subprocess.run([*run, "compute", str(tmp_path / "r"), "--split", "val", "--source", "data"],
                          capture_output=True, text=True)
    auto = subprocess.run([*run, "compute", str(tmp_path / "r"), "--split", "val"], capture_output=True, text=True)
    assert data.returncode == auto.returncode == 0 and data.stdout == auto.stdout
    # a stored partial that no longer matches its data (bit rot, tampering) is caught by verify
    arr = zarr.open_array(str(tmp_path / "r" / "val" / "epoch=0" / "partials"), mode="r+")
    fields = list(arr.attrs["fields"])
    row = arr[1]
    row[fields.index("sse")] *= 1.001
    arr[1] = row
    bad = subprocess.run([*run, "verify", str(tmp_path / "r"), "--split", "val"], capture_output=True, text=True)
    assert bad.returncode == 1 and "DIFFER" in bad.stderr


def test_order_statistics_still_read_the_data(tmp_path, rng):
    from sklearn.metrics import median_absolute_error

    batches = _batches(rng, 6, (5, 2), np.float32)
    with _record(tmp_path / "r", batches, chunk_rows=4, metrics=["mse", "median_absolute_error"]) as rec:
        res = rec.compute()
    t = np.concatenate([b[0] for b in batches]).astype(np.float64)
    p = np.concatenate([b[1] for b in batches]).astype(np.float64)
    np.testing.assert_array_equal(res.per_output["median_absolute_error"],
                                  median_absolute_error(t, p, multioutput="raw_values"))
