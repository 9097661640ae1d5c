"""Train a TCN end to end with exact per-epoch metrics (oocmetrics) for train, val and test.

    python -m trainer.run                                   # default preset, a few minutes on 2 cores
    python -m trainer.run --config smoke                    # seconds
    python -m trainer.run --config seed_scale --epochs 1    # the seed's 11,014 batches / epoch
    python -m trainer.run --data my_recordings/             # your data (docs/TRAINER.md)
    python -m trainer.run --config smoke --epochs 4 --resume   # continue runs/smoke up to epoch 4

A run directory (``--out``, default ``runs/<config name>``) gets: ``metrics/`` (the oocmetrics
store, one group per split), ``checkpoint.pt`` (after every epoch), ``config.json``,
``history.json`` / ``history.csv`` (a row per epoch and split), ``history.png`` and
``final_metrics.json`` (per-output metrics of the last train/val/test epochs). Re-running a command
starts fresh and overwrites these; ``--resume`` continues from the checkpoint instead.

Exit codes: 0 done, 2 bad flags, bad config values or unusable data (one line on stderr).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from trainer.config import (PRESETS, ConfigError, RunConfig, add_config_flags, apply_flags,
                            given_flags, preset)
from trainer.data import DataError, WindowDataset, load_splits, make_loader

__all__ = ["build_parser", "main", "resolve_config", "train"]

_RUN_FILES = ("checkpoint.pt", "config.json", "history.json", "history.csv", "history.png",
              "final_metrics.json")


def build_parser() -> argparse.ArgumentParser:
    """The CLI: run flags, then one flag per config field."""
    p = argparse.ArgumentParser(
        prog="python -m trainer.run",
        description="Train a temporal conv net (16 EMG-like channels -> 20 joint angles by default) "
                    "with exact full-epoch metrics from oocmetrics; memory does not grow with the epoch.",
        epilog="Outputs in --out: metrics/ (oocmetrics store), checkpoint.pt, config.json, "
               "history.json, history.csv, history.png, final_metrics.json. Exit code 2: bad flags or data.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="default", choices=PRESETS,
                   help="preset to start from (default: a few minutes on 2 cores; smoke: seconds; "
                        "low_memory: small metric chunks; seed_scale: the seed's 11,014 batches per epoch)")
    p.add_argument("--resume", action="store_true",
                   help="continue from <out>/checkpoint.pt with the checkpoint's config (flags given "
                        "here override it, e.g. --epochs to train longer); without it a run starts fresh")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    add_config_flags(p)
    return p


def resolve_config(args: argparse.Namespace) -> tuple[RunConfig, dict[str, Any] | None]:
    """The effective config (preset or checkpoint, then flags) and the checkpoint when resuming."""
    cfg = apply_flags(preset(args.config), args)
    if not args.resume:
        return cfg, None
    from trainer.checkpoint import CHECKPOINT, load_checkpoint

    out = Path(cfg.out)
    if not (out / CHECKPOINT).is_file():
        raise ConfigError(f"--resume: no checkpoint at {out / CHECKPOINT}; run without --resume to start "
                          "fresh, or pass the --out (or --config) of the run to continue.")
    ckpt = load_checkpoint(out)
    saved = RunConfig.from_dict(ckpt["config"])
    resumed = apply_flags(saved, args)
    if not given_flags(args).get("out"):
        resumed = resumed.with_values({"out": str(out)})
    for sec in ("data", "model"):
        old, new = getattr(saved, sec).__dict__, getattr(resumed, sec).__dict__
        changed = [k for k in old if old[k] != new[k] and k != "cache_dir"]
        if changed:
            k = changed[0]
            raise ConfigError(f"--resume: the checkpoint was trained with --{k.replace('_', '-')} "
                              f"{old[k]!r}, not {new[k]!r}; drop that flag, or start a fresh run "
                              "without --resume.")
    return resumed, ckpt


def _setup_torch(cfg: RunConfig) -> None:
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # Small convs gain little from a second thread, and OpenMP threads spin badly when a core is
    # busy (10x slower steps measured on a shared 2-core machine): keep a core for the writer.
    torch.set_num_threads(cfg.train.threads or max(1, cores - 1))
    try:
        torch.set_num_interop_threads(1)  # one process, no inter-op parallelism to exploit
    except RuntimeError:  # already set (e.g. a second run in the same process)
        pass
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)


def _device(name: str) -> Any:
    """The torch device for ``--device``: auto picks CUDA when one is available."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here (torch.cuda.is_available() is "
                          "False); use --device auto or cpu.")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _say(msg: str) -> None:
    print(msg, flush=True)


