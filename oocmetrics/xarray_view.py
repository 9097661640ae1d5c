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
from oocmetrics.stored import open_stored_epoch
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
    are the Dataset's ``attrs``. The per-chunk ``partials`` are not exposed.

    Takes no lock and reads nothing but metadata until computed. Raises StoreError (naming the path)
    for a missing or damaged store, split or epoch; ImportError if xarray is not installed.
    """
    xr = _import_xarray()
    import dask.array as da
    from dask.base import tokenize

    if epoch is not None:
        check_epoch_number(epoch)
    y_true, y_pred, info = open_stored_epoch(path, split, epoch)
    epoch = info.epoch

    rows = info.rows
    data_vars = {}
    for name, arr in zip(ARRAYS, (y_true, y_pred)):
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
        dask_arr = da.from_zarr(arr, name=f"oocmetrics-{name}-{token}")
        data_vars[name] = ((SAMPLE_DIM, *dims[1:]), dask_arr[:rows])
    if data_vars["y_true"][0] != data_vars["y_pred"][0]:
        raise StoreError(
            f"{info.path} is damaged: y_true has dims {data_vars['y_true'][0]} but y_pred has "
            f"{data_vars['y_pred'][0]}."
        )

    try:
        attrs = _attrs(info.path)
    except FileNotFoundError:  # removed since it was opened (e.g. by a recorder's retention)
        raise StoreError(f"{info.path} vanished while it was being opened.") from None
    attrs.update({  # the values validated together with the arrays, whatever a writer changed since
        "epoch": info.epoch, "rows": rows, "batches": info.batches, "complete": info.complete,
        "run_id": info.run_id, "trailing_shape": list(info.trailing_shape), "chunk_rows": info.chunk_rows,
    })
    attrs.setdefault("split", split)
    attrs["path"] = str(info.path)
    return xr.Dataset(data_vars, attrs=attrs)
