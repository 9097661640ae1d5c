"""One epoch of training, validation or test evaluation, with exact metrics from oocmetrics.

Every batch's ``(y_true, y_pred)`` goes straight to ``rec.update`` (the recorder detaches and
copies, and writes chunks to disk in the background); at the end of the epoch ``rec.compute()``
returns metrics over every row of the epoch, however many there were. Memory stays flat: nothing
here keeps predictions.

Train metrics are of the predictions made during the epoch (before each step's update), exactly
like the train loss; the epoch loss is the batch losses averaged with batch-size weights, so for
an MSE loss it equals the recorded train ``mse`` up to float32 rounding.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import oocmetrics
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from trainer.memory import RssSampler

__all__ = ["EpochResult", "train_epoch", "validate_epoch", "evaluate", "log_line"]

_SAMPLE_EVERY = 32  # batches between explicit RSS samples (the sampler thread also runs)


@dataclass
class EpochResult:
    """What one split of one epoch produced; ``row()`` is its line in the history."""

    split: str
    epoch: int
    loss: float
    metrics: dict[str, float]
    n_rows: int
    n_batches: int
    seconds: float
    compute_seconds: float
    peak_rss_mb: float
    peak_anon_mb: float
    details: dict[str, Any] = field(default_factory=dict)  # EpochMetrics.to_dict(): per-output values

    def row(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "split": self.split, "loss": self.loss, **self.metrics,
                "n_rows": self.n_rows, "n_batches": self.n_batches, "seconds": self.seconds,
                "compute_seconds": self.compute_seconds, "peak_rss_mb": self.peak_rss_mb,
                "peak_anon_mb": self.peak_anon_mb}


def log_line(epoch: int, batch: int, n_batches: int, loss: float) -> str:
    """The seed's log format: ``Epoch: 0, Batch: 11010/11014, Loss: 0.192769``."""
    return f"Epoch: {epoch}, Batch: {batch}/{n_batches}, Loss: {loss:.6f}"


def _begin(rec: oocmetrics.Recorder, epoch: int, rss: RssSampler | None) -> None:
    # The previous epoch stays open after compute(); reset(epoch=...) finishes it (if it has rows)
    # and names the next one after the trainer's own epoch, so a resumed run stores epoch k as k.
    rec.reset(epoch=epoch)
    if rss is not None:
        rss.reset()  # this epoch's peak starts now


def _global(loss_sum: float, rows: int, n_batches: int) -> tuple[float, int, int]:
    """Sums over the DDP ranks (loss and rows include the copies DistributedSampler pads in)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return loss_sum, rows, n_batches
    t = torch.tensor([loss_sum, rows, n_batches], dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t)
    return float(t[0]), int(t[1]), int(t[2])


def _batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(x, y) or (x, y, ids) from a loader."""
    x, y, *rest = batch
    return x, y, (rest[0] if rest else None)


QUANTILES = (0.5, 0.9, 0.95, 0.99)


def quantile_columns(res: oocmetrics.EpochMetrics) -> dict[str, float]:
    """``abs_err_p50`` ...: exact quantiles of |y_true - y_pred| pooled over every value of the epoch."""
    if res.quantiles is None:
        return {}
    return {f"abs_err_p{round(q * 100):02d}": float(v) for q, v in zip(res.quantiles["q"], res.quantiles["pooled"])}


def _finish(rec: oocmetrics.Recorder, split: str, epoch: int, loss_sum: float, rows: int,
            n_batches: int, t0: float, rss: RssSampler | None, quantiles: tuple[float, ...] | None = None,
            ) -> EpochResult:
    t1 = time.perf_counter()
    res = rec.compute(quantiles=quantiles)  # exact over every stored row of this epoch (of every rank, under DDP)
    t2 = time.perf_counter()
    loss_sum, rows, n_batches = _global(loss_sum, rows, n_batches)
    return EpochResult(
        split=split, epoch=epoch, loss=loss_sum / rows if rows else math.nan,
        metrics={**{k: float(v) for k, v in res.overall.items()}, **quantile_columns(res)}, n_rows=int(res.n_rows),
        n_batches=n_batches, seconds=t2 - t0, compute_seconds=t2 - t1,
        peak_rss_mb=rss.peak_mb if rss is not None else math.nan,
        peak_anon_mb=rss.peak_anon_mb if rss is not None else math.nan, details=res.to_dict())


