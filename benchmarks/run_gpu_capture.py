"""Training-step overhead of capturing (y_true, y_pred) on a CUDA device: DeviceStager vs .cpu() and torchmetrics.

The seed trainer's TCN (``trainer/model.py``, its default size) at the seed's shape (batch 16 x 500
time steps x 20 outputs, 16 input channels, float32), one training step per batch (forward, MSE
loss, backward, Adam step; ``eval``: forward only). Per step, on top of the step:

* ``step``: nothing (the unit);
* ``cpu_copy``: ``y.detach().cpu().numpy()`` of both arrays, kept in a list (the seed's pattern: a
  device-to-host copy and a sync point per batch);
* ``torchmetrics_mse``: ``torchmetrics.MeanSquaredError.update`` on the device (of ``reshape(-1)``:
  it needs contiguous inputs and the TCN's output is a transposed view);
* ``stager``: ``DeviceStager.append`` (NaN/Inf checked on the device per chunk); full chunks go to a
  host thread that waits on each chunk's event, reads it (a float64 sum, standing in for the
  writer) and releases it; ``stager_nocheck``: the same with ``check_finite=False``.

Each variant runs ``--warmup`` then ``--batches`` steps; the time is the wall time of the timed steps
plus one ``torch.cuda.synchronize()`` at the end (never per step). Variants interleave, in rotated
order, within each of ``--repeat`` runs; ratios to ``step`` are taken within a run and reported as
medians. Target: the stager adds <= 3% to the training step.

    python benchmarks/run_gpu_capture.py                          # on a CUDA machine (~1-2 min)
    python benchmarks/run_gpu_capture.py --allow-cpu --batches 6  # CPU smoke: checks the script only

Without CUDA (and without ``--allow-cpu``) it says so and exits 0. Outputs under ``--out``:
``gpu_capture.json``, ``gpu_capture.png`` (when matplotlib is installed) and a table on stdout.
"""

from __future__ import annotations

import argparse
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BATCH_SHAPE, machine_info, write_json  # noqa: E402

