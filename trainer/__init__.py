"""trainer: an end-to-end PyTorch training run with exact per-epoch metrics from oocmetrics.

Run it with::

    python -m trainer.run                       # `default` preset: a few minutes on 2 CPU cores
    python -m trainer.run --config smoke        # seconds, for tests
    python -m trainer.run --config seed_scale --epochs 1   # the seed's 11,014 batches of 16 x 500 x 20
    python -m trainer.run --data PATH           # your own recordings (format: docs/TRAINER.md)
    python -m trainer.run --resume              # continue from the last checkpoint in --out

Modules, one job each: ``config`` (presets and flags), ``synthetic`` (the embedded dataset),
``data`` (recordings on disk -> batches of windows), ``model`` (a small TCN), ``loop`` (one epoch of
train / validate / evaluate through an ``oocmetrics.Recorder``), ``memory`` (peak RSS sampling),
``report`` (table, history, plot), ``checkpoint`` and ``run`` (the CLI). The trainer uses only the
public ``oocmetrics`` API.
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the CLI (see ``python -m trainer.run --help``); returns the exit code."""
    from trainer.run import main as _main

    return _main(argv)