def train(cfg: RunConfig, ckpt: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Train ``cfg.train.epochs`` epochs (from ``ckpt`` if given), then evaluate on test.

    Returns the history rows. Raises DataError / ConfigError for unusable data or config.
    """
    import oocmetrics
    import torch

    from trainer.checkpoint import save_checkpoint
    from trainer.loop import evaluate, train_epoch, validate_epoch
    from trainer.memory import RssSampler, lifetime_max_rss_mb
    from trainer.model import build_model
    from trainer.report import NO_MATPLOTLIB, can_plot, format_table, plot_history, write_history, write_json

    t_start = time.perf_counter()
    plots = can_plot()  # at start-up, not when epoch 0 ends: say once that history.png will be missing
    if not plots:
        print(f"warning: {NO_MATPLOTLIB}", file=sys.stderr, flush=True)
    d, tc = cfg.data, cfg.train
    splits = load_splits(d)  # validate the data before touching --out
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if ckpt is None:  # a fresh run: nothing of an earlier run in --out may survive to confuse --resume
        for name in _RUN_FILES:
            (out / name).unlink(missing_ok=True)
    _setup_torch(cfg)
    train_ds = WindowDataset(splits.train, window=d.window, stride=d.stride)
    val_ds = WindowDataset(splits.val, window=d.window, stride=d.eval_stride)
    test_ds = WindowDataset(splits.test, window=d.window, stride=d.eval_stride)
    device = _device(tc.device)
    load_kw = dict(batch_size=tc.batch_size, workers=tc.workers, pin_memory=device.type == "cuda")
    val_loader = make_loader(val_ds, shuffle=False, **load_kw)
    test_loader = make_loader(test_ds, shuffle=False, **load_kw)

    model = build_model(cfg.model, splits.in_channels, splits.joints).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    history: list[dict[str, Any]] = []
    start = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        history, start = list(ckpt["history"]), int(ckpt["epoch"]) + 1
    write_json(out / "config.json", cfg.to_dict())

    n_params = sum(p.numel() for p in model.parameters())
    _say(f"run {cfg.name!r} -> {out}  ({'resuming at epoch ' + str(start) if ckpt else 'fresh run'})")
    _say(f"data {splits.root}: {splits.in_channels} channels -> {splits.joints} outputs; windows of "
         f"{d.window}: train {len(train_ds)} ({-(-len(train_ds) // tc.batch_size)} batches of "
         f"{tc.batch_size}), val {len(val_ds)}, test {len(test_ds)}")
    _say(f"model TCN: {n_params} parameters, receptive field {model.receptive_field} steps; "
         f"device {device}; torch threads {torch.get_num_threads()}; loader workers {tc.workers}")

    progress = tc.progress and sys.stderr.isatty()
    mode = "resume" if ckpt is not None else "overwrite"
    store = str(out / "metrics")
    # Resuming at epoch `start` replaces what a crashed run stored for epochs >= start (when the
    # new epoch writes its first chunk), so stored epoch numbers always match the trainer's.
    rec_kw = dict(chunk_mb=cfg.metrics.chunk_mb, queue_chunks=cfg.metrics.queue_chunks,
                  keep_epochs=cfg.metrics.keep_epochs, mode=mode, epoch=start,
                  metrics=oocmetrics.ALL_METRICS if cfg.metrics.order_metrics else None)
    last = start - 1
    details: dict[str, Any] = {}
    with ExitStack() as stack:
        rss = stack.enter_context(RssSampler())
        recs = {s: stack.enter_context(oocmetrics.Recorder(store, split=s, **rec_kw))
                for s in ("train", "val", "test")}
        for epoch in range(start, tc.epochs):
            # per-epoch order: resume-exact
            loader = make_loader(train_ds, shuffle=True, seed=tc.seed * 1_000_003 + epoch, **load_kw)
            tr = train_epoch(model, loader, optimizer, recs["train"], epoch=epoch, device=device,
                             grad_clip=tc.grad_clip, log_every=tc.log_every, progress=progress,
                             rss=rss, log=_say)
            va = validate_epoch(model, val_loader, recs["val"], epoch=epoch, progress=progress, rss=rss,
                                device=device)
            history += [tr.row(), va.row()]
            details.update(train=tr.details, val=va.details)
            _say(f"epoch {epoch} done: train {tr.seconds:.1f} s (metrics {tr.compute_seconds:.1f} s), "
                 f"val {va.seconds:.1f} s; peak RSS train {tr.peak_rss_mb:.0f} MiB "
                 f"(anonymous {tr.peak_anon_mb:.0f}), val {va.peak_rss_mb:.0f} MiB")
            _say(format_table([tr.row(), va.row()]))
            save_checkpoint(out, model=model, optimizer=optimizer, cfg=cfg, epoch=epoch, history=history)
            write_history(out, history)
            if plots:
                plot_history(out / "history.png", history, title=f"{cfg.name}: {out}")
            last = epoch

        te = evaluate(model, test_loader, recs["test"], epoch=last, progress=progress, rss=rss, device=device)
    history = [r for r in history if not (r["split"] == "test" and r["epoch"] == last)] + [te.row()]
    details["test"] = te.details
    _say(f"test after epoch {last}: {te.seconds:.1f} s, peak RSS {te.peak_rss_mb:.0f} MiB")
    _say(format_table([te.row()]))
    save_checkpoint(out, model=model, optimizer=optimizer, cfg=cfg, epoch=last, history=history)
    write_history(out, history)
    if plots:
        plot_history(out / "history.png", history, title=f"{cfg.name}: {out}")
    write_json(out / "final_metrics.json", details)
    _say(f"done in {time.perf_counter() - t_start:.1f} s; process peak RSS {lifetime_max_rss_mb():.0f} MiB; "
         f"wrote {out}/history.json, history.csv{', history.png' if plots else ''}, checkpoint.pt, final_metrics.json")
    return history


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (argparse exits with 2 itself on unknown flags)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg, ckpt = resolve_config(args)
        if args.print_config:
            print(cfg.to_json())
            return 0
        train(cfg, ckpt)
    except (ConfigError, DataError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
