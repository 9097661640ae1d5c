"""A small temporal convolutional network: (B, T, C) sensor windows -> (B, T, J) joint angles.

An input 1x1 projection, ``layers`` residual blocks of dilated conv1d (dilation 2**i, so the
receptive field grows exponentially with depth at constant cost per layer), and a 1x1 output head.
Padding keeps T: same-padded by default, or causal (left-padded) with ``causal=True``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from trainer.config import ModelConfig

__all__ = ["TCN", "build_model"]


class _Block(nn.Module):
    """x + GELU(conv_dilated(x)): one residual block over (B, H, T)."""

    def __init__(self, hidden: int, kernel_size: int, dilation: int, causal: bool) -> None:
        super().__init__()
        span = (kernel_size - 1) * dilation
        self.pad = (span, 0) if causal else (span // 2, span - span // 2)
        self.conv = nn.Conv1d(hidden, hidden, kernel_size, dilation=dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.gelu(self.conv(F.pad(x, self.pad)))


class TCN(nn.Module):
    """Dilated residual conv stack mapping (B, T, in_channels) -> (B, T, out_channels)."""

    def __init__(self, in_channels: int, out_channels: int, *, hidden: int = 32, layers: int = 5,
                 kernel_size: int = 5, causal: bool = False) -> None:
        super().__init__()
        self.inp = nn.Conv1d(in_channels, hidden, 1)
        self.blocks = nn.ModuleList(_Block(hidden, kernel_size, 2**i, causal) for i in range(layers))
        self.out = nn.Conv1d(hidden, out_channels, 1)
        self.receptive_field = 1 + (kernel_size - 1) * (2**layers - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[-1] != self.inp.in_channels:
            raise ValueError(f"Expected input of shape (batch, time, {self.inp.in_channels}), "
                             f"but got {tuple(x.shape)}.")
        h = self.inp(x.transpose(1, 2))  # conv1d wants (B, C, T)
        for block in self.blocks:
            h = block(h)
        return self.out(h).transpose(1, 2)


def build_model(cfg: ModelConfig, in_channels: int, out_channels: int) -> TCN:
    """The TCN for a config and the dataset's channel counts."""
    return TCN(in_channels, out_channels, hidden=cfg.hidden, layers=cfg.layers,
               kernel_size=cfg.kernel_size, causal=cfg.causal)
