"""Train a TCN end to end with exact per-epoch metrics (oocmetrics) for train, val and test.

    python -m trainer.run                                   # default preset, a few minutes on 2 cores
    python -m trainer.run --config smoke                    # seconds
    python -m trainer.run --config seed_scale --epochs 1    # the seed's 11,014 batches / epoch
    python -m trainer.run --data my_recordings/             # your data (docs/TRAINER.md)
    python -m trainer.run --config smoke --epochs 4 --resume   # continue runs/smoke up to epoch 4
    torchrun --nproc_per_node 2 -m trainer.run --config smoke   # DDP: 2 processes (gloo on CPU, NCCL on GPUs)

Under ``torchrun`` each rank trains on its shard of the data (DistributedSampler), records its own
predictions with the windows' dataset indices as sample ids, and every rank gets the same exact
metrics over the whole split, each window counted once (the sampler's padded copies left out).
Rank 0 alone writes the run files.

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


def _setup_torch(cfg: RunConfig, world_size: int = 1) -> None:
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # Small convs gain little from a second thread, and OpenMP threads spin badly when a core is
    # busy (10x slower steps measured on a shared 2-core machine): keep a core for the writer.
    torch.set_num_threads(cfg.train.threads or max(1, (cores - 1) // world_size))
    try:
        torch.set_num_interop_threads(1)  # one process, no inter-op parallelism to exploit
    except RuntimeError:  # already set (e.g. a second run in the same process)
        pass
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)


def _device(name: str, local_rank: int = 0) -> Any:
    """The torch device for ``--device``: auto picks CUDA when one is available (under torchrun, the
    rank's own GPU, ``LOCAL_RANK``)."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here (torch.cuda.is_available() is "
                          "False); use --device auto or cpu.")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


def _init_distributed(device_name: str) -> tuple[int, int, int, bool]:
    """(rank, world_size, local_rank, started): joins the process group torchrun describes in the
    environment (``WORLD_SIZE`` > 1): NCCL for CUDA, gloo on CPU. (0, 1, 0, False) otherwise."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0, False
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), local_rank, False
    cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), local_rank, True


def _say(msg: str) -> None:
    print(msg, flush=True)


def _per_step(store: str, split: str, epoch: int, curves: dict[str, Any]) -> dict[str, Any]:
    """``curves`` plus this epoch's exact per-step error curve of ``split`` (pooled over outputs),
    from one pass over the stored epoch (oocmetrics.breakdown); 2-D data has no steps: unchanged."""
    from oocmetrics.breakdown import per_step

    try:
        res = per_step(store, split, epoch, metrics=("rmse", "mae"), histogram=False)
    except ValueError:  # (rows, outputs) data: no step axis
        return curves
    pooled = res["per_step_pooled"]
    return {**curves, str(epoch): {"rmse": [float(v) for v in pooled["rmse"]],
                                   "mae": [float(v) for v in pooled["mae"]]}}


def train(cfg: RunConfig, ckpt: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Train ``cfg.train.epochs`` epochs (from ``ckpt`` if given), then evaluate on test.

    Returns the history rows. Raises DataError / ConfigError for unusable data or config.
    Under torchrun (``WORLD_SIZE`` > 1) it joins the process group first, and leaves it at the end.
    """
    import torch

    t_start = time.perf_counter()
    rank, world, local_rank, started = _init_distributed(cfg.train.device)
    try:
        return _train(cfg, ckpt, rank, world, local_rank, t_start)
    finally:
        if started:
            torch.distributed.destroy_process_group()


