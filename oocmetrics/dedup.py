"""Sample ids: every metric counts each id once, whichever rank or batch recorded it how many times.

``DistributedSampler`` pads the last shards with copies of the first samples so that every rank gets
as many; a sample can also be recorded twice by mistake. With ids, copies are removed *before* any
reduction. The rule, deterministic and the same everywhere: **the first copy wins**, in the order
(shard, row): rank 0's rows before rank 1's, and within a shard the earliest row. The losing copies
are checked against the winner (a 64-bit hash of each row's y_true and of its y_pred) and reported:
copies with different y_true mean the ids are wrong; different y_pred mean the model was not
deterministic across ranks (e.g. other batch compositions on a GPU).

Shards exchange only id sets and row hashes, never predictions; only the chunks that hold copies
are read again. Memory: the ids, 8 bytes per row (1.4 MB for the seed's 176,224 windows).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["IdSummary", "summarize_ids", "plan_shard", "rows_by_block", "row_hashes", "duplicate_report"]


@dataclass(frozen=True)
class IdSummary:
    """What a shard tells the others about its ids: the set, and the ids it holds more than once."""

    unique: np.ndarray  # sorted unique ids
    repeated: np.ndarray  # sorted ids that occur more than once in this shard


def summarize_ids(ids: np.ndarray) -> IdSummary:
    s = np.sort(np.asarray(ids, np.int64), kind="stable")
    if s.size == 0:
        empty = np.zeros(0, np.int64)
        return IdSummary(empty, empty)
    same = s[1:] == s[:-1]
    first = np.concatenate([[True], ~same])
    return IdSummary(unique=s[first], repeated=np.unique(s[1:][same]))


def _union(arrays: list[np.ndarray]) -> np.ndarray:
    return np.unique(np.concatenate(arrays)) if arrays else np.zeros(0, np.int64)


def _isin_sorted(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    if sorted_set.size == 0 or values.size == 0:
        return np.zeros(values.shape, bool)
    pos = np.searchsorted(sorted_set, values).clip(max=sorted_set.size - 1)
    return sorted_set[pos] == values


def plan_shard(ids: np.ndarray, index: int, summaries: list[IdSummary | None]) -> tuple[np.ndarray, np.ndarray]:
    """Rows of shard ``index`` (with ``ids``) that hold a duplicated id, and the rows that lose.

    Returns ``(involved, drop)``, ascending row numbers: ``involved`` are the rows whose id occurs more
    than once anywhere (they are hashed to check the copies agree), ``drop`` the copies left out of
    every metric: an id seen in an earlier shard, or earlier in this shard.
    """
    ids = np.asarray(ids, np.int64)
    own = summaries[index]
    if own is None or ids.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    earlier = _union([s.unique for s in summaries[:index] if s is not None])
    later = _union([s.unique for s in summaries[index + 1:] if s is not None])
    in_earlier = _isin_sorted(ids, earlier)
    duplicated = np.union1d(own.repeated, np.intersect1d(own.unique, np.union1d(earlier, later), assume_unique=True))
    involved = np.flatnonzero(_isin_sorted(ids, duplicated))
    order = np.argsort(ids, kind="stable")
    s = ids[order]
    again = np.zeros(ids.size, bool)
    again[order[1:][s[1:] == s[:-1]]] = True  # stable sort: the first row of each id stays
    drop = np.flatnonzero(in_earlier | again)
    return involved, drop


def rows_by_block(rows: np.ndarray, block_rows: int) -> dict[int, np.ndarray]:
    """Row numbers grouped by block: ``{block: offsets within the block}``."""
    blocks = rows // block_rows
    return {int(b): rows[blocks == b] - int(b) * block_rows for b in np.unique(blocks)}


def row_hashes(t: np.ndarray, p: np.ndarray) -> np.ndarray:
    """(rows, 2) uint64: a 64-bit BLAKE2 hash of each row's y_true bytes and of its y_pred bytes."""
    out = np.empty((t.shape[0], 2), np.uint64)
    for i in range(t.shape[0]):
        for k, a in enumerate((t[i], p[i])):
            out[i, k] = int.from_bytes(hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=8).digest(), "little")
    return out


def duplicate_report(entries: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Compare every copy with the winning one. ``entries[s] = (ids, hashes)`` of shard s's involved
    rows, in row order. Returns counts for ``EpochMetrics.extra`` (the same on every rank)."""
    ids = np.concatenate([e[0] for e in entries] or [np.zeros(0, np.int64)]).astype(np.int64)
    hashes = np.concatenate([e[1] for e in entries] or [np.zeros((0, 2), np.uint64)])
    if ids.size == 0:
        return {"duplicate_rows": 0, "conflicting_targets": 0, "conflicting_predictions": 0}
    order = np.argsort(ids, kind="stable")  # (shard, row) order kept within an id: the winner is first
    ids, hashes = ids[order], hashes[order]
    first = np.concatenate([[True], ids[1:] != ids[:-1]])
    winner = np.maximum.accumulate(np.where(first, np.arange(ids.size), 0))
    lost = ~first
    bad_t = lost & (hashes[:, 0] != hashes[winner, 0])
    bad_p = lost & (hashes[:, 1] != hashes[winner, 1])
    report: dict[str, Any] = {
        "duplicate_rows": int(lost.sum()),
        "conflicting_targets": int(bad_t.sum()),
        "conflicting_predictions": int(bad_p.sum()),
    }
    if bad_t.any() or bad_p.any():
        report["conflicting_ids"] = [int(v) for v in np.unique(ids[bad_t | bad_p])[:10]]
    return report
