"""Exact metrics over the shards of an epoch: one plain split, several DDP ranks' stores read in one
process, or (under DDP) each rank its own shard with small results exchanged.

The same steps run in every case, so a DDP run's ``compute()`` and a later ``compute_stored`` over
its shards give the same bits:

1. every shard summarises its ids (the set, and ids it holds twice); the summaries are shared;
2. each shard works out which of its rows lose to an earlier copy (:mod:`oocmetrics.dedup`), reads
   only the chunks that hold duplicated ids (to hash the copies and recompute those chunks'
   partials without the losing rows), and merges its chunks' partials in the fixed tree;
3. the shards' merged partials are merged in shard (rank) order; order statistics and quantiles
   take radix-select passes in which each shard reads its own chunks and histograms are summed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import dask
import numpy as np

from oocmetrics.compute import (
    LOCAL, SPLIT_EVERY, RowBlocks, ShardBlocks, Source, block_partials, compute_partials, finish_metrics,
    merge_tree, usable_partials,
)
from oocmetrics.dedup import IdSummary, duplicate_report, plan_shard, row_hashes, rows_by_block, summarize_ids
from oocmetrics.exchange import Exchange
from oocmetrics.kernels.moments import empty_partials, n_outputs
from oocmetrics.metrics import EpochMetrics, resolve_metrics

__all__ = ["Shard", "compute_shards", "block_stacks"]


@dataclass
class Shard:
    """One writer's rows of an epoch: ``rows`` rows of two zarr (or NumPy) arrays, with their stored
    per-chunk partials and sample ids when there are any. ``rows == 0``: a rank that recorded nothing."""

    y_true: Any = None
    y_pred: Any = None
    rows: int = 0
    partials: Any = None
    ids: Any = None
    buffers: list[tuple[np.ndarray, ...]] | None = None  # idle chunk buffers the reads may use
    name: str = ""  # for messages: "rank 1", a path


class _NoBlocks:
    """The blocks of a shard with no rows (a rank that recorded nothing still joins the passes)."""

    n_blocks = 0
    rows = 0
    kept_rows = 0
    drop: dict[int, np.ndarray] = {}

    def __init__(self, n_outputs: int) -> None:
        self.n_outputs = n_outputs

    def read(self, i: int, *, rows: bool = False) -> tuple[np.ndarray, np.ndarray]:
        raise IndexError(f"block {i} of a shard with no rows")


def _describe(shard: Shard) -> tuple[dict[str, Any], np.ndarray | None]:
    """What the other shards need to know about this one (small), and its ids (kept here)."""
    if shard.rows == 0:
        return {"name": shard.name, "rows": 0}, None
    ids = None if shard.ids is None else np.asarray(shard.ids[: shard.rows], np.int64)
    return {
        "name": shard.name, "rows": shard.rows, "trailing": tuple(shard.y_true.shape[1:]),
        "ids": None if ids is None else summarize_ids(ids),
    }, ids


def _check(public: list[dict[str, Any]], split: str | None, epoch: int | None) -> None:
    """The same ValueError on every rank for shards that cannot be combined."""
    where = f"epoch {epoch} of split {split!r}"
    live = [d for d in public if d["rows"] > 0]
    if not live:
        raise ValueError(
            f"No rows recorded in {where}"
            f"{' on any of the ' + str(len(public)) + ' ranks' if len(public) > 1 else ''}: call "
            f"update(y_true, y_pred) at least once before compute()."
        )
    shapes = {d["trailing"] for d in live}
    if len(shapes) > 1:
        raise ValueError(
            f"The shards of {where} hold rows of different shapes: "
            f"{', '.join(str(d['name']) + ': ' + str(d['trailing']) for d in live)}; every rank must record the same "
            f"trailing shape."
        )
    with_ids = [d["name"] for d in live if d["ids"] is not None]
    without = [d["name"] for d in live if d["ids"] is None]
    if with_ids and without:
        raise ValueError(
            f"Sample ids were recorded by {with_ids} but not by {without} in {where}: pass ids=... to "
            f"every update() on every rank, or on none."
        )
    if len(public) > 1 and without:
        raise ValueError(
            f"{where} has {len(public)} shards (DDP ranks) recorded without sample ids, so copies of a "
            f"sample (DistributedSampler pads the last shards with copies of the first samples) cannot "
            f"be counted once. Pass update(y_true, y_pred, ids=...) with each row's dataset index."
        )


def _scan_duplicates(
    blocks: RowBlocks, involved: np.ndarray, ids: np.ndarray, scheduler: Any,
) -> tuple[dict[int, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Read only the blocks holding duplicated ids: hash their involved rows, and recompute the
    partials of blocks that lose rows. Returns ``({block: partials}, (ids, hashes) of involved rows)``."""
    if involved.size == 0:
        return {}, (np.zeros(0, np.int64), np.zeros((0, 2), np.uint64))
    by_block = rows_by_block(involved, blocks.block_rows)

    def task(b: int, offsets: np.ndarray) -> tuple[int, np.ndarray | None, np.ndarray]:
        t, p = blocks.read(b, rows=True)
        hashes = row_hashes(t[offsets], p[offsets])
        gone = blocks.drop.get(b)
        parts = None if gone is None else block_partials(np.delete(t, gone, axis=0), np.delete(p, gone, axis=0))
        return b, parts, hashes

    done = dask.compute(*[dask.delayed(task, pure=False)(b, o) for b, o in by_block.items()], scheduler=scheduler)
    replaced = {b: parts for b, parts, _ in done if parts is not None}
    hashes = np.concatenate([h for _, _, h in done])  # blocks in ascending order: rows in row order
    return replaced, (ids[involved], hashes)


