"""Exact epoch metrics for Lightning: :class:`OOCMetricsCallback` records every train / val / test
prediction of a LightningModule into an oocmetrics store and logs exact epoch metrics.

    from oocmetrics.integrations.lightning import OOCMetricsCallback

    class Model(L.LightningModule):
        def training_step(self, batch, batch_idx):
            x, y = batch
            y_hat = self(x)
            loss = F.mse_loss(y_hat, y)
            return {"loss": loss, "y_true": y, "y_pred": y_hat}

        def validation_step(self, batch, batch_idx):
            x, y = batch
            return {"y_true": y, "y_pred": self(x)}      # test_step: the same

    cb = OOCMetricsCallback()
    L.Trainer(callbacks=[cb]).fit(model, train_loader, val_loader)
    trainer.callback_metrics["val_rmse"], cb.results["val"].per_output["r2"]

Contract of the default ``get_targets_preds``: ``training_step`` / ``validation_step`` /
``test_step`` return a dict holding ``"y_true"`` and ``"y_pred"`` (or ``"target"`` and
``"preds"``), torch tensors (any device; ``requires_grad`` is fine) or NumPy arrays, rows on axis 0,
outputs on the last axis, and optionally ``"ids"``: each row's sample id (e.g. its dataset index).
Anything else raises a ``TypeError`` saying what to return. Pass your own
``get_targets_preds(batch, outputs, pl_module) -> (y_true, y_pred)`` or ``(y_true, y_pred, ids)``
(y_true FIRST) for any other layout; it may return None to leave a batch out.

DDP (``strategy="ddp"``): each rank records its own shard of the store and every rank logs the same
exact values over all ranks' samples. ``DistributedSampler`` pads the last ranks with copies of the
first samples; give ids (``"ids"`` in the step's dict) so that each sample is counted once.

Importing this module imports ``lightning``; ``import oocmetrics`` does not.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import lightning.pytorch as pl
import torch

from oocmetrics import EpochMetrics, Recorder, resolve_metrics

__all__ = ["OOCMetricsCallback", "default_get_targets_preds"]

SPLITS = ("train", "val", "test")
_STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}
_STEP = {"train": "training_step", "val": "validation_step", "test": "test_step"}
_KEY_PAIRS = (("y_true", "y_pred"), ("target", "preds"))
_RESERVED = ("path", "split", "epoch", "mode")

GetTargetsPreds = Callable[[Any, Any, "pl.LightningModule"], "tuple[Any, Any] | None"]


def default_get_targets_preds(batch: Any, outputs: Any, pl_module: "pl.LightningModule") -> tuple[Any, ...]:
    """``(outputs["y_true"], outputs["y_pred"])``, or ``(outputs["target"], outputs["preds"])``, with
    ``outputs["ids"]`` as a third item when the dict has it."""
    return _targets_preds_from(outputs, "the *_step")


def _targets_preds_from(outputs: Any, step: str) -> tuple[Any, ...]:
    if isinstance(outputs, Mapping):
        for t_key, p_key in _KEY_PAIRS:
            if t_key in outputs and p_key in outputs:
                ids = outputs.get("ids")
                return (outputs[t_key], outputs[p_key]) if ids is None else (outputs[t_key], outputs[p_key], ids)
    got = (f"a dict with keys {sorted(map(str, outputs))}" if isinstance(outputs, Mapping)
           else f"{type(outputs).__name__}")
    raise TypeError(
        f"OOCMetricsCallback: {step} returned {got}; it must return a dict with 'y_true' and 'y_pred' "
        f"(or 'target' and 'preds'), e.g. `return {{'loss': loss, 'y_true': y, 'y_pred': y_hat}}` from "
        f"training_step and `return {{'y_true': y, 'y_pred': y_hat}}` from validation_step / test_step. "
        f"Or pass OOCMetricsCallback(get_targets_preds=lambda batch, outputs, pl_module: (y_true, y_pred))."
    )


@dataclass
class _Stream:
    """One recorder: a split (``val``), or a split's extra dataloader (``val_dl1``)."""

    name: str
    mode: str
    opened_epoch: int
    rec: Recorder
    last: int | None = None  # newest epoch this recorder instance has recorded rows for


