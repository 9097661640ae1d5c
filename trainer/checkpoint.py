"""Checkpoints: ``<out>/checkpoint.pt`` holds model + optimizer + config + epoch + history.

Written after every epoch to a temporary file and renamed, so a crash mid-save keeps the previous
checkpoint. Loaded with ``weights_only=True``: a checkpoint is tensors and plain data, never code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.config import RunConfig

__all__ = ["CHECKPOINT", "save_checkpoint", "load_checkpoint"]

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(out: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: RunConfig,
                    epoch: int, history: list[dict[str, Any]]) -> Path:
    """Save the state after finishing ``epoch`` (0-based); returns the path."""
    path = out / CHECKPOINT
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "config": cfg.to_dict(), "epoch": epoch, "history": history}, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(out: Path) -> dict[str, Any]:
    """The checkpoint dict; ``FileNotFoundError`` naming the path and the fix if there is none."""
    path = out / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}; run without --resume to start "
                                "fresh, or pass the --out of the run to continue.")
    return torch.load(path, map_location="cpu", weights_only=True)