TARGET_OVERHEAD_PCT = 3.0  # the stager's cost on the training step
VARIANTS = ("step", "cpu_copy", "torchmetrics_mse", "stager", "stager_nocheck")
LABELS = {
    "step": "step alone (the unit)",
    "cpu_copy": "+ .cpu() of both, per batch",
    "torchmetrics_mse": "+ torchmetrics MSE update",
    "stager": "+ DeviceStager.append",
    "stager_nocheck": "+ DeviceStager, no NaN check",
}
IN_CHANNELS = 16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench_out/gpu_capture", help="output directory (default: bench_out/gpu_capture)")
    ap.add_argument("--batches", type=int, help="timed steps per variant and run (default 400; CPU 10)")
    ap.add_argument("--warmup", type=int, help="untimed steps before each variant (default 50; CPU 2)")
    ap.add_argument("--repeat", type=int, help="runs; the report gives medians (default 5; CPU 1)")
    ap.add_argument("--modes", nargs="+", choices=("train", "eval"), default=["train", "eval"])
    ap.add_argument("--chunk-rows", type=int, default=512, help="rows per staged chunk (default 512)")
    ap.add_argument("--slots", type=int, default=3, help="DeviceStager ring slots (the recorder's queue_chunks + 1)")
    ap.add_argument("--hidden", type=int, default=32, help="TCN channels (default 32, the seed's)")
    ap.add_argument("--layers", type=int, default=5, help="TCN residual blocks (default 5, the seed's)")
    ap.add_argument("--kernel-size", type=int, default=5, help="TCN kernel size (default 5, the seed's)")
    ap.add_argument("--device", default="cuda", help="CUDA device (default: cuda)")
    ap.add_argument("--allow-cpu", action="store_true", help="without CUDA, run a CPU smoke run (no GPU figures)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    return args


# ----------------------------------------------------------------------------------------- pieces
def make_model(torch: Any, args: argparse.Namespace, device: Any) -> Any:
    """The seed trainer's TCN (trainer/model.py): (B, T, 16) -> (B, T, 20), output a transposed view."""
    from trainer.config import ModelConfig
    from trainer.model import build_model

    cfg = ModelConfig(hidden=args.hidden, layers=args.layers, kernel_size=args.kernel_size)
    return build_model(cfg, IN_CHANNELS, BATCH_SHAPE[-1]).to(device)


class Capture:
    """One variant: ``per_step(y_true, y_pred)`` after each step, ``finish()`` after the timed loop."""

    def __init__(self, per_step: Callable[[Any, Any], None], finish: Callable[[], dict[str, Any]] | None = None):
        self.per_step = per_step
        self.finish = finish or (lambda: {})


def make_capture(name: str, torch: Any, device: Any, args: argparse.Namespace) -> Capture | str:
    """The variant's capture, or a string saying why it cannot run here."""
    if name == "step":
        return Capture(lambda t, p: None)
    if name == "cpu_copy":
        kept: list[tuple[np.ndarray, np.ndarray]] = []

        def cpu_copy(t: Any, p: Any) -> None:
            kept.append((t.detach().cpu().numpy(), p.detach().cpu().numpy()))  # note: a sync point

        return Capture(cpu_copy, lambda: {"rows_captured": sum(len(t) for t, _ in kept)})
    if name == "torchmetrics_mse":
        try:
            from torchmetrics import MeanSquaredError
        except ImportError as exc:
            return f"torchmetrics is not installed ({exc})"
        metric = MeanSquaredError().to(device)
        # torchmetrics takes (preds, target) and view(-1)s them: the TCN's transposed output needs a reshape
        return Capture(lambda t, p: metric.update(p.detach().reshape(-1), t.reshape(-1)),
                       lambda: {"mse": float(metric.compute())})
    from oocmetrics.capture import DeviceStager

    stager = DeviceStager(args.chunk_rows, BATCH_SHAPE[1:], device=device, slots=args.slots,
                          check_finite=name == "stager")
    q: queue.SimpleQueue = queue.SimpleQueue()
    seen = {"rows": 0, "chunks": 0, "sum": 0.0}
    errors: list[BaseException] = []

    def consume() -> None:  # the writer's part: wait for the copy, read the chunk, give the slot back
        while (chunk := q.get()) is not None:
            try:
                chunk.wait()
                seen["sum"] += float(np.sum(chunk.t, dtype=np.float64) + np.sum(chunk.p, dtype=np.float64))
                seen["rows"] += chunk.n
                seen["chunks"] += 1
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
            finally:
                chunk.release()

    thread = threading.Thread(target=consume, name="capture-consumer", daemon=True)
    thread.start()

    def append(t: Any, p: Any) -> None:
        for chunk in stager.append(t, p):
            q.put(chunk)

    def finish() -> dict[str, Any]:
        t0 = time.perf_counter()
        last = stager.flush()
        if last is not None:
            q.put(last)
        q.put(None)
        thread.join()
        stager.close()
        if errors:
            raise RuntimeError(f"the consumer thread failed: {errors[0]!r}") from errors[0]
        return {"rows_captured": seen["rows"], "chunks": seen["chunks"], "slots": stager.n_slots,
                "drain_after_loop_s": time.perf_counter() - t0}

    return Capture(append, finish)


def run_variant(name: str, mode: str, torch: Any, model: Any, opt: Any, pool: list, device: Any,
                args: argparse.Namespace) -> dict[str, Any]:
    """Warm-up + timed steps of one variant; ms per step and what the capture reports."""
    capture = make_capture(name, torch, device, args)
    if isinstance(capture, str):
        return {"skipped": capture}
    F = torch.nn.functional
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(i: int) -> tuple[Any, Any]:
        x, y = pool[i % len(pool)]
        if mode == "eval":
            with torch.no_grad():
                return y, model(x)
        opt.zero_grad(set_to_none=True)
        out = model(x)
        F.mse_loss(out, y).backward()
        opt.step()
        return y, out

    for i in range(args.warmup):
        capture.per_step(*step(i))
    sync()
    t0 = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.batches):
        capture.per_step(*step(i))
    sync()
    elapsed = time.perf_counter() - t0
    return {"ms_per_step": 1e3 * elapsed / args.batches, **capture.finish()}