class OOCMetricsCallback(pl.Callback):
    """Record train / val / test predictions into an oocmetrics store; log exact epoch metrics.

    Args:
        get_targets_preds: ``(batch, outputs, pl_module) -> (y_true, y_pred[, ids])``, called at every
            batch end with the ``*_step`` return value as ``outputs``; None to skip a batch. Default:
            :func:`default_get_targets_preds` (a dict with ``y_true``/``y_pred`` or ``target``/``preds``,
            and optionally ``ids``).
        splits: which of ``"train"``, ``"val"``, ``"test"`` to record.
        dirpath: the store (a directory). Default: ``<trainer.log_dir or trainer.default_root_dir>/oocmetrics``,
            decided at ``setup``; the path used is ``callback.dirpath``.
        metrics: metric names (see :data:`oocmetrics.METRICS`); None: the default suite.
        per_output: also log ``{prefix}{split}_{name}_{j}`` for each output ``j``.
        prefix: prepended to every logged key (``{prefix}{split}_{name}``).
        **recorder_kwargs: passed to every :class:`~oocmetrics.Recorder` (``chunk_mb``, ``keep_epochs``,
            ``nonfinite``, ``fsync``, ...); ``path``, ``split``, ``epoch`` and ``mode`` are set here.

    Behaviour:
        - Stored epochs are named by ``trainer.current_epoch``: train and val of training epoch k are
          ``epoch=k`` of splits ``train`` and ``val``; ``trainer.validate()`` / ``trainer.test()``
          record under the trainer's current epoch (after a fit of N epochs: N).
        - The sanity check is not recorded (it must not pollute epoch 0).
        - Extra val/test dataloaders (``dataloader_idx`` i > 0) are recorded too, as split
          ``{split}_dl{i}`` and logged as ``{prefix}{split}_dl{i}_{name}``; dataloader 0 is ``{split}``.
        - A fresh ``fit`` replaces what the store holds for its splits (mode "overwrite", decided at
          ``on_train_start``, once Lightning has set ``trainer.ckpt_path``); a ``fit(ckpt_path=...)``
          resumes: stored epochs >= the restored epoch are replaced when it records them.
          ``validate`` / ``test`` replace only the epoch they record. An epoch number recorded again
          (``val_check_interval`` < 1 epoch, ``validate()`` twice) replaces the stored one; each run
          is still logged.
        - ``callback.results[name]`` holds the last :class:`~oocmetrics.EpochMetrics` of each split.
        - Train metrics are of the predictions made during the epoch (the weights change between
          batches); val/test metrics are of the weights at that evaluation.
        - Recorders are closed at ``teardown`` (the last epoch marked complete). On an exception the
          recorded rows are made durable but the epoch is not marked complete.
        - DDP: every rank records its shard (``<split>.rank<r>`` in the store); at epoch end all ranks
          compute together and log the same values, each sample id counted once. Without ids under
          DDP the epoch end raises a ValueError on every rank (the sampler's padded copies would
          count twice).
    """

    def __init__(
        self,
        get_targets_preds: GetTargetsPreds | None = None,
        splits: Iterable[str] = SPLITS,
        dirpath: str | os.PathLike[str] | None = None,
        metrics: Iterable[str] | None = None,
        per_output: bool = False,
        prefix: str = "",
        **recorder_kwargs: Any,
    ) -> None:
        super().__init__()
        if isinstance(splits, str):
            splits = (splits,)
        self.splits = tuple(dict.fromkeys(splits))
        bad = [s for s in self.splits if s not in SPLITS]
        if bad or not self.splits:
            raise ValueError(f"splits={splits!r}; choose one or more of {list(SPLITS)}.")
        reserved = [k for k in _RESERVED if k in recorder_kwargs]
        if reserved:
            raise TypeError(
                f"OOCMetricsCallback sets {reserved} of each Recorder itself (dirpath=, the split, "
                f"trainer.current_epoch, and the mode from the trainer); remove them from the arguments."
            )
        if get_targets_preds is not None and not callable(get_targets_preds):
            raise TypeError(f"get_targets_preds={get_targets_preds!r}; expected a callable or None.")
        self.get_targets_preds: GetTargetsPreds = get_targets_preds or default_get_targets_preds
        self.metrics = resolve_metrics(metrics)
        self.per_output = bool(per_output)
        self.prefix = str(prefix)
        self.recorder_kwargs = dict(recorder_kwargs)
        self._dirpath_arg = dirpath
        self.dirpath: str | None = None if dirpath is None else os.fspath(dirpath)
        self.results: dict[str, EpochMetrics] = {}
        self._streams: dict[str, _Stream] = {}   # store split name -> stream
        self._mode: dict[str, str] = {}          # split -> mode for streams opened from now on
        self._epoch: dict[str, int] = {}         # split -> epoch of its current run
        self._begun: dict[str, set[str]] = {}    # split -> streams reset for the current run

    # ----------------------------------------------------------------------------- lifecycle
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        splits = [s for s in _STAGE_SPLITS.get(stage, ()) if s in self.splits]
        if not splits:
            return
        if self._dirpath_arg is None:
            root = trainer.log_dir or trainer.default_root_dir
            self.dirpath = os.path.join(root, "oocmetrics")
        self._close_all()
        epoch = trainer.current_epoch
        try:
            for split in splits:
                # "resume" deletes nothing now; a fresh fit switches to "overwrite" at on_train_start,
                # when trainer.ckpt_path says whether this fit resumes (Lightning sets it after setup).
                self._mode[split] = "resume"
                self._open(split, split, "resume", epoch)
        except BaseException:
            self._close_all()
            raise

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.ckpt_path:
            return  # resuming: stored epochs >= the restored epoch are replaced as they are recorded
        for split in ("train", "val"):
            if split not in self._mode:
                continue
            self._mode[split] = "overwrite"
            for name in [n for n, s in self._streams.items() if self._split_of(n) == split]:
                stream = self._streams.pop(name)
                stream.rec.close()  # nothing recorded yet (the sanity check is not recorded)
                self._open(split, name, "overwrite", trainer.current_epoch)

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._close_all()

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        streams, self._streams = list(self._streams.values()), {}
        self._mode, self._epoch, self._begun = {}, {}, {}
        for stream in streams:
            # The context-manager exit for an exception: rows durable, epoch not marked complete.
            stream.rec.__exit__(type(exception), exception, exception.__traceback__)

    # --------------------------------------------------------------------------- epoch hooks
    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._epoch_start(trainer, "train")

    def on_validation_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not trainer.sanity_checking:
            self._epoch_start(trainer, "val")

    def on_test_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._epoch_start(trainer, "test")

    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._record(trainer, pl_module, "train", outputs, batch, 0)

    def on_validation_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.sanity_checking:
            self._record(trainer, pl_module, "val", outputs, batch, dataloader_idx)

    def on_test_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._record(trainer, pl_module, "test", outputs, batch, dataloader_idx)

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._epoch_end(pl_module, "train")

    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not trainer.sanity_checking:
            self._epoch_end(pl_module, "val")

    def on_test_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._epoch_end(pl_module, "test")

    # ------------------------------------------------------------------------------ internal
    @staticmethod
    def _split_of(name: str) -> str:
        return name.split("_dl", 1)[0] if "_dl" in name else name

    def _open(self, split: str, name: str, mode: str, epoch: int) -> _Stream:
        assert self.dirpath is not None
        rec = Recorder(self.dirpath, name, epoch=epoch, metrics=self.metrics, mode=mode,  # type: ignore[arg-type]
                       **self.recorder_kwargs)
        stream = _Stream(name=name, mode=mode, opened_epoch=epoch, rec=rec)
        self._streams[name] = stream
        return stream

    def _close_all(self) -> None:
        streams, self._streams = list(self._streams.values()), {}
        self._mode, self._epoch, self._begun = {}, {}, {}
        errors: list[BaseException] = []
        for stream in streams:
            try:
                stream.rec.close()
            except Exception as exc:  # close the others; re-raise the first failure
                errors.append(exc)
        if errors:
            raise errors[0]

    def _epoch_start(self, trainer: "pl.Trainer", split: str) -> None:
        if split in self._mode:
            self._epoch[split] = trainer.current_epoch
            self._begun[split] = set()

    def _begin(self, split: str, name: str, epoch: int) -> _Stream:
        """Make the stream's recorder record ``epoch``: reset, or reopen to replace a stored epoch."""
        stream = self._streams.get(name)
        if stream is None:
            return self._open(split, name, self._mode[split], epoch)
        again = stream.last is not None and epoch <= stream.last
        moved = stream.last is None and stream.mode == "resume" and epoch != stream.opened_epoch
        if again or moved:
            # The recorder would refuse this number (already recorded, or not what "resume" was
            # opened for): reopen in "resume" mode at it, which replaces a stored epoch of that number.
            del self._streams[name]
            stream.rec.close()
            return self._open(split, name, "resume", epoch)
        stream.rec.reset(epoch=epoch)
        return stream

    def _record(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", split: str, outputs: Any,
                batch: Any, dataloader_idx: int) -> None:
        if split not in self._epoch:
            return
        if self.get_targets_preds is default_get_targets_preds:
            pair = _targets_preds_from(outputs, _STEP[split])  # the error names the step
        else:
            pair = self.get_targets_preds(batch, outputs, pl_module)
        if pair is None:
            return
        if not (isinstance(pair, (tuple, list)) and len(pair) in (2, 3)):
            raise TypeError(
                f"OOCMetricsCallback: get_targets_preds returned {type(pair).__name__} at "
                f"{_STEP[split]}; expected a tuple (y_true, y_pred) or (y_true, y_pred, ids), or None "
                f"to skip the batch."
            )
        name = split if not dataloader_idx else f"{split}_dl{dataloader_idx}"
        begun = self._begun[split]
        if name in begun:
            stream = self._streams[name]
        else:
            stream = self._begin(split, name, self._epoch[split])
            begun.add(name)
        stream.rec.update(pair[0], pair[1], ids=pair[2] if len(pair) == 3 else None)
        stream.last = stream.rec.epoch

    def _epoch_end(self, pl_module: "pl.LightningModule", split: str) -> None:
        if split not in self._epoch:
            return
        begun = set(self._begun.get(split, set()))
        epoch = self._epoch[split]
        ddp = torch.distributed.is_available() and torch.distributed.is_initialized() and \
            torch.distributed.get_world_size() > 1
        if ddp:  # compute() is a collective: every rank joins for every stream any rank recorded
            everyone: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(everyone, sorted(begun))
            for name in sorted(set().union(*everyone) - begun):
                self._begin(split, name, epoch)  # nothing recorded here: an empty shard joins
                begun.add(name)
        self._epoch.pop(split)
        self._begun[split] = set()
        logged: dict[str, torch.Tensor] = {}
        dtype = torch.float32 if pl_module.device.type == "mps" else torch.float64  # MPS has no float64
        for name in sorted(begun):
            rec = self._streams[name].rec
            if rec.rows == 0 and not ddp:
                continue
            res = rec.compute()
            self.results[name] = res
            values = {f"{self.prefix}{name}_{k}": v for k, v in res.items()}
            if self.per_output:
                for k, arr in res.per_output.items():
                    values.update({f"{self.prefix}{name}_{k}_{j}": float(x) for j, x in enumerate(arr.ravel())})
            logged.update({k: torch.tensor(v, dtype=dtype, device=pl_module.device) for k, v in values.items()})
        if logged:
            pl_module.log_dict(logged, on_step=False, on_epoch=True, sync_dist=False, batch_size=1,
                               add_dataloader_idx=False)
