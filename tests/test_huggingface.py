"""OOCMetricsEval with a real transformers.Trainer (CPU, a tiny local model, no network)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import weakref

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

import oocmetrics  # noqa: E402
from oocmetrics.integrations.huggingface import OOCMetricsEval  # noqa: E402


def reference_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """Every default metric over all rows, float64 NumPy two-pass: (rows, J) arrays."""
    e = y - p
    mse = np.mean(e**2, axis=0)
    ss_t = np.sum((y - y.mean(axis=0)) ** 2, axis=0)
    ss_e = np.sum(e**2, axis=0)
    r2 = 1 - ss_e / ss_t
    ev = 1 - np.sum((e - e.mean(axis=0)) ** 2, axis=0) / ss_t
    yc, pc = y - y.mean(axis=0), p - p.mean(axis=0)
    pearson = np.sum(yc * pc, axis=0) / np.sqrt(np.sum(yc**2, axis=0) * np.sum(pc**2, axis=0))
    rmse = np.sqrt(mse)
    return {
        "mse": float(np.mean(mse)), "rmse": float(np.mean(rmse)), "mae": float(np.mean(np.abs(e))),
        "r2": float(np.mean(r2)), "r2_variance_weighted": float(1 - np.sum(ss_e) / np.sum(ss_t)),
        "explained_variance": float(np.mean(ev)), "pearson_r": float(np.mean(pearson)),
        "nrmse": float(np.mean(rmse / (y.max(axis=0) - y.min(axis=0)))),
        "max_error": float(np.max(np.abs(e))),
    }


class TinyRegressor(torch.nn.Module):
    """Elementwise head: each row's output depends on that row alone and is exactly rounded, so
    the Trainer's batches give the same bits as one pass over the whole set."""

    def __init__(self, n_out: int, squeeze_head: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(n_out, generator=g))
        self.b = torch.nn.Parameter(torch.randn(n_out, generator=g))
        self.n_out = n_out

    def forward(self, input: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = input * self.w + self.b  # (batch, n_out)
        out = {"logits": logits, "hidden": logits * 2}  # a second output: predictions is a tuple
        if labels is not None:
            out = {"loss": ((logits.reshape(labels.shape) - labels) ** 2).mean(), **out}
        return out


class Rows(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"input": self.x[i], "labels": self.y[i]}


def make_data(n: int, n_out: int, label_shape: tuple[int, ...]) -> Rows:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, n_out, generator=g)
    y = (torch.randn(n, n_out, generator=g) * 3 + 1).reshape(n, *label_shape)
    return Rows(x, y)


def make_trainer(tmp_path, model, ds, metrics) -> "transformers.Trainer":
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_eval_batch_size=8, batch_eval_metrics=True,
        report_to=[], use_cpu=True, disable_tqdm=True,
    )
    return transformers.Trainer(model, args=args, eval_dataset=ds, compute_metrics=metrics)


def direct_predictions(model: TinyRegressor, ds: Rows) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(ds.x)["logits"].numpy()


@pytest.mark.parametrize("n_out", [3, 1])
def test_trainer_evaluate_exact_and_next_epoch(tmp_path, n_out):
    model = TinyRegressor(n_out)
    # n_out=1: labels (batch,), head (batch, 1) -> recorded as (batch,)
    ds = make_data(101, n_out, (n_out,) if n_out > 1 else ())
    metrics = OOCMetricsEval(tmp_path / "store", per_output=True)
    trainer = make_trainer(tmp_path, model, ds, metrics)

    y = ds.y.numpy().astype(np.float64).reshape(101, -1)
    p = direct_predictions(model, ds).astype(np.float64).reshape(101, -1)
    ref = reference_metrics(y, p)

    first = trainer.evaluate()
    for name, value in ref.items():
        assert first[f"eval_{name}"] == pytest.approx(value, rel=1e-12, abs=1e-300), name
    for j in range(y.shape[1]):
        mse_j = np.mean((y[:, j] - p[:, j]) ** 2)
        assert first[f"eval_mse_{j}"] == pytest.approx(mse_j, rel=1e-12)
    assert set(ref) <= {k[5:] for k in first}  # the whole default suite came back
    assert isinstance(first["eval_mse"], float)
    assert "eval_loss" in first
    assert metrics.last_result.n_rows == 101 and metrics.last_result.epoch == 0
    assert metrics.last_result.extra["batches"] == 13  # 12 of 8 and one of 5
    assert metrics.epoch == 1 and metrics.recorder.rows == 0  # the next evaluation is epoch 1

    second = trainer.evaluate()
    assert metrics.last_result.epoch == 1 and metrics.last_result.n_rows == 101
    for name in ref:
        assert second[f"eval_{name}"] == first[f"eval_{name}"], name
    assert metrics.recorder.stored_epochs() == [1]  # keep_epochs=1: the newest evaluation stays
    metrics.close()
    stored = oocmetrics.compute_stored(tmp_path / "store", "eval", epoch=1)
    assert stored["mse"] == first["eval_mse"]
    metrics.close()  # idempotent


