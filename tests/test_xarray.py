"""oocmetrics.open_epoch: a lazy xarray view of a stored epoch."""
from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import zarr

import oocmetrics

xr = pytest.importorskip("xarray")
da = pytest.importorskip("dask.array")


def _record(path, shape, batches=3, *, close=True, split="val", seed=0, **kw):
    rng = np.random.default_rng(seed)
    rec = oocmetrics.Recorder(path, split, chunk_rows=4, **kw)
    ts, ps = [], []
    for _ in range(batches):
        t = rng.standard_normal(shape).astype(np.float32)
        p = rng.standard_normal(shape).astype(np.float32)
        t[0] = 0.0  # stored zeros must read back as 0.0 (zarr's fill_value is 0.0), never as NaN
        rec.update(t, p)
        ts.append(t)
        ps.append(p)
    if close:
        rec.close()
    return rec, np.concatenate(ts), np.concatenate(ps)


@pytest.mark.parametrize("shape, dims", [
    ((5, 3, 2), ("sample", "step", "output")),
    ((5,), ("sample",)),
    ((5, 2), ("sample", "output")),
    ((5, 2, 3, 2), ("sample", "axis1", "axis2", "output")),
])
def test_open_epoch_dims_values_attrs(tmp_path, shape, dims):
    _, t, p = _record(tmp_path / "r", shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = oocmetrics.open_epoch(tmp_path / "r", "val")
    assert isinstance(ds, xr.Dataset)
    assert set(ds.data_vars) == {"y_true", "y_pred"}  # partials are not exposed
    for name in ("y_true", "y_pred"):
        assert ds[name].dims == dims
        assert isinstance(ds[name].data, da.Array)  # lazy
        assert ds[name].data.chunks[0] == (4, 4, 4, 3)  # the on-disk chunks
        assert ds[name].dtype == np.float32
    assert dict(ds.sizes) == dict(zip(dims, (15, *shape[1:])))
    np.testing.assert_array_equal(ds.y_true.values, t)
    np.testing.assert_array_equal(ds.y_pred.values, p)
    assert ds.attrs["epoch"] == 0
    assert ds.attrs["rows"] == 15
    assert ds.attrs["batches"] == 3
    assert ds.attrs["complete"] is True
    assert ds.attrs["split"] == "val"
    assert isinstance(ds.attrs["run_id"], str) and ds.attrs["run_id"]
    assert ds.attrs["trailing_shape"] == list(shape[1:])
    assert ds.attrs["chunk_rows"] == 4


def test_open_epoch_default_is_last_and_explicit_epoch(tmp_path):
    path = tmp_path / "r"
    rec = oocmetrics.Recorder(path, "val", chunk_rows=4, keep_epochs=None)
    a = np.arange(10, dtype=np.float32).reshape(5, 2)
    b = np.arange(12, dtype=np.float32).reshape(6, 2) + 100
    rec.update(a, a)
    rec.reset()
    rec.update(b, -b)
    rec.close()
    last = oocmetrics.open_epoch(path, "val")
    assert last.attrs["epoch"] == 1 and last.sizes["sample"] == 6
    np.testing.assert_array_equal(last.y_pred.values, -b)
    first = oocmetrics.open_epoch(path, "val", epoch=0)
    assert first.attrs["epoch"] == 0 and first.sizes["sample"] == 5
    np.testing.assert_array_equal(first.y_true.values, a)


def test_incomplete_epoch_is_cut_to_durable_rows(tmp_path):
    path = tmp_path / "r"
    rec, t, p = _record(path, (5, 3, 2), close=False)
    rec.flush()
    rec._abandon(RuntimeError)  # released without marking the epoch complete
    ds = oocmetrics.open_epoch(path, "val")
    assert ds.attrs["complete"] is False
    assert ds.sizes["sample"] == 15
    np.testing.assert_array_equal(ds.y_true.values, t)

    # A crash between writing a chunk and advancing ``rows``: the arrays hold rows beyond the durable count.
    g = zarr.open_group(str(path / "val" / "epoch=0"), mode="r+")
    assert g["y_true"].shape[0] == 15
    g.attrs["rows"] = 12
    ds = oocmetrics.open_epoch(path, "val")
    assert ds.attrs["rows"] == 12
    assert ds.sizes["sample"] == 12
    assert ds.y_true.data.chunks[0] == (4, 4, 4)
    np.testing.assert_array_equal(ds.y_true.values, t[:12])
    np.testing.assert_array_equal(ds.y_pred.values, p[:12])
    assert np.isfinite(ds.y_pred.sum().compute().item())


def test_errors_name_the_path(tmp_path):
    path = tmp_path / "r"
    with pytest.raises(oocmetrics.StoreError, match="No oocmetrics store"):
        oocmetrics.open_epoch(path, "val")
    _record(path, (5, 2))
    with pytest.raises(oocmetrics.StoreError, match="No split 'test'"):
        oocmetrics.open_epoch(path, "test")
    with pytest.raises(oocmetrics.StoreError, match=r"No epoch 7 in .*val"):
        oocmetrics.open_epoch(path, "val", epoch=7)
    with pytest.raises(ValueError, match="epoch="):
        oocmetrics.open_epoch(path, "val", epoch=-1)
    (path / "val" / "epoch=0" / "zarr.json").write_text("{not json")
    with pytest.raises(oocmetrics.StoreError, match=r"epoch=0"):
        oocmetrics.open_epoch(path, "val")
    with pytest.raises(oocmetrics.StoreError, match=r"epoch=0"):
        oocmetrics.open_epoch(path, "val", epoch=0)


def test_arrays_shorter_than_rows_is_a_store_error(tmp_path):
    path = tmp_path / "r"
    _record(path, (5, 2))
    zarr.open_group(str(path / "val" / "epoch=0"), mode="r+").attrs["rows"] = 99
    with pytest.raises(oocmetrics.StoreError, match=r"y_true is damaged.*15 rows.*99"):
        oocmetrics.open_epoch(path, "val")


def test_empty_split_is_a_store_error(tmp_path):
    path = tmp_path / "r"
    oocmetrics.Recorder(path, "val").close()  # creates the split, records no epoch
    with pytest.raises(oocmetrics.StoreError, match="holds no epochs"):
        oocmetrics.open_epoch(path, "val")


def test_without_xarray(tmp_path, monkeypatch):
    _record(tmp_path / "r", (5, 2))
    monkeypatch.setitem(sys.modules, "xarray", None)  # `import xarray` now raises ImportError
    with pytest.raises(ImportError, match="pip install xarray"):
        oocmetrics.open_epoch(tmp_path / "r", "val")


def test_import_oocmetrics_does_not_import_xarray():
    code = (
        "import sys; sys.modules['xarray'] = None\n"
        "import oocmetrics\n"
        "assert 'open_epoch' in oocmetrics.__all__ and callable(oocmetrics.open_epoch)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_ids_and_groups_are_coordinates(tmp_path):
    rng = np.random.default_rng(0)
    t = rng.normal(size=(12, 3))
    with oocmetrics.Recorder(tmp_path / "run", "val", chunk_rows=5) as rec:
        rec.update(t, t + 1, ids=np.arange(12) % 10, groups=np.arange(12) // 4)
    ds = oocmetrics.open_epoch(tmp_path / "run", "val")
    np.testing.assert_array_equal(ds["ids"].values, np.arange(12) % 10)
    np.testing.assert_array_equal(ds["groups"].values, np.arange(12) // 4)
    assert ds["ids"].dims == ("sample",) and "note" in ds.attrs
    # a group's rows, selected through the coordinate (the data stays lazy)
    group1 = ds.isel(sample=np.flatnonzero(ds["groups"].values == 1))
    np.testing.assert_array_equal(group1["y_true"].values, t[4:8])