def _bar(loader: Iterable, desc: str, progress: bool) -> tqdm:
    return tqdm(loader, total=len(loader), desc=desc, disable=not progress, leave=False,
                dynamic_ncols=True)


def train_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer,
                rec: oocmetrics.Recorder, *, epoch: int,
                loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.mse_loss,
                grad_clip: float = 0.0, log_every: int = 0, progress: bool = False,
                rss: RssSampler | None = None, log: Callable[[str], None] = print,
                device: torch.device | str = "cpu") -> EpochResult:
    """Train one epoch on ``device``, recording every batch's predictions; metrics via ``rec.compute()``."""
    _begin(rec, epoch, rss)
    model.train()
    t0 = time.perf_counter()
    n_batches, loss_sum, rows = len(loader), 0.0, 0
    bar = _bar(loader, f"epoch {epoch} train", progress)
    write = tqdm.write if not bar.disable else log
    for i, batch in enumerate(bar):
        x, y, ids = _batch(batch)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        pred = model(x)
        loss = loss_fn(pred, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        rec.update(y, pred, ids=ids)  # y_true first; the recorder detaches and copies `pred` itself
        batch_loss = loss.item()  # a device sync point on GPU; free on CPU
        loss_sum += batch_loss * y.shape[0]
        rows += y.shape[0]
        if log_every and i % log_every == 0:
            write(log_line(epoch, i, n_batches, batch_loss))
            bar.set_postfix(loss=f"{batch_loss:.4f}", refresh=False)
        if rss is not None and i % _SAMPLE_EVERY == 0:
            rss.sample()
    bar.close()
    return _finish(rec, "train", epoch, loss_sum, rows, n_batches, t0, rss)


@torch.inference_mode()
def validate_epoch(model: nn.Module, loader: Iterable, rec: oocmetrics.Recorder, *, epoch: int,
                   split: str = "val",
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.mse_loss,
                   progress: bool = False, rss: RssSampler | None = None,
                   device: torch.device | str = "cpu", quantiles: tuple[float, ...] | None = None,
                   ) -> EpochResult:
    """Predict every batch of ``loader`` without gradients; exact metrics via ``rec.compute()``
    (with ``quantiles``: also exact quantiles of |error|, columns ``abs_err_p50``...)."""
    _begin(rec, epoch, rss)
    model.eval()
    t0 = time.perf_counter()
    n_batches, loss_sum, rows = len(loader), 0.0, 0
    bar = _bar(loader, f"epoch {epoch} {split}", progress)
    for i, batch in enumerate(bar):
        x, y, ids = _batch(batch)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        pred = model(x)
        rec.update(y, pred, ids=ids)
        loss_sum += loss_fn(pred, y).item() * y.shape[0]
        rows += y.shape[0]
        if rss is not None and i % _SAMPLE_EVERY == 0:
            rss.sample()
    bar.close()
    return _finish(rec, split, epoch, loss_sum, rows, n_batches, t0, rss, quantiles)


def evaluate(model: nn.Module, loader: Iterable, rec: oocmetrics.Recorder, *, epoch: int,
             progress: bool = False, rss: RssSampler | None = None,
             device: torch.device | str = "cpu", quantiles: tuple[float, ...] | None = None) -> EpochResult:
    """The final test-split evaluation (``validate_epoch`` labelled ``test``)."""
    return validate_epoch(model, loader, rec, epoch=epoch, split="test", progress=progress, rss=rss,
                          device=device, quantiles=quantiles)