def test_keep_all_epochs_prefix_and_metric_subset(tmp_path):
    model = TinyRegressor(2)
    ds = make_data(101, 2, (2,))
    with OOCMetricsEval(tmp_path / "s", "val", metrics=["mae", "median_absolute_error"], prefix="ooc_",
                        keep_epochs=None, epoch=5) as metrics:
        trainer = make_trainer(tmp_path, model, ds, metrics)
        out = [trainer.evaluate() for _ in range(3)]
        assert metrics.recorder.stored_epochs() == [5, 6, 7]
    y = ds.y.numpy().astype(np.float64)
    p = direct_predictions(model, ds).astype(np.float64)
    mae = np.mean(np.abs(y - p))
    med = np.mean(np.median(np.abs(y - p), axis=0))
    for o in out:
        assert set(k for k in o if k.startswith("eval_ooc_")) == {"eval_ooc_mae", "eval_ooc_median_absolute_error"}
        assert o["eval_ooc_mae"] == pytest.approx(mae, rel=1e-12)
        assert o["eval_ooc_median_absolute_error"] == pytest.approx(med, rel=1e-12)
    assert metrics.closed


def test_adapter_holds_no_batch(tmp_path):
    """Memory does not grow with the eval set: after a call no reference to the batch remains."""
    with OOCMetricsEval(tmp_path / "s", chunk_rows=64) as metrics:
        for i in range(20):
            t = torch.randn(8, 3)
            p = torch.randn(8, 3)
            refs = (weakref.ref(t), weakref.ref(p))
            out = metrics(transformers.EvalPrediction(predictions=(p, p * 2), label_ids=t), compute_result=i == 19)
            del t, p  # reference counting frees them at once unless something still holds them
            assert all(r() is None for r in refs), "the adapter kept the batch"
            assert (out == {}) == (i < 19)
        assert out["mse"] > 0 and metrics.last_result.n_rows == 160


def test_errors_and_discard(tmp_path):
    m = OOCMetricsEval(tmp_path / "s")
    t, p = torch.randn(8, 2), torch.randn(8, 2)
    with pytest.raises(TypeError, match="batch_eval_metrics=True"):
        m(transformers.EvalPrediction(predictions=p, label_ids=t))
    with pytest.raises(TypeError, match="floating point"):
        m(transformers.EvalPrediction(predictions=p, label_ids=torch.ones(8, 2, dtype=torch.long)), compute_result=False)
    with pytest.raises(ValueError, match="2 label tensors"):
        m(transformers.EvalPrediction(predictions=p, label_ids=(t, t)), compute_result=False)
    # an evaluation that stops midway, then discard(): the next one replaces it under the same number
    m(transformers.EvalPrediction(predictions=p + 100, label_ids=t), compute_result=False)
    assert m.recorder.rows == 8
    m.discard()
    assert m.epoch == 0 and m.recorder.rows == 0
    m(transformers.EvalPrediction(predictions=p, label_ids=t), compute_result=False)
    out = m(transformers.EvalPrediction(predictions=p, label_ids=t), compute_result=True)
    assert out["mse"] == pytest.approx(float(((t - p).double() ** 2).mean()), rel=1e-6)
    assert m.last_result.n_rows == 16 and m.last_result.epoch == 0
    m.close()
    with pytest.raises(RuntimeError, match="closed"):
        m(transformers.EvalPrediction(predictions=p, label_ids=t), compute_result=True)
    # the split exists now: mode='create' refuses, 'resume' continues after the complete epoch 0
    with pytest.raises(oocmetrics.StoreError):
        OOCMetricsEval(tmp_path / "s")
    with OOCMetricsEval(tmp_path / "s", mode="resume") as m2:
        assert m2.epoch == 1
    # close() with an unfinished evaluation warns and leaves the epoch incomplete
    m3 = OOCMetricsEval(tmp_path / "s", mode="resume")
    m3(transformers.EvalPrediction(predictions=p, label_ids=t), compute_result=False)
    with pytest.warns(UserWarning, match="unfinished evaluation"):
        m3.close()


