"""End-to-end and unit tests of the trainer/ package (smoke preset: seconds; writes only under tmp_path).

The central check: the val metrics the run reports through oocmetrics equal a float64 NumPy
reference recomputed from the saved model's predictions on the val split.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import oocmetrics

from trainer.config import ConfigError, RunConfig, preset
from trainer.data import WindowDataset, make_loader, scan_dir
from trainer.memory import RssSampler, lifetime_max_rss_mb
from trainer.model import TCN, build_model
from trainer.run import main
from trainer.synthetic import ensure_synthetic

REPO = Path(__file__).resolve().parents[1]
METRICS = ("mse", "rmse", "mae", "r2", "r2_variance_weighted", "explained_variance", "pearson_r",
           "nrmse", "max_error")
LOG_LINE = re.compile(r"^Epoch: (\d+), Batch: (\d+)/(\d+), Loss: \d+\.\d{6}$", re.M)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One synthetic-data cache for the module (the smoke dataset takes milliseconds to generate)."""
    return tmp_path_factory.mktemp("data-cache")


def smoke_args(out: Path, cache: Path, *extra: str) -> list[str]:
    return ["--config", "smoke", "--out", str(out), "--cache-dir", str(cache), "--no-progress", *extra]


def reference_metrics(t: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """The docs/API.md definitions in plain float64 NumPy over (M, J) arrays."""
    t, p = t.astype(np.float64), p.astype(np.float64)
    e = t - p
    sse = (e**2).sum(0)
    sst = ((t - t.mean(0)) ** 2).sum(0)
    mse = (e**2).mean(0)
    tc, pc = t - t.mean(0), p - p.mean(0)
    return {
        "mse": mse.mean(), "rmse": np.sqrt(mse).mean(), "mae": np.abs(e).mean(0).mean(),
        "r2": (1 - sse / sst).mean(), "r2_variance_weighted": 1 - sse.sum() / sst.sum(),
        "explained_variance": (1 - e.var(0) / t.var(0)).mean(),
        "pearson_r": ((tc * pc).sum(0) / np.sqrt((tc**2).sum(0) * (pc**2).sum(0))).mean(),
        "nrmse": (np.sqrt(mse) / (t.max(0) - t.min(0))).mean(), "max_error": np.abs(e).max(),
        "median_absolute_error": np.median(np.abs(e), axis=0).mean(),
    }


def read_history(out: Path) -> list[dict]:
    return json.loads((out / "history.json").read_text())


# ------------------------------------------------------------------------------ end to end
def test_smoke_run_writes_outputs_and_exact_val_metrics(tmp_path: Path, cache: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(smoke_args(out, cache, "--order-metrics")) == 0
    stdout = capsys.readouterr().out

    logs = LOG_LINE.findall(stdout)
    assert logs[0] == ("0", "0", "8") and ("1", "6", "8") in logs  # smoke: 8 batches, --log-every 2

    for name in ("history.json", "history.csv", "checkpoint.pt", "config.json", "final_metrics.json"):
        assert (out / name).is_file(), name
    assert (out / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rows = read_history(out)
    assert [(r["epoch"], r["split"]) for r in rows] == [(0, "train"), (0, "val"), (1, "train"), (1, "val"),
                                                        (1, "test")]
    for r in rows:
        for k in ("loss", *METRICS, "seconds", "peak_rss_mb"):
            assert math.isfinite(r[k]), (r["split"], k, r[k])
        assert r["peak_rss_mb"] > 10
    with open(out / "history.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows)
    assert float(csv_rows[-1]["mse"]) == pytest.approx(rows[-1]["mse"], rel=1e-12)

    # the train loss is the size-weighted mean of batch MSE losses = the recorded train mse
    for r in rows:
        assert r["loss"] == pytest.approx(r["mse"], rel=1e-5)

    # recompute val predictions from the saved model and compare with a float64 reference
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    cfg = RunConfig.from_dict(ckpt["config"])
    assert ckpt["epoch"] == 1 and cfg.name == "smoke"
    splits = scan_dir(ensure_synthetic(cfg.data), window=cfg.data.window)
    model = build_model(cfg.model, splits.in_channels, splits.joints)
    model.load_state_dict(ckpt["model"])
    model.eval()
    ds = WindowDataset(splits.val, window=cfg.data.window, stride=cfg.data.eval_stride)
    ts, ps = [], []
    with torch.inference_mode():
        for x, y in make_loader(ds, batch_size=cfg.train.batch_size, shuffle=False):
            ts.append(y.numpy())
            ps.append(model(x).numpy())
    t = np.concatenate(ts).reshape(-1, splits.joints)
    p = np.concatenate(ps).reshape(-1, splits.joints)
    ref = reference_metrics(t, p)
    val = rows[3]
    assert val["n_rows"] == len(ds)
    for k in (*METRICS, "median_absolute_error"):
        assert val[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-7), k
    per_output = json.loads((out / "final_metrics.json").read_text())["val"]["per_output"]["mse"]
    np.testing.assert_allclose(per_output, ((t.astype(np.float64) - p) ** 2).mean(0), rtol=1e-5)
    # exact |error| quantiles of val in the history, and the per-step curve of every val epoch
    abs_e = np.abs(t.astype(np.float64) - p)
    for q in (0.5, 0.9, 0.95, 0.99):
        assert val[f"abs_err_p{round(q * 100):02d}"] == pytest.approx(np.quantile(abs_e, q), rel=1e-4), q
    curves = json.loads((out / "val_per_step.json").read_text())
    assert sorted(curves) == ["0", "1"] and len(curves["1"]["rmse"]) == cfg.data.window
    err = (t.astype(np.float64) - p).reshape(-1, cfg.data.window, splits.joints)
    np.testing.assert_allclose(curves["1"]["rmse"], np.sqrt((err**2).mean(axis=(0, 2))), rtol=1e-5)


@pytest.mark.slow
def test_cli_subprocess(tmp_path: Path) -> None:
    out = tmp_path / "sub"
    cmd = [sys.executable, "-m", "trainer.run", *smoke_args(out, tmp_path / "cache"), "--epochs", "1"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert LOG_LINE.search(proc.stdout)
    assert "it/s" not in proc.stderr  # not a terminal: no progress bar
    assert [r["split"] for r in read_history(out)] == ["train", "val", "test"]


@pytest.mark.slow
def test_missing_matplotlib_warns_at_start_up_and_run_completes(tmp_path: Path) -> None:
    """Without matplotlib: one warning before any training, every output but history.png, exit 0."""
    out = tmp_path / "noplot"
    code = ("import sys; sys.modules['matplotlib'] = None  # `import matplotlib` now raises ImportError\n"
            "from trainer.run import main; sys.exit(main(sys.argv[1:]))")
    cmd = [sys.executable, "-c", code, *smoke_args(out, tmp_path / "cache"), "--epochs", "2"]
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=240)  # one stream: the order of the warning and the log lines is kept
    assert proc.returncode == 0, proc.stdout
    warning = "warning: matplotlib is not installed: history.png will not be written; pip install matplotlib"
    lines = proc.stdout.splitlines()
    assert lines.count(warning) == 1, proc.stdout
    first_log = next(i for i, line in enumerate(lines) if LOG_LINE.match(line))
    assert lines.index(warning) < first_log  # at start-up, not when epoch 0 ends
    assert not (out / "history.png").exists()
    for name in ("history.json", "history.csv", "checkpoint.pt", "config.json", "final_metrics.json"):
        assert (out / name).is_file(), name
    assert [r["split"] for r in read_history(out)] == ["train", "val", "train", "val", "test"]
    assert "history.png" not in lines[-1]


def test_resume_continues_at_next_epoch_and_matches_uninterrupted(tmp_path: Path, cache: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(smoke_args(full, cache, "--epochs", "2")) == 0
    assert main(smoke_args(part, cache, "--epochs", "1")) == 0
    capsys.readouterr()
    assert main(smoke_args(part, cache, "--epochs", "2", "--resume")) == 0
    stdout = capsys.readouterr().out
    assert "resuming at epoch 1" in stdout
    assert {int(e) for e, _, _ in LOG_LINE.findall(stdout)} == {1}  # epoch 0 is not trained again

    a, b = read_history(full), read_history(part)
    assert [(r["epoch"], r["split"]) for r in b] == [(0, "train"), (0, "val"), (0, "test"),
                                                    (1, "train"), (1, "val"), (1, "test")]
    a_by = {(r["epoch"], r["split"]): r for r in a}
    for r in b:
        if r["epoch"] == 1:
            for k in ("loss", *METRICS):
                assert r[k] == pytest.approx(a_by[r["epoch"], r["split"]][k], rel=1e-6), (r["split"], k)
    assert torch.load(part / "checkpoint.pt", weights_only=True)["epoch"] == 1

    # a fresh run into the same directory starts over
    assert main(smoke_args(part, cache, "--epochs", "1")) == 0
    assert [r["epoch"] for r in read_history(part)] == [0, 0, 0]


def test_resume_errors(tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(smoke_args(tmp_path / "none", cache, "--resume")) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    out = tmp_path / "run"
    assert main(smoke_args(out, cache, "--epochs", "1")) == 0
    capsys.readouterr()
    assert main(smoke_args(out, cache, "--resume", "--hidden", "9")) == 2
    err = capsys.readouterr().err
    assert "--hidden 8, not 9" in err and "Traceback" not in err


# ------------------------------------------------------------------------------ user data
def write_recordings(root: Path, n: int = 4, steps: int = 300, c: int = 3, j: int = 2) -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(c, j))
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        x = rng.normal(size=(steps, c)).astype(np.float32)
        np.save(root / f"rec{i}_x.npy", x)
        np.save(root / f"rec{i}_y.npy", (x @ w).astype(np.float32))


USER_FLAGS = ("--window", "50", "--stride", "25", "--eval-stride", "50", "--hidden", "4", "--layers", "1",
              "--kernel-size", "3", "--epochs", "1", "--batch-size", "4")


@pytest.mark.parametrize("with_split_file", [False, True])
def test_user_data(tmp_path: Path, with_split_file: bool) -> None:
    data = tmp_path / "mydata"
    write_recordings(data)
    if with_split_file:
        (data / "split.json").write_text(json.dumps({"train": ["rec1", "rec3"], "val": ["rec0"],
                                                     "test": ["rec2"]}))
    splits = scan_dir(data, window=50)
    names = [[r.name for r in splits[s]] for s in ("train", "val", "test")]
    assert names == ([["rec1", "rec3"], ["rec0"], ["rec2"]] if with_split_file
                     else [["rec0", "rec1"], ["rec2"], ["rec3"]])
    out = tmp_path / "run"
    assert main(["--data", str(data), "--out", str(out), "--no-progress", *USER_FLAGS]) == 0
    rows = read_history(out)
    assert [r["split"] for r in rows] == ["train", "val", "test"]
    assert rows[1]["n_rows"] == 6  # one 300-step recording, non-overlapping 50-step windows
    final = json.loads((out / "final_metrics.json").read_text())
    assert len(final["val"]["per_output"]["mse"]) == 2  # J = 2 outputs


def _bad(root: Path, case: str) -> tuple[Path, str]:
    """Build a broken dataset; return (path to pass to --data, text the error must contain)."""
    data = root / "d"
    if case == "missing":
        return root / "nope", "no such directory"
    if case == "file":
        root.mkdir(exist_ok=True)
        (root / "f.npy").write_bytes(b"")
        return root / "f.npy", "is a file"
    data.mkdir(parents=True)
    if case == "empty":
        return data, "no recordings found"
    write_recordings(data, n=3)
    x0 = data / "rec0_x.npy"
    if case == "no_targets":
        (data / "rec1_y.npy").unlink()
        return data, "rec1_x.npy has no matching rec1_y.npy"
    if case == "mismatched_T":
        np.save(x0, np.zeros((299, 3), np.float32))
        return data, "rec0_x.npy has 299 time steps but rec0_y.npy has 300"
    if case == "ndim":
        np.save(x0, np.zeros((300, 3, 1), np.float32))
        return data, "must be 2-D"
    if case == "short":
        np.save(x0, np.zeros((20, 3), np.float32))
        np.save(data / "rec0_y.npy", np.zeros((20, 2), np.float32))
        return data, "shorter than one window (50)"
    if case == "channels":
        np.save(data / "rec2_x.npy", np.zeros((300, 4), np.float32))
        return data, "rec2_x.npy has 4 input channels"
    if case == "joints":
        np.save(data / "rec2_y.npy", np.zeros((300, 5), np.float32))
        return data, "rec2_y.npy has 5 target columns"
    if case == "npz":
        np.savez(data / "rec9.npz", x=np.zeros((300, 3)), y=np.zeros((300, 2)))
        return data, "cannot be memory-mapped"
    if case == "not_npy":
        x0.write_bytes(b"not an array")
        return data, "rec0_x.npy: cannot be read as a .npy array"
    if case == "object_dtype":
        np.save(x0, np.array([[object()]] * 300), allow_pickle=True)
        return data, "rec0_x.npy: cannot be read"
    if case == "split_unknown":
        (data / "split.json").write_text(json.dumps({"train": ["rec0"], "val": ["rec1"], "test": ["zzz"]}))
        return data, "lists 'zzz'"
    if case == "split_empty":
        (data / "split.json").write_text(json.dumps({"train": ["rec0"], "val": [], "test": ["rec2"]}))
        return data, "split 'val' is empty"
    if case == "too_few":
        (data / "rec2_x.npy").unlink()
        (data / "rec2_y.npy").unlink()
        return data, "2 recording(s) cannot be split"
    raise AssertionError(case)


BAD_CASES = ("missing", "file", "empty", "no_targets", "mismatched_T", "ndim", "short", "channels", "joints",
             "npz", "not_npy", "object_dtype", "split_unknown", "split_empty", "too_few")


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_data_exits_2_with_one_line(tmp_path: Path, case: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    path, expected = _bad(tmp_path, case)
    out = tmp_path / "run"
    assert main(["--data", str(path), "--out", str(out), *USER_FLAGS]) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (out / "checkpoint.pt").exists()


@pytest.mark.parametrize("argv, expected", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--epochs", "two"], "invalid int value: 'two'"),
    (["--config", "huge"], "invalid choice: 'huge'"),
])
def test_bad_flags_exit_2(argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize("argv, expected", [
    (["--batch-size", "0"], "--batch-size must be >= 1, but got 0"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--chunk-mb", "0"], "--chunk-mb must be > 0"),
    (["--kernel-size", "4"], "--kernel-size must be odd"),
    (["--window", "600", "--eval-steps", "500"], "--eval-steps must be >= --window (600)"),
])
def test_bad_config_values_exit_2(argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*argv, "--print-config"]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1


def test_help_documents_every_config_field(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for name in preset("default").flat():
        assert "--" + name.replace("_", "-") in text, name
    for flag in ("--config", "--resume", "--no-progress", "--log-every", "--out", "--data"):
        assert flag in text


# ------------------------------------------------------------------------------ units
def test_presets_round_trip_and_flags_override(capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("default", "smoke", "low_memory", "seed_scale"):
        cfg = preset(name)
        assert RunConfig.from_dict(json.loads(cfg.to_json())) == cfg
    assert preset("low_memory").metrics.queue_chunks == 1
    assert preset("low_memory").metrics.chunk_mb < preset("default").metrics.chunk_mb
    assert main(["--config", "smoke", "--epochs", "7", "--no-causal", "--keep-epochs", "none",
                 "--print-config"]) == 0
    cfg = RunConfig.from_dict(json.loads(capsys.readouterr().out))
    got = (cfg.train.epochs, cfg.model.causal, cfg.metrics.keep_epochs, cfg.out)
    assert got == (7, False, None, "runs/smoke")
    with pytest.raises(ConfigError, match="Unknown config fields"):
        cfg.with_values({"epochz": 1})


def test_seed_scale_has_exactly_the_seed_epoch() -> None:
    d = preset("seed_scale").data
    windows = d.train_subjects * d.recordings_per_subject * ((d.train_steps - d.window) // d.stride + 1)
    assert (windows, preset("seed_scale").train.batch_size) == (11_014 * 16, 16)
    steps = d.train_subjects * d.recordings_per_subject * d.train_steps
    assert steps * (d.in_channels + d.joints) * 4 < 2e9  # bytes on disk for train


def test_synthetic_is_deterministic_and_split_by_subject(tmp_path: Path) -> None:
    cfg = preset("smoke").data
    a = ensure_synthetic(dataclasses.replace(cfg, cache_dir=str(tmp_path / "a")))
    b = ensure_synthetic(dataclasses.replace(cfg, cache_dir=str(tmp_path / "b")))
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    split = json.loads((a / "split.json").read_text())
    subjects = {s: {n.split("_")[0] for n in names} for s, names in split.items()}
    assert not (subjects["train"] & subjects["val"]) and not (subjects["train"] & subjects["test"])
    assert ensure_synthetic(dataclasses.replace(cfg, cache_dir=str(tmp_path / "a"))) == a  # reused


def test_windows_match_source_arrays_and_shuffle_is_seeded(tmp_path: Path) -> None:
    write_recordings(tmp_path, n=3, steps=130)
    splits = scan_dir(tmp_path, window=50)
    ds = WindowDataset(splits.train + splits.val, window=50, stride=40)  # rec0, rec1: 3 windows each
    assert len(ds) == 6
    y1 = np.load(tmp_path / "rec1_y.npy")
    x, y = ds[4]  # rec1, second window
    assert x.dtype == torch.float32 and x.shape == (50, 3)
    np.testing.assert_array_equal(y.numpy(), y1[40:90])
    with pytest.raises(IndexError):
        ds[6]
    order = lambda seed: [b[1].sum().item() for b in make_loader(ds, batch_size=1, shuffle=True, seed=seed)]
    assert order(3) == order(3) and order(3) != order(4)
    assert sorted(order(3)) == sorted(b[1].sum().item() for b in make_loader(ds, batch_size=1, shuffle=False))


@pytest.mark.parametrize("causal", [False, True])
def test_tcn_shapes_and_causality(causal: bool) -> None:
    torch.manual_seed(0)
    model = TCN(16, 20, hidden=8, layers=3, kernel_size=3, causal=causal).eval()
    x = torch.randn(2, 64, 16)
    y = model(x)
    assert y.shape == (2, 64, 20)
    x2 = x.clone()
    x2[:, 40:] += 1.0
    changed = (model(x2) - y).abs().amax(dim=(0, 2)) > 0
    assert changed[40:].all()
    assert changed[:40].any() != causal  # causal: nothing before t=40 sees the change
    with pytest.raises(ValueError, match=r"Expected input of shape \(batch, time, 16\)"):
        model(torch.randn(2, 64, 15))


def test_rss_sampler_sees_an_allocation() -> None:
    with RssSampler(interval=10.0) as rss:  # explicit samples only
        rss.reset()
        base = rss.peak_mb
        block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        rss.sample()
        del block
        assert rss.peak_mb >= base + 60
        assert rss.peak_anon_mb <= rss.peak_mb
        rss.reset()
        assert rss.peak_mb < base + 60  # reset forgets the earlier phase (the block is freed)
    assert lifetime_max_rss_mb() >= base


def test_resume_after_a_crash_mid_epoch_stores_the_trainers_epoch_numbers(tmp_path: Path, cache: Path) -> None:
    """A run killed during epoch 2 left an incomplete epoch=2; --resume re-trains epoch 2 and stores
    it as epoch=2 (replacing the crashed one), not as epoch=3."""
    import oocmetrics

    out = tmp_path / "run"
    assert main(smoke_args(out, cache, "--epochs", "2")) == 0
    store = out / "metrics"
    crash = (f"import os, numpy as np, oocmetrics\n"
             f"r = oocmetrics.Recorder({str(store)!r}, 'train', mode='resume', epoch=2, chunk_rows=4)\n"
             f"r.update(np.ones((10, 4), np.float32), np.zeros((10, 4), np.float32))\n"
             f"r.flush()\n"
             f"os._exit(0)  # the process dies: epoch 2 stays incomplete, with 10 durable rows\n")
    subprocess.run([sys.executable, "-c", crash], check=True, cwd=REPO)
    crashed = oocmetrics.compute_stored(store, "train", 2)
    assert crashed.n_rows == 10 and crashed.extra["complete"] is False

    assert main(smoke_args(out, cache, "--epochs", "3", "--resume")) == 0
    rows = {(r["epoch"], r["split"]): r for r in read_history(out)}
    for split in ("train", "val"):
        res = oocmetrics.compute_stored(store, split)
        assert res.epoch == 2 and res.extra["complete"] is True
        assert res.n_rows == rows[2, split]["n_rows"]
        assert res["mse"] == pytest.approx(rows[2, split]["mse"], rel=1e-12)


def test_device_flag_and_loader_workers(tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--device cpu and --workers 2 give the same metrics as the default; --device cuda without a GPU is
    a clear exit 2 (with a GPU, it trains there)."""
    base, workers = tmp_path / "base", tmp_path / "workers"
    assert main(smoke_args(base, cache, "--epochs", "1")) == 0
    assert main(smoke_args(workers, cache, "--epochs", "1", "--device", "cpu", "--workers", "2")) == 0
    assert "device cpu" in capsys.readouterr().out
    a, b = read_history(base), read_history(workers)
    for ra, rb in zip(a, b):
        for k in METRICS:
            assert ra[k] == pytest.approx(rb[k], rel=1e-6), (ra["split"], k)
    if not torch.cuda.is_available():
        assert main(smoke_args(tmp_path / "gpu", cache, "--device", "cuda")) == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert main(smoke_args(tmp_path / "bad", cache, "--device", "tpu")) == 2
    assert "device" in capsys.readouterr().err


def test_torchrun_two_ranks_report_the_metrics_of_one_process(tmp_path: Path) -> None:
    """`torchrun --nproc_per_node 2 -m trainer.run --config smoke`: gloo on CPU, 11 val windows (odd: the
    sampler pads one copy). Every window counted once; values equal one process over the same windows."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "trainer.run", *smoke_args(out, tmp_path / "cache"), "--epochs", "1", "--eval-stride", "90"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("done in") == 1  # rank 0 alone prints and writes the run files
    rows = read_history(out)
    final = json.loads((out / "final_metrics.json").read_text())
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    cfg = RunConfig.from_dict(ckpt["config"])
    splits = scan_dir(ensure_synthetic(cfg.data), window=cfg.data.window)
    model = build_model(cfg.model, splits.in_channels, splits.joints)
    model.load_state_dict(ckpt["model"])
    model.eval()
    for split, recs in (("val", splits.val), ("test", splits.test)):
        ds = WindowDataset(recs, window=cfg.data.window, stride=cfg.data.eval_stride)
        assert len(ds) == 11
        row = next(r for r in rows if r["split"] == split)
        assert row["n_rows"] == 11 and final[split]["duplicate_rows"] == 1
        assert final[split]["conflicting_predictions"] == 0  # same weights on both ranks: equal copies
        with torch.inference_mode():
            t = torch.stack([ds[i][1] for i in range(len(ds))]).numpy()
            p = model(torch.stack([ds[i][0] for i in range(len(ds))])).numpy()
        ref = reference_metrics(t.reshape(-1, splits.joints), p.reshape(-1, splits.joints))
        for k in METRICS:
            assert row[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-7), (split, k)
        # the stored shards, read after the run in one process: the bits every rank computed
        after = oocmetrics.compute_stored(out / "metrics", split)
        assert after.extra["shards"] == 2
        assert {k: after.overall[k] for k in METRICS} == {k: row[k] for k in METRICS}
