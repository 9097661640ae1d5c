"""A lazy xarray view of one stored epoch: ``oocmetrics.open_epoch(path, split, epoch=None)``.

xarray is an optional extra (``pip install xarray``): this module imports it only when
:func:`open_epoch` is called, so ``import oocmetrics`` works without it.

The Dataset is built from dask arrays over the zarr arrays (``dask.array.from_zarr``) rather than
with ``xarray.open_zarr``: that would decode the arrays' zarr ``fill_value`` (0.0) as a missing value
(every stored 0.0 would read as NaN), and it would make a data variable of the ``partials`` array,
whose dims differ. The rows are cut to the epoch's durable ``rows`` before anything is read.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from oocmetrics.errors import StoreError
from oocmetrics.store import ARRAYS, _attrs, _dimension_names
from oocmetrics.stored import open_stored_shards
from oocmetrics.validation import check_epoch_number

if TYPE_CHECKING:  # pragma: no cover
    import xarray

__all__ = ["open_epoch", "SAMPLE_DIM"]

SAMPLE_DIM = "sample"  # the stored arrays' "row" dim, as it is named in the Dataset
_ROW_DIM = "row"


def _import_xarray() -> Any:
    try:
        import xarray
    except ImportError as exc:
        raise ImportError(
            "oocmetrics.open_epoch needs xarray, an optional dependency that is not installed; "
            "install it with: pip install xarray"
        ) from exc
    return xarray


def open_epoch(path: str | Path, split: str, epoch: int | None = None) -> "xarray.Dataset":
    """A lazy, dask-backed :class:`xarray.Dataset` over a stored epoch (default: the last) of ``split``.

    Data variables ``y_true`` and ``y_pred`` with dims ``("sample",)``, ``("sample", "output")``,
    ``("sample", "step", "output")`` or ``("sample", "axis1", ..., "output")`` (the arrays' zarr
    ``dimension_names``, with ``row`` renamed ``sample``), in the on-disk chunks, holding exactly the
    epoch's durable rows (an incomplete epoch of a crashed run never shows rows beyond ``rows``).
    The epoch's attributes (``epoch``, ``rows``, ``batches``, ``complete``, ``run_id``, ``split``, ...)
    are the Dataset's ``attrs``. The per-chunk ``partials`` are not exposed. Sample ids and groups,
    when recorded, are coordinates ``ids`` / ``groups`` along ``sample``. A DDP run's shards are
    concatenated in rank order, with a ``rank`` coordinate; rows are as recorded (a padded copy of a
    sample appears twice here, while every metric counts it once).

    Takes no lock and reads nothing but metadata until computed. Raises StoreError (naming the path)
    for a missing or damaged store, split or epoch; ImportError if xarray is not installed.
    """
    xr = _import_xarray()
    import dask.array as da
    import numpy as np

    if epoch is not None:
        check_epoch_number(epoch)
    shards = open_stored_shards(path, split, epoch)
    info = shards[0].info
    data_vars: dict[str, list[Any]] = {name: [] for name in ARRAYS}
    dims_of: dict[str, tuple[str, ...]] = {}
    coords: dict[str, list[Any]] = {name: [] for name in shards[0].labels}
    ranks = []
    for k, shard in enumerate(shards):
        for name, arr in zip(ARRAYS, (shard.y_true, shard.y_pred)):
            dims, dask_arr = _lazy(arr, name, shard.info)
            dims_of[name] = dims
            data_vars[name].append(dask_arr)
        for name in coords:
            arr = shard.labels.get(name)
            if arr is None:
                raise StoreError(f"{shard.info.path} has no {name!r} array, but rank 0's shard has one.")
            coords[name].append(da.from_zarr(arr)[: shard.info.rows])
        ranks.append(da.full(shard.info.rows, k, dtype=np.int64, chunks=shard.info.chunk_rows or 1))
    if dims_of["y_true"] != dims_of["y_pred"]:
        raise StoreError(
            f"{info.path} is damaged: y_true has dims {dims_of['y_true']} but y_pred has {dims_of['y_pred']}."
        )
    variables = {name: ((SAMPLE_DIM, *dims_of[name][1:]), _cat(da, parts)) for name, parts in data_vars.items()}
    coord_vars = {name: (SAMPLE_DIM, _cat(da, parts)) for name, parts in coords.items()}
    if len(shards) > 1:
        coord_vars["rank"] = (SAMPLE_DIM, _cat(da, ranks))

    try:
        attrs = _attrs(info.path)
    except FileNotFoundError:  # removed since it was opened (e.g. by a recorder's retention)
        raise StoreError(f"{info.path} vanished while it was being opened.") from None
    rows = sum(s.info.rows for s in shards)
    attrs.update({  # the values validated together with the arrays, whatever a writer changed since
        "epoch": info.epoch, "rows": rows, "batches": sum(s.info.batches for s in shards),
        "complete": all(s.info.complete for s in shards), "run_id": info.run_id,
        "trailing_shape": list(info.trailing_shape), "chunk_rows": info.chunk_rows,
    })
    attrs.setdefault("split", split)
    attrs["path"] = str(info.path) if len(shards) == 1 else [str(s.info.path) for s in shards]
    attrs.pop("shard", None)
    if len(shards) > 1:
        attrs["shards"] = len(shards)
    if "ids" in coords:
        attrs["note"] = ("rows as recorded: a sample id recorded more than once (e.g. DistributedSampler "
                         "padding) appears more than once here; metrics count it once")
    return xr.Dataset(variables, coords=coord_vars, attrs=attrs)


def _cat(da: Any, parts: list[Any]) -> Any:
    return parts[0] if len(parts) == 1 else da.concatenate(parts, axis=0)


def _lazy(arr: Any, name: str, info: Any) -> tuple[tuple[str, ...], Any]:
    """The array's dims and a dask array over its durable rows (validated against the epoch's info)."""
    import dask.array as da
    from dask.base import tokenize

    rows = info.rows
    where = info.path / name
    shape = tuple(int(s) for s in arr.shape)
    if len(shape) != 1 + len(info.trailing_shape) or shape[1:] != info.trailing_shape:
        raise StoreError(
            f"{where} is damaged: shape {shape} does not match the epoch's trailing_shape "
            f"{list(info.trailing_shape)}."
        )
    if shape[0] < rows:
        raise StoreError(
            f"{where} is damaged: it holds {shape[0]} rows but the epoch's attributes say "
            f"{rows} rows are durable."
        )
    dims = tuple(arr.metadata.dimension_names or ()) or _dimension_names(len(shape))
    if len(dims) != len(shape) or dims[0] != _ROW_DIM or any(not isinstance(n, str) for n in dims):
        raise StoreError(
            f"{where / 'zarr.json'} is damaged: dimension_names {list(dims)} do not fit an array of "
            f"shape {shape} whose first dim is {_ROW_DIM!r}."
        )
    # a name of our own: dask's default tokenizes the zarr.Array object itself
    token = tokenize(str(where.resolve()), info.run_id, info.updated, shape, arr.chunks, str(arr.dtype))
    return dims, da.from_zarr(arr, name=f"oocmetrics-{name}-{token}")[:rows]