_WORKER = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist
    from transformers import EvalPrediction
    from oocmetrics.integrations.huggingface import OOCMetricsEval
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    m = OOCMetricsEval(sys.argv[1])
    g = torch.Generator().manual_seed(3)
    outs = []
    for ev in range(2):
        for i in range(5):  # every process sees the same gathered batch
            t, p = torch.randn(8, 2, generator=g), torch.randn(8, 2, generator=g)
            out = m(EvalPrediction(predictions=p, label_ids=t), compute_result=i == 4)
        outs.append(out)
    res = {"rank": rank, "has_store": m.recorder is not None, "outs": outs}
    m.close()
    with open(os.path.join(sys.argv[2], f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()
""")


def test_distributed_only_process_0_records(tmp_path):
    """Two gloo processes: process 0 holds the store, both return the same metrics."""
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000), WORLD_SIZE="2")
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    procs = [
        subprocess.Popen([sys.executable, str(script), str(tmp_path / "store"), str(tmp_path)],
                         env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stderr=subprocess.PIPE)
        for r in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()[-3000:]
    import json

    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["has_store"] and not r1["has_store"]
    assert r0["outs"] == r1["outs"] and r0["outs"][0]["mse"] > 0
    assert oocmetrics.compute_stored(tmp_path / "store", "eval", epoch=1)["mse"] == r0["outs"][1]["mse"]


RSS_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import torch, transformers
    from oocmetrics import peak_rss_bytes
    from oocmetrics.integrations.huggingface import OOCMetricsEval

    n, out = int(sys.argv[1]), sys.argv[2]
    STEPS, J = 500, 20  # the seed's windows: 40 KB of predictions per sample (and as much of labels)

    class Windows(torch.utils.data.Dataset):  # generated per item: the data set is never in RAM
        def __init__(self, size):
            self.size = size
        def __len__(self):
            return self.size
        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return {"input": torch.randn(STEPS, J, generator=g), "labels": torch.randn(STEPS, J, generator=g)}

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(J))
        def forward(self, input, labels=None):
            logits = input * self.w
            return {"loss": ((logits - labels) ** 2).mean(), "logits": logits}

    metrics = OOCMetricsEval(out + "/store", chunk_mb=2.0)
    args = transformers.TrainingArguments(output_dir=out + "/hf", per_device_eval_batch_size=16,
                                          batch_eval_metrics=True, report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(Head(), args=args, eval_dataset=Windows(n), compute_metrics=metrics)
    trainer.evaluate(eval_dataset=Windows(32))  # warm-up on 32 windows: kernels loaded, buffers made
    before = peak_rss_bytes()
    res = trainer.evaluate()  # all n windows
    metrics.close()
    json.dump({"before": before, "after": peak_rss_bytes(), "mse": res["eval_mse"],
               "rows": metrics.last_result.n_rows}, open(out + "/rss.json", "w"))
""")


def test_evaluate_peak_rss_does_not_grow_with_the_eval_set(tmp_path):
    """Eval sets of n and 4n windows of (500, 20), each in its own process: gathering logits and
    labels would hold 80 KB per window (+72 MB from 300 to 1,200 windows); with the adapter the
    evaluation adds the same few MB to the process peak (VmHWM) whatever n."""
    import json

    script = tmp_path / "rss.py"
    script.write_text(RSS_SCRIPT)
    grown = {}
    for n in (300, 1200):
        out = tmp_path / f"n{n}"
        out.mkdir()
        proc = subprocess.run([sys.executable, str(script), str(n), str(out)], capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        got = json.loads((out / "rss.json").read_text())
        assert got["rows"] == n and np.isfinite(got["mse"])
        grown[n] = got["after"] - got["before"]  # what evaluating the n windows added to the peak
    assert grown[1200] < 40e6 and grown[1200] - grown[300] < 15e6, grown