@dataclass
class _Planned:
    """One local shard after deduplication planning: its blocks (losing rows dropped), the partials of
    the blocks that lost rows, its copies' hashes, and its stored per-chunk partials (if usable)."""

    blocks: Any
    replaced: dict[int, np.ndarray]
    entries: tuple[np.ndarray, np.ndarray]
    stack: np.ndarray | None


def _plan(
    local: list[Shard], exchange: Exchange, source: Source, scheduler: Any, split: str | None, epoch: int | None,
) -> tuple[list[dict[str, Any]], list[_Planned]]:
    """Share the shards' id summaries, check them, and plan every local shard (see :class:`_Planned`)."""
    ddp = exchange.size > 1
    if ddp and len(local) != 1:
        raise ValueError(f"under DDP each rank computes its own one shard; got {len(local)}.")
    described = exchange.call(lambda: [_describe(s) for s in local], "reading the shards' ids")
    public = [d for d, _ in described]
    if ddp:
        public = [d for per_rank in exchange.gather(public) for d in per_rank]
    _check(public, split, epoch)
    first = exchange.rank if ddp else 0  # global index of local[0]
    summaries: list[IdSummary | None] = [d.get("ids") for d in public]
    J = n_outputs((1, *next(d["trailing"] for d in public if d["rows"] > 0)))
    none = (np.zeros(0, np.int64), np.zeros((0, 2), np.uint64))
    return public, exchange.call(lambda: _plan_local(local, described, first, summaries, J, none, source, scheduler),
                                 "re-reading the chunks that hold duplicated ids")


def _plan_local(
    local: list[Shard], described: list[tuple[dict[str, Any], np.ndarray | None]], first: int,
    summaries: list[IdSummary | None], J: int, none: tuple[np.ndarray, np.ndarray], source: Source, scheduler: Any,
) -> list[_Planned]:
    """This process's shards planned (see :class:`_Planned`)."""
    planned = []
    for k, (shard, (_, ids)) in enumerate(zip(local, described)):
        if shard.rows == 0:
            planned.append(_Planned(_NoBlocks(J), {}, none, None))
            continue
        chunk_rows = int(shard.y_true.chunks[0]) if hasattr(shard.y_true, "chunks") else shard.rows
        involved = drop = np.zeros(0, np.int64)
        if ids is not None:
            involved, drop = plan_shard(ids, first + k, summaries)
        blocks = RowBlocks(shard.y_true, shard.y_pred, shard.rows, chunk_rows, shard.buffers,
                           drop=rows_by_block(drop, chunk_rows))
        replaced, entries = _scan_duplicates(blocks, involved, ids, scheduler) if ids is not None else ({}, none)
        stack = None
        if source != "data":
            stack = usable_partials(shard.partials, shard.rows, chunk_rows, tuple(shard.y_true.shape[1:]))
            if stack is not None:
                for b, v in replaced.items():
                    stack[b] = v
        planned.append(_Planned(blocks, replaced, entries, stack))
    return planned