def _train(cfg: RunConfig, ckpt: dict[str, Any] | None, rank: int, world: int, local_rank: int,
           t_start: float) -> list[dict[str, Any]]:
    import oocmetrics
    import torch

    from trainer.checkpoint import save_checkpoint
    from trainer.loop import QUANTILES, evaluate, train_epoch, validate_epoch
    from trainer.memory import RssSampler, lifetime_max_rss_mb
    from trainer.model import build_model
    from trainer.report import NO_MATPLOTLIB, can_plot, format_table, plot_history, write_history, write_json

    main_rank = rank == 0  # writes the run files and prints; every rank records and computes
    _say = globals()["_say"] if main_rank else (lambda msg: None)
    plots = can_plot() and main_rank  # at start-up, not when epoch 0 ends: say once that history.png will be missing
    if main_rank and not can_plot():
        print(f"warning: {NO_MATPLOTLIB}", file=sys.stderr, flush=True)
    d, tc = cfg.data, cfg.train
    splits = load_splits(d)  # validate the data before touching --out
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if ckpt is None and main_rank:  # a fresh run: nothing of an earlier run in --out may survive to confuse --resume
        for name in _RUN_FILES:
            (out / name).unlink(missing_ok=True)
    _setup_torch(cfg, world)
    train_ds = WindowDataset(splits.train, window=d.window, stride=d.stride)
    val_ds = WindowDataset(splits.val, window=d.window, stride=d.eval_stride)
    test_ds = WindowDataset(splits.test, window=d.window, stride=d.eval_stride)
    device = _device(tc.device, local_rank)
    shard = (rank, world) if world > 1 else None
    load_kw = dict(batch_size=tc.batch_size, workers=tc.workers, pin_memory=device.type == "cuda",
                   with_ids=True, shard=shard)
    val_loader = make_loader(val_ds, shuffle=False, **load_kw)
    test_loader = make_loader(test_ds, shuffle=False, **load_kw)

    net = build_model(cfg.model, splits.in_channels, splits.joints).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    history: list[dict[str, Any]] = []
    start = 0
    if ckpt is not None:
        net.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        history, start = list(ckpt["history"]), int(ckpt["epoch"]) + 1
    model = net
    if world > 1:  # gradients averaged over the ranks; checkpoints save the plain module (net)
        model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[local_rank] if device.type == "cuda" else None)
    if main_rank:
        write_json(out / "config.json", cfg.to_dict())

    n_params = sum(p.numel() for p in net.parameters())
    _say(f"run {cfg.name!r} -> {out}  ({'resuming at epoch ' + str(start) if ckpt else 'fresh run'})")
    _say(f"data {splits.root}: {splits.in_channels} channels -> {splits.joints} outputs; windows of "
         f"{d.window}: train {len(train_ds)} ({-(-len(train_ds) // tc.batch_size)} batches of "
         f"{tc.batch_size}), val {len(val_ds)}, test {len(test_ds)}")
    _say(f"model TCN: {n_params} parameters, receptive field {net.receptive_field} steps; "
         f"device {device}; torch threads {torch.get_num_threads()}; loader workers {tc.workers}"
         f"{f'; DDP: {world} ranks' if world > 1 else ''}")

    progress = tc.progress and sys.stderr.isatty() and main_rank
    mode = "resume" if ckpt is not None else "overwrite"
    store = str(out / "metrics")
    # Resuming at epoch `start` replaces what a crashed run stored for epochs >= start (when the
    # new epoch writes its first chunk), so stored epoch numbers always match the trainer's.
    rec_kw = dict(chunk_mb=cfg.metrics.chunk_mb, queue_chunks=cfg.metrics.queue_chunks,
                  keep_epochs=cfg.metrics.keep_epochs, mode=mode, epoch=start,
                  metrics=oocmetrics.ALL_METRICS if cfg.metrics.order_metrics else None)
    last = start - 1
    details: dict[str, Any] = {}
    qs = QUANTILES if cfg.metrics.analysis else None
    per_step: dict[str, Any] = {}
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
                                device=device, quantiles=qs)
            if qs is not None and main_rank:
                per_step = _per_step(store, "val", epoch, per_step)
                write_json(out / "val_per_step.json", per_step)
            history += [tr.row(), va.row()]
            details.update(train=tr.details, val=va.details)
            _say(f"epoch {epoch} done: train {tr.seconds:.1f} s (metrics {tr.compute_seconds:.1f} s), "
                 f"val {va.seconds:.1f} s; peak RSS train {tr.peak_rss_mb:.0f} MiB "
                 f"(anonymous {tr.peak_anon_mb:.0f}), val {va.peak_rss_mb:.0f} MiB")
            _say(format_table([tr.row(), va.row()]))
            if main_rank:
                save_checkpoint(out, model=net, optimizer=optimizer, cfg=cfg, epoch=epoch, history=history)
                write_history(out, history)
            if plots:
                plot_history(out / "history.png", history, title=f"{cfg.name}: {out}", per_step=per_step)
            last = epoch

        te = evaluate(model, test_loader, recs["test"], epoch=last, progress=progress, rss=rss, device=device,
                      quantiles=qs)
    history = [r for r in history if not (r["split"] == "test" and r["epoch"] == last)] + [te.row()]
    details["test"] = te.details
    _say(f"test after epoch {last}: {te.seconds:.1f} s, peak RSS {te.peak_rss_mb:.0f} MiB")
    _say(format_table([te.row()]))
    if main_rank:
        save_checkpoint(out, model=net, optimizer=optimizer, cfg=cfg, epoch=last, history=history)
        write_history(out, history)
        write_json(out / "final_metrics.json", details)
    if plots:
        plot_history(out / "history.png", history, title=f"{cfg.name}: {out}", per_step=per_step)
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
