"""Run configuration: frozen dataclasses, named presets, and one command-line flag per field.

Config is plain data (numbers, strings, booleans): it round-trips through JSON, is saved into every
checkpoint and into ``<out>/config.json``, and is never executed. A preset (``--config NAME``) fills
every field; any flag given on the command line then overrides that one field. Flag names are the
field names with dashes (``batch_size`` -> ``--batch-size``), so they are unique across sections.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field, fields, replace
from typing import Any

__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "MetricsConfig",
    "RunConfig",
    "PRESETS",
    "preset",
    "add_config_flags",
    "apply_flags",
    "flag_name",
]


class ConfigError(ValueError):
    """A config value is invalid; the message names the flag and the fix."""


def flag_name(name: str) -> str:
    """The command-line flag for a config field: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


def _check(ok: bool, name: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{flag_name(name)} must be {rule}, but got {value!r}.")


@dataclass(frozen=True)
class DataConfig:
    """Where the recordings come from and how they are cut into windows."""

    data: str | None = field(default=None, metadata=_help(
        "directory of your own recordings (<name>_x.npy / <name>_y.npy pairs, optional split.json; "
        "see docs/TRAINER.md); unset = the embedded synthetic dataset"))
    cache_dir: str = field(default="runs/.data", metadata=_help(
        "where the synthetic dataset is generated on first use (one sub-directory per parameter set)"))
    train_subjects: int = field(default=6, metadata=_help("synthetic: subjects in the train split"))
    val_subjects: int = field(default=2, metadata=_help("synthetic: subjects in the val split"))
    test_subjects: int = field(default=2, metadata=_help("synthetic: subjects in the test split"))
    recordings_per_subject: int = field(default=3, metadata=_help("synthetic: recordings per subject"))
    train_steps: int = field(default=60_000, metadata=_help("synthetic: time steps per train recording"))
    eval_steps: int = field(default=20_000, metadata=_help("synthetic: time steps per val/test recording"))
    in_channels: int = field(default=16, metadata=_help("synthetic: sensor (EMG-like) input channels"))
    joints: int = field(default=20, metadata=_help("synthetic: joint-angle outputs"))
    data_seed: int = field(default=0, metadata=_help("synthetic: generator seed"))
    window: int = field(default=500, metadata=_help("time steps per window (one training sample)"))
    stride: int = field(default=100, metadata=_help(
        "steps between train window starts (< window: overlapping windows)"))
    eval_stride: int = field(default=500, metadata=_help("steps between val/test window starts"))
    val_fraction: float = field(default=0.15, metadata=_help(
        "--data without split.json: fraction of recordings (by sorted name) for val"))
    test_fraction: float = field(default=0.15, metadata=_help(
        "--data without split.json: fraction of recordings (last by sorted name) for test"))

    def __post_init__(self) -> None:
        for name in ("train_subjects", "val_subjects", "test_subjects", "recordings_per_subject",
                     "in_channels", "joints", "window", "stride", "eval_stride"):
            _check(getattr(self, name) >= 1, name, ">= 1", getattr(self, name))
        for name in ("train_steps", "eval_steps"):
            _check(getattr(self, name) >= self.window, name,
                   f">= --window ({self.window}) so a recording holds a window", getattr(self, name))
        for name in ("val_fraction", "test_fraction"):
            _check(0.0 < getattr(self, name) < 1.0, name, "in (0, 1)", getattr(self, name))
        _check(self.val_fraction + self.test_fraction < 1.0, "val_fraction",
               "< 1 - --test-fraction so some recordings are left for train", self.val_fraction)


@dataclass(frozen=True)
class ModelConfig:
    """The temporal convolutional network (see trainer/model.py)."""

    hidden: int = field(default=32, metadata=_help("channels of every hidden conv layer"))
    layers: int = field(default=5, metadata=_help("residual blocks; block i has dilation 2**i"))
    kernel_size: int = field(default=5, metadata=_help("conv kernel size (odd when not --causal)"))
    causal: bool = field(default=False, metadata=_help(
        "causal convolutions (output at t sees inputs <= t) instead of same-padded"))

    def __post_init__(self) -> None:
        for name in ("hidden", "layers", "kernel_size"):
            _check(getattr(self, name) >= 1, name, ">= 1", getattr(self, name))
        if not self.causal:
            _check(self.kernel_size % 2 == 1, "kernel_size", "odd for same padding (or pass --causal)",
                   self.kernel_size)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, seeding and what the user sees."""

    epochs: int = field(default=5, metadata=_help("total epochs (with --resume: train up to this many)"))
    batch_size: int = field(default=16, metadata=_help("windows per batch"))
    lr: float = field(default=3e-3, metadata=_help("AdamW learning rate"))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay"))
    grad_clip: float = field(default=1.0, metadata=_help("max gradient norm (0 = no clipping)"))
    seed: int = field(default=0, metadata=_help("seed for model init and the per-epoch shuffle"))
    threads: int = field(default=0, metadata=_help(
        "torch intra-op threads (0 = available cores - 1, at least 1: one core stays free for the "
        "oocmetrics writer thread and data loading)"))
    log_every: int = field(default=50, metadata=_help(
        "print 'Epoch: E, Batch: B/N, Loss: L' (L = that batch's loss) every this many batches (0 = never)"))
    progress: bool = field(default=True, metadata=_help(
        "tqdm progress bar per epoch (always off when stderr is not a terminal)"))
    out: str | None = field(default=None, metadata=_help(
        "run directory for metrics store, checkpoint, history, plot (default: runs/<config name>)"))
    device: str = field(default="auto", metadata=_help(
        "where the model trains: auto (CUDA when available, else CPU), cpu or cuda"))
    workers: int = field(default=0, metadata=_help(
        "DataLoader worker processes (0 = load batches in the training process); with CUDA, batches "
        "are also pinned for asynchronous host-to-device copies"))

    def __post_init__(self) -> None:
        _check(self.device in ("auto", "cpu", "cuda"), "device", "one of auto, cpu, cuda", self.device)
        for name in ("epochs", "batch_size"):
            _check(getattr(self, name) >= 1, name, ">= 1", getattr(self, name))
        _check(self.lr > 0, "lr", "> 0", self.lr)
        for name in ("weight_decay", "grad_clip", "threads", "log_every", "workers"):
            _check(getattr(self, name) >= 0, name, ">= 0", getattr(self, name))


@dataclass(frozen=True)
class MetricsConfig:
    """How the oocmetrics.Recorder stores predictions (buffers: 2 x (queue_chunks + 1) x chunk_mb per split)."""

    chunk_mb: float = field(default=8.0, metadata=_help("oocmetrics chunk size in MiB (its default: 8)"))
    queue_chunks: int = field(default=2, metadata=_help("oocmetrics writer queue depth in chunks"))
    keep_epochs: int | None = field(default=1, metadata=_help(
        "finished epochs kept on disk per split after each new epoch starts ('none' = all; 0 = only "
        "the epoch being written); the last epoch always stays"))
    order_metrics: bool = field(default=False, metadata=_help(
        "also compute the exact median absolute error (oocmetrics.ORDER_METRICS: a few more passes "
        "over the stored epoch)"))
    analysis: bool = field(default=True, metadata=_help(
        "for val and test: exact quantiles (0.5, 0.9, 0.95, 0.99) of |y_true - y_pred| in the history "
        "(2-3 passes over the stored epoch) and the per-step error curve (val_per_step.json, one more "
        "pass); plotted in history.png"))

    def __post_init__(self) -> None:
        _check(self.chunk_mb > 0, "chunk_mb", "> 0", self.chunk_mb)
        _check(self.queue_chunks >= 1, "queue_chunks", ">= 1", self.queue_chunks)
        if self.keep_epochs is not None:
            _check(self.keep_epochs >= 0, "keep_epochs", ">= 0 or 'none'", self.keep_epochs)


SECTIONS: dict[str, type] = {
    "data": DataConfig, "model": ModelConfig, "train": TrainConfig, "metrics": MetricsConfig,
}


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs; ``name`` is the preset it started from."""

    name: str = "default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    @property
    def out(self) -> str:
        """The run directory."""
        return self.train.out or f"runs/{self.name}"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """Rebuild from ``to_dict()`` output (e.g. a checkpoint); unknown keys are an error."""
        unknown = set(d) - {"name", *SECTIONS}
        if unknown:
            raise ConfigError(f"Unknown config keys {sorted(unknown)}; expected name, {', '.join(SECTIONS)}.")
        parts: dict[str, Any] = {}
        for sec, typ in SECTIONS.items():
            sub = dict(d.get(sec, {}))
            names = {f.name for f in fields(typ)}
            bad = set(sub) - names
            if bad:
                raise ConfigError(f"Unknown keys {sorted(bad)} in config section {sec!r}.")
            parts[sec] = typ(**sub)
        return cls(name=str(d.get("name", "default")), **parts)

    def flat(self) -> dict[str, Any]:
        """Every leaf field by name (names are unique across sections)."""
        return {f.name: getattr(getattr(self, sec), f.name)
                for sec, typ in SECTIONS.items() for f in fields(typ)}

    def with_values(self, values: dict[str, Any]) -> RunConfig:
        """A copy with leaf fields replaced by name (validated again)."""
        values = dict(values)
        parts = {}
        for sec, typ in SECTIONS.items():
            mine = {f.name: values.pop(f.name) for f in fields(typ) if f.name in values}
            parts[sec] = replace(getattr(self, sec), **mine) if mine else getattr(self, sec)
        if values:
            raise ConfigError(f"Unknown config fields {sorted(values)}.")
        return replace(self, **parts)


# Presets: overrides of the field defaults above. seed_scale reproduces the seed's epoch exactly:
# 8 subjects x 4 recordings x ((110,620 - 500) // 20 + 1 = 5,507 windows) = 176,224 windows
# = 11,014 batches of 16 x 500 (x 20 outputs), from 32 x 110,620 steps x 36 float32 = 510 MB on disk.
_PRESET_VALUES: dict[str, dict[str, Any]] = {
    "default": {},
    "smoke": dict(
        train_subjects=2, val_subjects=1, test_subjects=1, recordings_per_subject=1,
        train_steps=1_500, eval_steps=1_000, window=100, stride=50, eval_stride=100,
        hidden=8, layers=2, kernel_size=3, epochs=2, batch_size=8, log_every=2,
        chunk_mb=0.05,  # ~6 rows of 100 x 20 float32 per chunk: batches straddle chunk boundaries
    ),
    "low_memory": dict(chunk_mb=1.0, queue_chunks=1),
    "seed_scale": dict(
        train_subjects=8, val_subjects=2, test_subjects=2, recordings_per_subject=4,
        train_steps=110_620, eval_steps=25_000, window=500, stride=20, eval_stride=500,
        hidden=16, layers=3, kernel_size=3, epochs=1, batch_size=16, log_every=10,
        keep_epochs=0,  # 14 GB of predictions per epoch: one epoch on disk at a time (the last stays)
    ),
}
PRESETS: tuple[str, ...] = tuple(_PRESET_VALUES)


def preset(name: str) -> RunConfig:
    """The named preset as a RunConfig."""
    if name not in _PRESET_VALUES:
        raise ConfigError(f"Unknown --config {name!r}; choose one of {', '.join(PRESETS)}.")
    return RunConfig(name=name).with_values(_PRESET_VALUES[name])


def _optional_int(text: str) -> int | None:
    if text.lower() == "none":
        return None
    return int(text)


def _optional_str(text: str) -> str | None:
    return None if text == "" else text


_PARSERS: dict[str, Any] = {
    "int": int, "float": float, "str": str, "int | None": _optional_int, "str | None": _optional_str,
}


_METAVARS = {"int": "N", "float": "X", "str": "PATH", "int | None": "N|none", "str | None": "PATH"}


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """Add one flag per config field; unset flags stay out of the namespace (argparse.SUPPRESS)."""
    base = preset("default")
    for sec, typ in SECTIONS.items():
        group = parser.add_argument_group(f"{sec} ({typ.__doc__.strip().rstrip('.')})")
        for f in fields(typ):
            default = getattr(getattr(base, sec), f.name)
            help_text = f"{f.metadata['help']} (default preset: {default!r})"
            if f.type == "bool":
                group.add_argument(flag_name(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=help_text)
            else:
                metavar = _METAVARS[f.type]
                group.add_argument(flag_name(f.name), dest=f.name, type=_PARSERS[f.type],
                                   default=argparse.SUPPRESS, metavar=metavar, help=help_text)


def given_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields set on the command line."""
    names = {f.name for typ in SECTIONS.values() for f in fields(typ)}
    return {k: v for k, v in vars(args).items() if k in names}


def apply_flags(cfg: RunConfig, args: argparse.Namespace) -> RunConfig:
    """``cfg`` with every config flag given on the command line applied."""
    return cfg.with_values(given_flags(args))