def block_stacks(shards: list[Shard], *, scheduler: Any = None) -> list[tuple[np.ndarray | None, Any]]:
    """For each shard with rows, in one process: ``(stack, blocks)``. ``stack`` is its per-chunk
    partials (chunks, K, J): the stored ones, with the chunks that hold losing copies of an id
    recomputed without them, or None where the stored partials do not cover the shard's rows;
    ``blocks`` reads its chunks without the losing rows. Every id counts once over all of them."""
    _, planned = _plan(shards, LOCAL, "auto", scheduler, None, None)
    return [(p.stack, p.blocks) for p in planned if not isinstance(p.blocks, _NoBlocks)]


def compute_shards(
    local: list[Shard], *, exchange: Exchange = LOCAL, source: Source = "auto",
    metrics: Iterable[str] | None = None, quantiles: Any = None, split_every: int = SPLIT_EVERY,
    scheduler: Any = None, progress: bool = False, epoch: int | None = None, split: str | None = None,
) -> EpochMetrics:
    """Exact metrics over every shard's rows, each sample id counted once.

    ``local``: the shards this process reads: all of them, or under DDP (``exchange`` of more than one
    rank) exactly this rank's one, and then every rank must call this (a collective).
    ``source``: "auto" merges each chunk's stored partials when they cover its rows, "data" reads the
    data, "partials" requires stored partials. The result is the same on every rank, bit for bit.
    """
    if source not in ("auto", "partials", "data"):
        raise ValueError(f"source={source!r}; expected 'auto', 'partials' or 'data'.")
    metrics = resolve_metrics(metrics)
    public, planned = _plan(local, exchange, source, scheduler, split, epoch)

    def merge_local() -> list[tuple[np.ndarray, int, tuple[np.ndarray, np.ndarray], bool]]:
        out = []
        for p in planned:
            if isinstance(p.blocks, _NoBlocks):
                merged, used = empty_partials(p.blocks.n_outputs), True
            elif p.stack is not None:
                merged, used = merge_tree(p.stack, split_every), True
            else:
                merged, used = compute_partials(p.blocks, split_every=split_every, scheduler=scheduler,
                                                progress=progress, replaced=p.replaced), False
            out.append((merged, p.blocks.kept_rows, p.entries, used))
        return out

    shared = exchange.call(merge_local, "the pass over the data")
    if exchange.size > 1:
        shared = [x for per_rank in exchange.gather(shared) for x in per_rank]
    used = [u for (_, _, _, u), d in zip(shared, public) if d["rows"] > 0]
    if source == "partials" and not all(used):
        raise ValueError(
            "source='partials', but this epoch has no stored partials covering its rows (a store "
            "written before they existed, or a crash mid-chunk); use source='data' or 'auto'."
        )
    partials = merge_tree(np.stack([m for m, _, _, _ in shared]), split_every)
    n_rows = sum(kept for _, kept, _, _ in shared)
    local_blocks = [p.blocks for p in planned]
    blocks_all = local_blocks[0] if len(local_blocks) == 1 else ShardBlocks(local_blocks)
    result = finish_metrics(
        blocks_all, partials, n_rows, metrics=metrics, quantiles=quantiles, split_every=split_every,
        scheduler=scheduler, exchange=exchange, epoch=epoch, split=split,
    )
    result.extra["source"] = "partials" if all(used) else ("data" if not any(used) else "partials+data")
    if len(public) > 1:
        result.extra["shards"] = len(public)
    if any(d.get("ids") is not None for d in public):
        result.extra.update(duplicate_report([e for _, _, e, _ in shared]))
    return result