# ----------------------------------------------------------------------------------------- report
def aggregate(runs: list[dict[str, dict[str, Any]]], modes: list[str]) -> dict[str, dict[str, Any]]:
    """Per mode and variant: median ms, and the median over runs of the ratio to ``step`` in that run."""
    out: dict[str, dict[str, Any]] = {}
    for mode in modes:
        out[mode] = {}
        for name in VARIANTS:
            per_run = [r[mode][name] for r in runs]
            if "skipped" in per_run[0]:
                out[mode][name] = {"skipped": per_run[0]["skipped"]}
                continue
            ratios = [r[mode][name]["ms_per_step"] / r[mode]["step"]["ms_per_step"] for r in runs]
            ms = [x["ms_per_step"] for x in per_run]
            ratio = float(np.median(ratios))
            extra = {k: v for k, v in per_run[-1].items() if k != "ms_per_step"}
            out[mode][name] = {"ms_per_step": float(np.median(ms)), "ratio": ratio,
                               "overhead_pct": 100.0 * (ratio - 1.0), "runs_ms": ms, "runs_ratio": ratios, **extra}
    return out


def print_report(header: list[str], results: dict[str, dict[str, Any]], targets: list[dict[str, Any]]) -> list[str]:
    lines = [*header, "", f"{'mode':<7}{'per-batch capture':<34}{'ms/step':>9}{'x step':>9}{'overhead':>10}"]
    for mode, res in results.items():
        for name in VARIANTS:
            r = res[name]
            if "skipped" in r:
                lines.append(f"{mode:<7}{LABELS[name]:<34}  skipped: {r['skipped']}")
                continue
            over = "-" if name == "step" else f"{r['overhead_pct']:+.1f}%"
            lines.append(f"{mode:<7}{LABELS[name]:<34}{r['ms_per_step']:>7.3f}ms{r['ratio']:>8.3f}x{over:>10}")
    lines += ["", "targets:"]
    for t in targets:
        state = "n/a" if t["met"] is None else ("met" if t["met"] else "NOT met")
        value = "-" if t["value"] is None else f"{t['value']:+.2f}{t['unit']}"
        lines.append(f"  [{state}] {t['target']}: {value} (goal <= {t['goal']:g}{t['unit']}){t.get('note', '')}")
    for line in lines:
        print(line)
    return lines


