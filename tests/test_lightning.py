"""OOCMetricsCallback: exact epoch metrics logged from a real Lightning fit / validate / test (CPU)."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("lightning")
import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import oocmetrics  # noqa: E402
from oocmetrics.integrations.lightning import OOCMetricsCallback  # noqa: E402

N, D, J, BS = 103, 4, 3, 10
# lightning's own deprecation notice under this torch; not ours
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated")


def _data(seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    w = torch.randn(D, J, generator=g)
    y = x @ w + 0.1 * torch.randn(N, J, generator=g)
    return TensorDataset(x, y)


class Reg(pl.LightningModule):
    def __init__(self, keys: tuple[str, str] = ("y_true", "y_pred"), eval_returns: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(D, J)
        self.keys = keys
        self.eval_returns = eval_returns

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        y_hat = self(x)
        loss = torch.nn.functional.mse_loss(y_hat, y)
        return {"loss": loss, self.keys[0]: y, self.keys[1]: y_hat}

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        y_hat = self(x)
        return {self.keys[0]: y, self.keys[1]: y_hat} if self.eval_returns else None

    test_step = validation_step

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _loader(ds: TensorDataset, shuffle: bool = False) -> DataLoader:
    return DataLoader(ds, batch_size=BS, shuffle=shuffle)


def _trainer(tmp_path, cb, logger=True, **kw) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=kw.pop("max_epochs", 2), accelerator="cpu", devices=1,
        logger=CSVLogger(tmp_path) if logger else False, callbacks=[cb],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=2, default_root_dir=tmp_path, log_every_n_steps=1, **kw,
    )


def _reference(model: Reg, ds: TensorDataset) -> oocmetrics.EpochMetrics:
    """float64 metrics over every sample, predictions of the model as it is now (eval mode)."""
    model.eval()
    with torch.no_grad():
        pred = model(ds.tensors[0]).double().numpy()
    return oocmetrics.compute_arrays(ds.tensors[1].double().numpy(), pred)


def _numpy_mse_r2(model: Reg, ds: TensorDataset) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        p = model(ds.tensors[0]).double().numpy()
    t = ds.tensors[1].double().numpy()
    e = t - p
    mse = float(np.mean(np.mean(e * e, axis=0)))
    r2 = float(np.mean(1 - (e * e).sum(0) / ((t - t.mean(0)) ** 2).sum(0)))
    return mse, r2


def test_fit_logs_exact_val_metrics_and_skips_sanity_check(tmp_path):
    train, val = _data(1), _data(2)
    cb = OOCMetricsCallback(per_output=True, keep_epochs=None)
    model = Reg()
    trainer = _trainer(tmp_path, cb)
    trainer.fit(model, _loader(train, shuffle=True), _loader(val))

    ref = _reference(model, val)
    m = trainer.callback_metrics
    for name in oocmetrics.METRICS:
        assert float(m[f"val_{name}"]) == pytest.approx(ref[name], rel=1e-12, abs=0), name
        assert f"train_{name}" in m
    for j in range(J):
        assert float(m[f"val_r2_{j}"]) == pytest.approx(ref.per_output["r2"][j], rel=1e-12, abs=0)
    mse, r2 = _numpy_mse_r2(model, val)
    assert float(m["val_mse"]) == pytest.approx(mse, rel=1e-12, abs=0)
    assert float(m["val_r2"]) == pytest.approx(r2, rel=1e-12, abs=0)
    assert m["val_mse"].dtype == torch.float64

    # the callback keeps the last results; every sample of the epoch, none of the sanity check
    res = cb.results["val"]
    assert res.n_rows == N and res.epoch == 1 and res.split == "val" and dict(res) == pytest.approx(dict(ref), rel=1e-12)
    assert cb.results["train"].n_rows == N and cb.results["train"].epoch == 1
    assert cb.dirpath == str(tmp_path / "lightning_logs" / "version_0" / "oocmetrics")

    # stored epochs are named by trainer.current_epoch; epoch 0 holds 103 val rows (not 103 + 20)
    for split in ("train", "val"):
        for epoch in (0, 1):
            stored = oocmetrics.compute_stored(cb.dirpath, split, epoch=epoch)
            assert stored.n_rows == N, (split, epoch)
    stored = oocmetrics.compute_stored(cb.dirpath, "val", epoch=1)
    assert dict(stored) == dict(res) and stored.n_rows == N
    # the CSV logger got the values too
    csv = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "val_rmse" in csv and "train_mae" in csv

    # validate / test after fit: recorded under trainer.current_epoch (2), exact, every sample
    test = _data(3)
    out = trainer.validate(model, _loader(val), verbose=False)
    assert out[0]["val_mse"] == pytest.approx(ref["mse"], rel=1e-12, abs=0)
    assert cb.results["val"].epoch == trainer.current_epoch == 2 and cb.results["val"].n_rows == N
    out = trainer.validate(model, _loader(val), verbose=False)  # again: replaces stored epoch 2
    assert out[0]["val_mse"] == pytest.approx(ref["mse"], rel=1e-12, abs=0)
    assert oocmetrics.compute_stored(cb.dirpath, "val", epoch=2).n_rows == N
    tref = _reference(model, test)
    out = trainer.test(model, _loader(test), verbose=False)
    assert out[0]["test_mse"] == pytest.approx(tref["mse"], rel=1e-12, abs=0)
    assert out[0]["test_max_error"] == pytest.approx(tref["max_error"], rel=1e-12, abs=0)
    assert float(trainer.callback_metrics["test_r2"]) == pytest.approx(tref["r2"], rel=1e-12, abs=0)
    assert cb.results["test"].n_rows == N and cb.results["test"].epoch == 2
    assert oocmetrics.compute_stored(cb.dirpath, "test", epoch=2).n_rows == N


def test_fresh_fit_overwrites_and_target_preds_keys(tmp_path):
    val = _data(2)
    for _ in range(2):  # the second fresh fit into the same store replaces what the first stored
        cb = OOCMetricsCallback(dirpath=tmp_path / "store", splits=("val",), prefix="m/",
                                metrics=["mse", "median_absolute_error"], keep_epochs=None)
        model = Reg(keys=("target", "preds"))
        trainer = _trainer(tmp_path, cb, logger=False, max_epochs=1)
        trainer.fit(model, _loader(_data(1)), _loader(val))
        ref = _reference(model, val)
        assert float(trainer.callback_metrics["m/val_median_absolute_error"]) == pytest.approx(
            float(np.mean(np.median(np.abs(val.tensors[1].double().numpy() - _pred(model, val)), axis=0))),
            rel=1e-12, abs=0)
        assert float(trainer.callback_metrics["m/val_mse"]) == pytest.approx(ref["mse"], rel=1e-12, abs=0)
        assert "m/train_mse" not in trainer.callback_metrics and "train" not in cb.results
        rec = oocmetrics.Recorder(tmp_path / "store", "val", mode="resume")
        assert rec.stored_epochs() == [0]
        rec.close()


def _pred(model: Reg, ds: TensorDataset) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(ds.tensors[0]).double().numpy()


def test_fit_resumed_from_checkpoint_keeps_earlier_epochs(tmp_path):
    train, val = _data(1), _data(2)
    store = tmp_path / "store"
    cb = OOCMetricsCallback(dirpath=store, keep_epochs=None)
    model = Reg()
    trainer = _trainer(tmp_path, cb, logger=False)
    trainer.fit(model, _loader(train), _loader(val))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    before = oocmetrics.compute_stored(store, "val", epoch=1)

    cb = OOCMetricsCallback(dirpath=store, keep_epochs=None)
    model = Reg()
    trainer = _trainer(tmp_path, cb, logger=False, max_epochs=3)
    trainer.fit(model, _loader(train), _loader(val), ckpt_path=tmp_path / "last.ckpt")
    assert cb.results["val"].epoch == 2 and cb.results["train"].epoch == 2
    assert float(trainer.callback_metrics["val_mse"]) == pytest.approx(_reference(model, val)["mse"], rel=1e-12, abs=0)
    rec = oocmetrics.Recorder(store, "val", mode="resume")
    assert rec.stored_epochs() == [0, 1, 2]  # resumed: the first run's epochs stay
    rec.close()
    assert oocmetrics.compute_stored(store, "val", epoch=1) == before


def test_second_val_dataloader_recorded_separately(tmp_path):
    cb = OOCMetricsCallback(splits=("val",))
    model = Reg()
    a, b = _data(2), TensorDataset(_data(4).tensors[0][:37], _data(4).tensors[1][:37])
    trainer = _trainer(tmp_path, cb, logger=False, max_epochs=1)
    trainer.fit(model, _loader(_data(1)), [_loader(a), _loader(b)])
    m = trainer.callback_metrics
    assert float(m["val_mse"]) == pytest.approx(_reference(model, a)["mse"], rel=1e-12, abs=0)
    assert float(m["val_dl1_mse"]) == pytest.approx(_reference(model, b)["mse"], rel=1e-12, abs=0)
    assert cb.results["val"].n_rows == N and cb.results["val_dl1"].n_rows == 37


def test_missing_outputs_dict_gives_clear_error(tmp_path):
    cb = OOCMetricsCallback(splits=("val",))
    trainer = _trainer(tmp_path, cb, logger=False, max_epochs=1)
    with pytest.raises(TypeError, match=r"validation_step returned NoneType; it must return a dict with 'y_true' and 'y_pred'"):
        trainer.validate(Reg(eval_returns=False), _loader(_data(2)), verbose=False)
    # the recorder was released on the exception: a new one can open the split
    oocmetrics.Recorder(cb.dirpath, "val", mode="resume").close()

    cb = OOCMetricsCallback(splits=("train",))
    model = Reg()
    model.training_step = lambda batch, batch_idx: torch.nn.functional.mse_loss(model(batch[0]), batch[1])
    trainer = _trainer(tmp_path / "t", cb, logger=False, max_epochs=1)
    with pytest.raises(TypeError, match=r"training_step returned a dict with keys \['loss'\].*'y_true' and 'y_pred'"):
        trainer.fit(model, _loader(_data(1)), _loader(_data(2)))


def test_custom_getter_and_argument_checks(tmp_path):
    seen = []

    def getter(batch, outputs, pl_module):
        seen.append(type(outputs))
        return batch[1], pl_module(batch[0])

    cb = OOCMetricsCallback(getter, splits=("test",), metrics=["rmse"])
    model = Reg(eval_returns=False)
    trainer = _trainer(tmp_path, cb, logger=False)
    out = trainer.test(model, _loader(_data(3)), verbose=False)
    assert out[0]["test_rmse"] == pytest.approx(_reference(model, _data(3))["rmse"], rel=1e-12, abs=0)
    assert len(seen) == 11 and cb.results["test"].epoch == 0

    with pytest.raises(ValueError, match="splits"):
        OOCMetricsCallback(splits=("valid",))
    with pytest.raises(TypeError, match="mode"):
        OOCMetricsCallback(mode="create")
    with pytest.raises(ValueError, match="Unknown metric"):
        OOCMetricsCallback(metrics=["mape"])


DDP_SCRIPT = """
import json, sys
import numpy as np
import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset
from oocmetrics.integrations.lightning import OOCMetricsCallback

