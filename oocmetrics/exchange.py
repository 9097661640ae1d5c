"""How the processes of one computation share small results: nothing (one process), or torch.distributed.

Epoch-end work under DDP exchanges only small objects: id sets, per-rank merged partials (K x J
floats), histograms of the order-statistics passes and their few candidates; never predictions.
Every rank receives the same list in rank order, so every rank merges the same bits.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, TypeVar

import numpy as np

__all__ = ["Exchange", "TorchExchange", "ddp_world"]

T = TypeVar("T")


class Exchange:
    """One process: gathering returns the caller's own object, summing returns the array itself."""

    rank = 0
    size = 1

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (a collective: every rank must call it)."""
        return [obj]

    def sum(self, array: np.ndarray) -> np.ndarray:
        """The element-wise sum of every rank's ``array`` (same shape and dtype on every rank)."""
        return array

    def call(self, fn: Callable[[], T], what: str, error: type[Exception] = RuntimeError) -> T:
        """``fn()`` on this rank, then a check that it worked on every rank (a collective).

        A failure on one rank is raised on every rank (its own error there, an ``error`` naming it on
        the others), so no rank is left waiting in the next collective.
        """
        if self.size == 1:
            return fn()
        try:
            out, err = fn(), None
        except BaseException as exc:  # raised below, once the other ranks know
            out, err = None, exc
        msgs = self.gather(None if err is None else f"{type(err).__name__}: {err}")
        if err is not None:
            raise err
        bad = [f"rank {r}: {m}" for r, m in enumerate(msgs) if m is not None]
        if bad:
            raise error(f"{what} failed on another rank; no result on any rank ({'; '.join(bad)}).")
        return out  # type: ignore[return-value]


class TorchExchange(Exchange):
    """The ranks of a ``torch.distributed`` process group (gloo or NCCL)."""

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self._nccl = dist.get_backend(group) == "nccl"

    def gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.size
        self._dist.all_gather_object(out, obj, group=self.group)
        return out

    def sum(self, array: np.ndarray) -> np.ndarray:
        import torch

        t = torch.from_numpy(np.ascontiguousarray(array))
        if self._nccl:  # NCCL reduces device tensors only
            t = t.to(torch.device("cuda", torch.cuda.current_device()))
        self._dist.all_reduce(t, op=self._dist.ReduceOp.SUM, group=self.group)
        return t.cpu().numpy()


def ddp_world(group: Any = None) -> TorchExchange | None:
    """The torch.distributed group when one with more than one rank is initialised, else None.

    torch is not imported for the check: a process that never imported it is not in a DDP run.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    dist = getattr(torch, "distributed", None)
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    if dist.get_world_size(group) < 2:
        return None
    return TorchExchange(group)