def plot(results: dict[str, dict[str, Any]], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [n for n in VARIANTS if n != "step"]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / max(len(results), 1)
    for j, (mode, res) in enumerate(results.items()):
        vals = [res[n].get("overhead_pct", np.nan) for n in names]
        bars = ax.bar(np.arange(len(names)) + (j - (len(results) - 1) / 2) * width, vals, width, label=f"{mode} step")
        ax.bar_label(bars, labels=[f"{v:+.1f}%" if np.isfinite(v) else "" for v in vals], fontsize=8)
    ax.axhline(TARGET_OVERHEAD_PCT, color="k", ls="--", lw=1, label=f"target +{TARGET_OVERHEAD_PCT:g}% (train)")
    ax.set_xticks(np.arange(len(names)), [LABELS[n].lstrip("+ ") for n in names], fontsize=8)
    ax.set_ylabel("added time per step (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    on_cpu = not torch.cuda.is_available()
    if on_cpu and not args.allow_cpu:
        print("run_gpu_capture needs a CUDA device: torch.cuda.is_available() is False here "
              f"(torch {torch.__version__}), so nothing was measured. Run it on a GPU machine, or pass "
              "--allow-cpu for a CPU smoke run that only checks the script.")
        return 0
    for name, gpu, cpu in (("batches", 400, 10), ("warmup", 50, 2), ("repeat", 5, 1)):
        if getattr(args, name) is None:
            setattr(args, name, cpu if on_cpu else gpu)
    for name in ("batches", "repeat", "chunk_rows", "hidden", "layers", "kernel_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')}={getattr(args, name)}; expected >= 1.")
    if args.warmup < 0 or args.slots < 2:
        raise SystemExit(f"--warmup={args.warmup} (>= 0) / --slots={args.slots} (>= 2) out of range.")
    device = torch.device("cpu") if on_cpu else torch.device(args.device)
    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    B, T, J = BATCH_SHAPE
    pool = [(torch.randn(B, T, IN_CHANNELS, device=device), torch.randn(B, T, J, device=device)) for _ in range(8)]
    model = make_model(torch, args, device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    info = machine_info() | {"torch": torch.__version__}
    if not on_cpu:
        info["gpu"] = torch.cuda.get_device_name(device)
    where = f"{info.get('gpu', 'CPU')} ({device})"
    for mode in args.modes:  # first calls pay for kernel selection and allocator growth: not any variant's cost
        run_variant("step", mode, torch, model, opt, pool, device, args)
    runs = []
    for rep in range(args.repeat):
        order = list(VARIANTS[rep % len(VARIANTS):] + VARIANTS[:rep % len(VARIANTS)])  # rotate against drift
        run: dict[str, dict[str, Any]] = {m: {} for m in args.modes}
        for mode in args.modes:
            for name in order:
                run[mode][name] = run_variant(name, mode, torch, model, opt, pool, device, args)
        runs.append(run)
        if args.repeat > 1:
            print(f"  run {rep + 1}/{args.repeat}: " + ", ".join(
                f"{m} {n} {run[m][n]['ms_per_step'] / run[m]['step']['ms_per_step']:.3f}x"
                for m in args.modes for n in ("stager", "cpu_copy") if "ms_per_step" in run[m][n]), flush=True)
    results = aggregate(runs, args.modes)
    rows = (args.warmup + args.batches) * B
    for mode in args.modes:
        for name in ("stager", "stager_nocheck", "cpu_copy"):
            got = results[mode][name].get("rows_captured")
            if got is not None and got != rows:
                raise SystemExit(f"{mode}/{name} captured {got} rows, expected {rows}: a capture lost rows.")
    targets = []
    if "train" in args.modes:
        over = results["train"]["stager"]["overhead_pct"]
        targets.append({
            "target": "DeviceStager adds at most 3% to the training step", "value": over, "unit": "%",
            "goal": TARGET_OVERHEAD_PCT, "met": None if on_cpu else bool(over <= TARGET_OVERHEAD_PCT),
            **({"note": "  -- CPU smoke run: not judged"} if on_cpu else {}),
        })
    header = [
        f"# run_gpu_capture on {where}, torch {torch.__version__}: {BATCH_SHAPE} float32 batches, the seed's TCN "
        f"({IN_CHANNELS} in, {args.hidden} hidden, {args.layers} blocks, kernel {args.kernel_size}); "
        f"{args.batches} timed steps after {args.warmup} per variant, "
        f"median of {args.repeat} run(s); chunks of {args.chunk_rows} rows, {args.slots} slots",
    ]
    if on_cpu:
        header.append("# CPU smoke run (--allow-cpu): checks that the script works; these are not GPU figures.")
    print()
    lines = print_report(header, results, targets)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": "run_gpu_capture",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "config": {k: v for k, v in vars(args).items() if k != "out"} | {
            "batch_shape": BATCH_SHAPE, "in_channels": IN_CHANNELS, "device": str(device), "cpu_smoke": on_cpu,
            "rows_per_variant": rows},
        "machine": info,
        "results": results,
        "targets": targets,
        "runs": runs,
        "wall_s": time.perf_counter() - t_start,
        "table": lines,
    }
    write_json(out / "gpu_capture.json", doc)
    title = (f"Per-batch capture cost on {where}, seed TCN, {BATCH_SHAPE} batches\n"
             f"median of {args.repeat} run(s) x {args.batches} steps"
             + ("; CPU smoke run, not GPU figures" if on_cpu else ""))
    drew = plot(results, out / "gpu_capture.png", title)
    print(f"\nwrote {out / 'gpu_capture.json'}" + (f" and {out / 'gpu_capture.png'}" if drew else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