N, D, J = 103, 4, 3  # 103 samples: DistributedSampler pads rank 1 with a copy of sample 0

class Data(Dataset):
    def __init__(self, seed):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(N, D, generator=g)
        self.y = self.x @ torch.randn(D, J, generator=g) + 0.1 * torch.randn(N, J, generator=g)
    def __len__(self):
        return N
    def __getitem__(self, i):
        return self.x[i], self.y[i], i

class Reg(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(D, J)
        self.seen = []
    def training_step(self, batch, batch_idx):
        x, y, ids = batch
        y_hat = self.lin(x)
        return {"loss": torch.nn.functional.mse_loss(y_hat, y), "y_true": y, "y_pred": y_hat, "ids": ids}
    def validation_step(self, batch, batch_idx):
        x, y, ids = batch
        y_hat = self.lin(x)
        if self.trainer.current_epoch == self.trainer.max_epochs - 1 and not self.trainer.sanity_checking:
            self.seen.append((ids.numpy().copy(), y.double().numpy(), y_hat.double().numpy()))
        return {"y_true": y, "y_pred": y_hat, "ids": ids}
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

out = sys.argv[1]
cb = OOCMetricsCallback(dirpath=out + "/store", chunk_rows=8)
trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                     callbacks=[cb], enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=2, default_root_dir=out)
model = Reg()
trainer.fit(model, DataLoader(Data(1), batch_size=10), DataLoader(Data(2), batch_size=10))
rank = trainer.global_rank
ids, t, p = (np.concatenate(a) for a in zip(*model.seen))
np.savez(f"{out}/rank{rank}.npz", ids=ids, t=t, p=p)
logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
res = cb.results["val"]
json.dump({"logged": logged, "n_rows": res.n_rows, "dups": res.extra["duplicate_rows"]},
          open(f"{out}/rank{rank}.json", "w"))
"""


def test_ddp_two_processes_log_exact_values_over_unique_samples(tmp_path):
    import json
    import subprocess
    import sys

    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert got[0] == got[1]  # every rank logs the same values
    assert got[0]["n_rows"] == N and got[0]["dups"] == 1
    # the reference: each rank's predictions of the last val epoch, copies dropped (first wins), float64
    parts = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    ids = np.concatenate([q["ids"] for q in parts])
    _, first = np.unique(ids, return_index=True)
    t = np.concatenate([q["t"] for q in parts])[first]
    p = np.concatenate([q["p"] for q in parts])[first]
    ref = oocmetrics.compute_arrays(t, p)
    assert len(first) == N
    for name, value in ref.items():
        assert got[0]["logged"][f"val_{name}"] == pytest.approx(value, rel=1e-12, abs=0), name


def test_import_oocmetrics_does_not_import_lightning():
    import subprocess
    import sys

    code = "import sys, oocmetrics; assert 'lightning' not in sys.modules and 'pytorch_lightning' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
