"""Exact regression metrics for ``transformers.Trainer`` evaluation, without concatenating logits.

    from oocmetrics.integrations.huggingface import OOCMetricsEval

    metrics = OOCMetricsEval("runs/exp1", split="eval", mode="overwrite")
    args = TrainingArguments(..., batch_eval_metrics=True)
    trainer = Trainer(model, args, eval_dataset=ds, compute_metrics=metrics)
    trainer.evaluate()          # {"eval_mse": ..., "eval_rmse": ..., "eval_r2": ..., ...}
    metrics.close()

This module imports neither ``transformers`` nor ``torch`` at import time (``torch.distributed`` is
looked at only when a call comes), and ``import oocmetrics`` does not import this module.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Iterable

import numpy as np

from oocmetrics import EpochMetrics, Recorder

__all__ = ["OOCMetricsEval"]


def _dist() -> Any:
    """``torch.distributed`` when a process group is initialised, else None (torch not imported here)."""
    import sys

    if "torch" not in sys.modules:  # the Trainer always imports torch first; no group without it
        return None
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist
    return None


def _process_rank() -> int:
    dist = _dist()
    if dist is not None:
        return int(dist.get_rank())
    return int(os.environ.get("RANK", "0") or 0)  # set by torchrun / accelerate launch before the group exists


def _is_float(x: Any) -> bool:
    if hasattr(x, "is_floating_point"):  # a torch tensor
        return bool(x.is_floating_point())
    return np.asarray(x).dtype.kind == "f"


def _dtype(x: Any) -> str:
    return str(getattr(x, "dtype", type(x).__name__))


class OOCMetricsEval:
    """``compute_metrics`` for ``Trainer(..., args=TrainingArguments(batch_eval_metrics=True))``.

    Each evaluation batch's ``(label_ids, predictions)`` is appended to an :class:`oocmetrics.Recorder`
    store on disk as it comes; at the last batch (``compute_result=True``) the exact metrics over every
    evaluation sample are computed, returned as ``{name: float}`` (the Trainer logs them as
    ``eval_<name>``), and the recorder moves on, so the next evaluation is stored as the next epoch
    number. Nothing is concatenated: the Trainer drops each batch after the call and this object
    keeps no reference to it (the Recorder copies the rows into its bounded chunk buffers).

    Args:
        path: run directory of the store (see :class:`~oocmetrics.Recorder`).
        split: split the evaluations are recorded under (default ``"eval"``).
        metrics: metric names (:data:`oocmetrics.METRICS` by default; ``"median_absolute_error"`` on
            request).
        per_output: also return each metric per output, as ``f"{prefix}{name}_{j}"`` (j: index on the
            last axis).
        prefix: prepended to every key (the Trainer adds ``"eval_"`` itself).
        **recorder_kwargs: passed to :class:`~oocmetrics.Recorder` (``mode="overwrite"`` / ``"resume"``
            when the split exists, ``epoch=`` for the first evaluation's number, ``keep_epochs``
            (default 1: only the newest evaluation stays on disk), ``chunk_mb``, ``nonfinite``, ...).

    What is recorded:
        ``predictions``: the model output after ``preprocess_logits_for_metrics``; a tuple (a model
        returning several outputs) contributes its first element. ``label_ids``: the labels (a tuple
        of several label tensors is refused). Shapes ``(batch,)`` or ``(batch, outputs)`` (or
        ``(batch, ..., outputs)``), equal for both; ``(batch, 1)`` against ``(batch,)`` (a
        ``num_labels=1`` regression head) is accepted and recorded as ``(batch,)``. Both must be
        floating point (float16/bfloat16 are stored as float32).

    Calls and evaluations:
        - The Trainer calls this once per evaluation batch with ``compute_result=False`` (this returns
          ``{}``; the Trainer keeps only the last call's return) and with ``compute_result=True`` at
          the last batch. Every ``trainer.evaluate()`` is a new stored epoch (0, 1, 2, ... or from
          ``epoch=``); so is each dataset of a dict ``eval_dataset``, and ``trainer.predict()`` when
          the test set has labels: give ``predict`` its own instance
          (``trainer.compute_metrics = OOCMetricsEval(path, split="test")``) to keep them apart.
        - The Trainer skips the call for a batch whose logits or labels are None (no labels in the
          data, ``prediction_loss_only=True``); if that happens to the last batch, nothing is
          computed and the rows stay in the open epoch. Likewise, an evaluation that raises midway
          leaves its rows in the open epoch: call :meth:`discard` before evaluating again.
        - Without ``batch_eval_metrics=True`` the Trainer would concatenate every logit and call
          without ``compute_result``; that raises a TypeError naming the fix.

    Distributed (``torch.distributed`` initialised, e.g. ``torchrun`` / ``accelerate launch``): the
    Trainer passes the batch already gathered from every process (``gather_for_metrics``, duplicates
    of the last batch dropped), so only process 0 records and holds the store; the others record
    nothing and open no store. At ``compute_result=True`` process 0 broadcasts the metrics so every
    process returns the same dict (``metric_for_best_model`` works on all of them); an error on
    process 0 at that point is raised on every process. Before the process group exists, the
    ``RANK`` environment variable decides (process 0 opens the store in the constructor).

    ``Seq2SeqTrainer`` subclasses ``Trainer`` and inherits its ``evaluation_loop``, so the calls are
    the same; only its ``prediction_step`` differs. With ``predict_with_generate=False`` (default)
    ``predictions`` is the model's forward output as with ``Trainer`` (use it as above when that is a
    float regression output shaped like the labels). With ``predict_with_generate=True``
    ``predictions`` are generated token ids (integers, padded) and ``label_ids`` token ids (padded
    with -100): not regression targets; they are refused with a TypeError. Decode them in
    ``preprocess_logits_for_metrics`` into float values shaped like float labels if that is meant.

    Close with :meth:`close` (or ``with OOCMetricsEval(...) as m:``) to release the split's lock.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        split: str = "eval",
        *,
        metrics: Iterable[str] | None = None,
        per_output: bool = False,
        prefix: str = "",
        **recorder_kwargs: Any,
    ) -> None:
        if not isinstance(prefix, str):
            raise TypeError(f"prefix={prefix!r}; expected a str (the Trainer adds 'eval_' itself).")
        self.path = path
        self.split = split
        self.per_output = bool(per_output)
        self.prefix = prefix
        self._metrics = None if metrics is None else list(metrics)
        # process 0 alone records the already-gathered batches: its Recorder must not act as a DDP shard
        self._kwargs = {**recorder_kwargs, "distributed": False}
        self.last_result: EpochMetrics | None = None
        """The full result of the last finished evaluation (``per_output``, ``n_rows``, ``epoch``, ...)."""
        self._rank0 = _process_rank() == 0
        self._rec: Recorder | None = None
        self._closed = False
        if self._rank0:
            self._rec = Recorder(path, split, metrics=self._metrics, **self._kwargs)

    # ------------------------------------------------------------------------------- properties
    @property
    def recorder(self) -> Recorder | None:
        """The underlying Recorder (None on processes other than 0)."""
        return self._rec

    @property
    def epoch(self) -> int | None:
        """The epoch number the current (or next) evaluation is stored as; None off process 0."""
        return None if self._rec is None else self._rec.epoch

    @property
    def closed(self) -> bool:
        return self._closed

    # ------------------------------------------------------------------------------------- call
    def __call__(self, eval_pred: Any, compute_result: bool | None = None) -> dict[str, float]:
        if compute_result is None:
            raise TypeError(
                "OOCMetricsEval was called without compute_result: the Trainer is concatenating every "
                "logit of the evaluation, which this adapter exists to avoid. Pass "
                "TrainingArguments(..., batch_eval_metrics=True)."
            )
        if self._closed:
            raise RuntimeError(
                f"OOCMetricsEval({str(self.path)!r}, split={self.split!r}) is closed; create a new one "
                f"(mode='resume' continues the stored epochs)."
            )
        dist = _dist()
        if dist is not None and (dist.get_rank() == 0) != self._rank0:
            raise RuntimeError(
                f"OOCMetricsEval was created as process {'0' if self._rank0 else 'other than 0'} (from "
                f"the RANK environment variable), but torch.distributed says rank {dist.get_rank()}. "
                f"Create it after the process group is initialised, or launch with torchrun."
            )
        multi = dist is not None and dist.get_world_size() > 1
        if not self._rank0:  # the batch was gathered: process 0 records it
            if not compute_result:
                return {}
            return self._receive(dist)
        if not compute_result:
            self._record(eval_pred)
            return {}
        try:
            self._record(eval_pred)
            out = self._finish_evaluation()
        except BaseException as exc:
            if multi:
                self._send(dist, {"__error__": f"{type(exc).__name__}: {exc}"})
            raise
        if multi:
            self._send(dist, out)
        return out

    def _record(self, eval_pred: Any) -> None:
        assert self._rec is not None
        if hasattr(eval_pred, "predictions"):
            preds, labels = eval_pred.predictions, eval_pred.label_ids
        else:  # a plain (predictions, label_ids) pair
            preds, labels = eval_pred[0], eval_pred[1]
        if isinstance(preds, (tuple, list)):
            if len(preds) == 0:
                raise ValueError("eval_pred.predictions is an empty tuple; the model returned no outputs.")
            preds = preds[0]  # the first model output (e.g. "logits"); the others are not metrics' input
        if isinstance(labels, (tuple, list)):
            if len(labels) != 1:
                raise ValueError(
                    f"eval_pred.label_ids is a tuple of {len(labels)} label tensors (several "
                    f"TrainingArguments.label_names); OOCMetricsEval needs one float label tensor."
                )
            labels = labels[0]
        if preds is None or labels is None:
            raise ValueError("eval_pred has no predictions or no label_ids; nothing to record.")
        for name, x in (("label_ids", labels), ("predictions", preds)):
            if not _is_float(x):
                raise TypeError(
                    f"eval_pred.{name} has dtype {_dtype(x)}; OOCMetricsEval records regression "
                    f"targets and predictions, which must be floating point. Return float labels from "
                    f"the dataset or collator (e.g. torch.float32); generated token ids "
                    f"(Seq2SeqTrainer predict_with_generate=True) are not regression outputs."
                )
        t_shape, p_shape = tuple(labels.shape), tuple(preds.shape)
        if p_shape == t_shape + (1,) and len(t_shape) >= 1:
            preds = preds[..., 0]  # (batch, 1) head against (batch,) labels
        elif t_shape == p_shape + (1,) and len(p_shape) >= 1:
            labels = labels[..., 0]
        self._rec.update(labels, preds)

    def _finish_evaluation(self) -> dict[str, float]:
        assert self._rec is not None
        result = self._rec.compute()
        out: dict[str, float] = {f"{self.prefix}{name}": float(result[name]) for name in result}
        if self.per_output:  # metrics with a per-output value (not r2_variance_weighted)
            for name, values in result.per_output.items():
                for j, v in enumerate(np.asarray(values).ravel()):
                    out[f"{self.prefix}{name}_{j}"] = float(v)
        self._rec.reset()  # finish this evaluation's epoch; the next evaluation is the next number
        self.last_result = result
        return out

    @staticmethod
    def _send(dist: Any, payload: dict[str, Any]) -> None:
        dist.broadcast_object_list([payload], src=0)

    @staticmethod
    def _receive(dist: Any) -> dict[str, float]:
        if dist is None or dist.get_world_size() == 1:
            return {}
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        payload = box[0]
        if isinstance(payload, dict) and "__error__" in payload:
            raise RuntimeError(f"OOCMetricsEval on process 0 failed: {payload['__error__']}")
        return dict(payload)

    # ------------------------------------------------------------------------------- lifecycle
    def discard(self) -> None:
        """Abandon the rows of an evaluation that did not finish (it raised, or was interrupted).

        They stay on disk as an epoch that is not marked complete, and the next evaluation is
        recorded under the same epoch number, replacing it when it writes its first chunk.
        Nothing to do (no-op) when no evaluation is open, and on processes other than 0.
        """
        rec = self._rec
        if self._closed or rec is None or rec.rows == 0:
            return
        epoch = rec.epoch
        rec.__exit__(RuntimeError, None, None)  # durable, not marked complete, lock released
        kwargs = {**self._kwargs, "mode": "resume", "epoch": epoch}
        self._rec = Recorder(self.path, self.split, metrics=self._metrics, **kwargs)

    def close(self) -> None:
        """Release the store. Idempotent.

        The finished evaluations are already complete on disk. Rows of an evaluation that did not
        finish are kept durable but the epoch is not marked complete (with a warning).
        """
        if self._closed:
            return
        rec = self._rec
        if rec is not None:
            if rec.rows > 0:
                warnings.warn(
                    f"oocmetrics: closing {self.path} split {self.split!r} with an unfinished evaluation "
                    f"({rec.rows} rows in epoch {rec.epoch}, no compute_result=True call); its rows are "
                    f"kept but the epoch is not marked complete.", stacklevel=2,
                )
                rec.__exit__(RuntimeError, None, None)
            else:
                rec.close()
        self._closed = True

    def __enter__(self) -> "OOCMetricsEval":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        if self._rec is not None and not self._closed:
            self._rec.__exit__(exc_type, exc, tb)  # rows durable, open epoch not marked complete
        self._closed = True

    def __repr__(self) -> str:
        state = "closed" if self._closed else (
            f"epoch {self.epoch}, {self._rec.rows} rows" if self._rec is not None else "not process 0"
        )
        return f"OOCMetricsEval({str(self.path)!r}, split={self.split!r}: {state})"
