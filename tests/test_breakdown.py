"""Per-step, per-group and |error| histogram breakdowns (oocmetrics.breakdown) against float64 NumPy /
scikit-learn references, the merge tree they share with compute_stored, and every error path."""
from __future__ import annotations

import json

import numpy as np
import pytest

import oocmetrics
from oocmetrics import breakdown
from oocmetrics.__main__ import main
from oocmetrics.breakdown import StepBlocks, analyze, error_histogram, per_group, per_step, to_json
from oocmetrics.compute import compute_partials
from oocmetrics.metrics import finalize
from oocmetrics.stored import open_stored_epoch
from reference import reference

TOL = {"rtol": 1e-12, "atol": 1e-12}


def _record(path, t, p, *, chunk_rows, cuts, split="val", **labels):
    """Record rows of (t, p) as batches cut at ``cuts`` (with labels sliced alike); returns the path."""
    edges = [0, *cuts, t.shape[0]]
    with oocmetrics.Recorder(path, split, chunk_rows=chunk_rows, nonfinite="skip") as rec:
        for a, b in zip(edges[:-1], edges[1:]):
            rec.update(t[a:b], p[a:b], **{k: v[a:b] for k, v in labels.items()})
    return path


def _awkward(rng, rows=29, steps=7, outputs=3, dtype=np.float32):
    """An outlier in the first row, a step whose targets are constant, another predicted perfectly."""
    t = (5.0 + rng.standard_normal((rows, steps, outputs))).astype(dtype)
    p = (t + 0.2 * rng.standard_normal(t.shape) + 0.01 * np.arange(steps)[:, None]).astype(dtype)
    t[0, 1, :] += dtype(1e4)  # outlier in the first row
    t[:, 2, :] = dtype(3.0)   # constant targets at step 2 (r2 by scikit-learn's rule, pearson_r NaN)
    p[:, 4, 1] = t[:, 4, 1]   # output 1 perfect at step 4 (|e| == 0 exactly)
    return t, p


def _check_against_reference(res, t, p):
    rows, S, J = t.shape
    _, per = reference(t.reshape(rows, S * J), p.reshape(rows, S * J))  # one column per (step, output)
    assert (res["steps"], res["outputs"], res["n_rows"], res["shape"]) == (S, J, rows, [rows, S, J])
    for key, ref in per.items():
        np.testing.assert_allclose(res["per_step"][key], ref.reshape(S, J), err_msg=key, **TOL)
    for s in range(S):
        overall, _ = reference(t[:, s], p[:, s])
        for name, ref in overall.items():
            np.testing.assert_allclose(res["per_step_overall"][name][s], ref, err_msg=f"{name} step {s}", **TOL)
    e = t.astype(np.float64) - p.astype(np.float64)
    pooled = res["per_step_pooled"]
    np.testing.assert_array_equal(pooled["n"], np.full(S, rows * J))
    np.testing.assert_allclose(pooled["rmse"], np.sqrt((e ** 2).mean(axis=(0, 2))), **TOL)
    np.testing.assert_allclose(pooled["mae"], np.abs(e).mean(axis=(0, 2)), **TOL)
    np.testing.assert_array_equal(pooled["max_error"], np.abs(e).max(axis=(0, 2)))


@pytest.mark.parametrize("chunk_rows, cuts", [(3, [5, 10, 15, 20, 25]), (8, [1, 13]), (64, [])])
def test_per_step_matches_numpy_with_outlier_constant_step_and_cut_batches(tmp_path, rng, chunk_rows, cuts):
    t, p = _awkward(rng)
    path = _record(tmp_path / "run", t, p, chunk_rows=chunk_rows, cuts=cuts)
    res = per_step(path, "val", split_every=2)  # split_every=2: the tree has several levels
    _check_against_reference(res, t, p)
    assert np.isnan(res["per_step"]["pearson_r"][2]).all()  # constant targets
    assert (res["per_step"]["r2"][2] == 0.0).all()  # constant targets, imperfect prediction
    assert res["per_step"]["max_error"][4, 1] == 0.0


def test_one_row(tmp_path, rng):
    t, p = _awkward(rng, rows=1)
    res = per_step(_record(tmp_path / "run", t, p, chunk_rows=4, cuts=[]), "val")
    _check_against_reference(res, t, p)
    assert np.isnan(res["per_step"]["r2"]).all()  # fewer than two values


@pytest.mark.parametrize("columns", [1024, 4])
def test_same_tree_as_compute_partials_and_agrees_with_compute_stored(tmp_path, rng, monkeypatch, columns):
    monkeypatch.setattr(breakdown, "COLUMNS", columns)  # 4: the kernel runs on slices of 4 of the 21 columns
    t, p = _awkward(rng, rows=45, dtype=np.float64)
    path = _record(tmp_path / "run", t, p, chunk_rows=2, cuts=[7, 30])
    res = per_step(path, "val", split_every=3)
    y_true, y_pred, info = open_stored_epoch(path, "val")
    blocks = StepBlocks(y_true, y_pred, info.rows, y_true.chunks[0])
    assert blocks.n_blocks == 23
    direct = finalize(compute_partials(blocks, split_every=3), n_rows=info.rows)
    for key, values in direct.per_output.items():  # one pass + histogram == compute_partials, bit for bit
        np.testing.assert_array_equal(res["per_step"][key], values.reshape(7, 3), err_msg=key)
    # the per-step sums add up to what compute_stored gives per output (same rows, same counts)
    stored = oocmetrics.compute_stored(path, "val")
    np.testing.assert_allclose(res["per_step"]["mse"].mean(axis=0), stored.per_output["mse"], rtol=1e-12)
    np.testing.assert_array_equal(res["per_step"]["max_error"].max(axis=0), stored.per_output["max_error"])


def test_histogram_counts_every_finite_pair_in_its_log_bin(tmp_path, rng):
    t, p = _awkward(rng, rows=31)
    t[3, 0, 0] = np.nan  # skipped pairs: left out, as by every metric
    p[5, 6, 2] = np.inf
    path = _record(tmp_path / "run", t, p, chunk_rows=4, cuts=[9])
    hist = error_histogram(path, "val")
    stored = oocmetrics.compute_stored(path, "val", quantiles=True)
    e = np.abs(t.astype(np.float64) - p.astype(np.float64))
    e = e[np.isfinite(e)]
    assert hist["n"] == stored.n_values == e.size and hist["inf"] == 0
    assert hist["zero"] == int((e == 0).sum()) == 31  # output 1 at step 4
    edges, counts = hist["edges"], hist["counts"]
    assert edges.size == counts.size + 1 and np.all(np.diff(edges) > 0)
    ratios = edges[1:] / edges[:-1]
    assert ratios.min() >= 16 / 15 - 1e-15 and ratios.max() <= 1.125 + 1e-15  # 8 bins per octave
    np.testing.assert_array_equal(counts, np.histogram(e[e > 0], bins=edges)[0])
    assert counts[0] > 0 and counts[-1] > 0  # trimmed to the used range
    # the exact quantiles the report marks lie inside the drawn range
    q = np.asarray(stored.quantiles["pooled"])
    assert np.all((q >= edges[0]) & (q <= edges[-1]))


def test_overflowing_difference_is_counted_as_inf(tmp_path):
    t = np.zeros((3, 2, 1))
    p = np.zeros((3, 2, 1))
    t[0, 0, 0], p[0, 0, 0] = 1.7e308, -1.7e308
    t[1, 1, 0] = 0.5
    hist = error_histogram(_record(tmp_path / "run", t, p, chunk_rows=2, cuts=[]), "val")
    assert (hist["inf"], hist["zero"], hist["n"], int(hist["counts"].sum())) == (1, 4, 6, 1)
    assert hist["edges"][0] == 0.5


def test_per_group_matches_numpy_and_drops_repeated_ids(tmp_path, rng):
    t, p = _awkward(rng, rows=37, steps=5)
    groups = rng.integers(-2, 3, size=37)
    ids = np.arange(37)
    ids[33:] = [4, 9, 9, 20]  # rows 33..36 repeat earlier samples: left out, the first copy counts
    path = _record(tmp_path / "run", t, p, chunk_rows=5, cuts=[6, 17], ids=ids, groups=groups)
    res = analyze(path, "val", split_every=2)
    kept = np.arange(33)
    assert res["n_rows"] == 33 == oocmetrics.compute_stored(path, "val").n_rows
    _check_against_reference(res, t[kept], p[kept])
    pg = res["per_group"]
    alone = per_group(path, "val", split_every=2)  # without the step and histogram work: the same bits
    np.testing.assert_array_equal(alone["overall"]["rmse"], pg["overall"]["rmse"])
    np.testing.assert_array_equal(pg["groups"], np.unique(groups[kept]))
    for i, g in enumerate(pg["groups"]):
        rows = kept[groups[kept] == g]
        assert pg["rows"][i] == rows.size
        overall, per = reference(t[rows], p[rows])
        for name, ref in overall.items():
            np.testing.assert_allclose(pg["overall"][name][i], ref, err_msg=f"{name} group {g}", **TOL)
        for key, ref in per.items():
            np.testing.assert_allclose(pg["per_output"][key][i], ref, err_msg=f"{key} group {g}", **TOL)
    assert res["abs_error_histogram"]["n"] == 33 * 5 * 3  # kept rows only


def test_per_group_two_dimensional_data_and_no_groups(tmp_path, rng):
    t = rng.standard_normal((19, 3))
    p = t + rng.standard_normal((19, 3))
    groups = np.repeat([7, 3, 7, 5], [4, 6, 5, 4])
    path = _record(tmp_path / "g", t, p, chunk_rows=4, cuts=[10], groups=groups)
    pg = per_group(path, "val")
    np.testing.assert_array_equal(pg["groups"], [3, 5, 7])
    np.testing.assert_array_equal(pg["rows"], [6, 4, 9])
    overall, _ = reference(t[groups == 7], p[groups == 7])
    np.testing.assert_allclose(pg["overall"]["rmse"][2], overall["rmse"], **TOL)
    assert per_group(_record(tmp_path / "plain", t, p, chunk_rows=4, cuts=[]), "val") is None


def test_too_many_groups(tmp_path, rng, monkeypatch):
    t = rng.standard_normal((9, 2))
    path = _record(tmp_path / "run", t, t + 1, chunk_rows=3, cuts=[], groups=np.arange(9))
    monkeypatch.setattr(breakdown, "MAX_GROUPS", 4)
    with pytest.raises(ValueError, match=r"more than MAX_GROUPS=4 distinct ids \(9 so far\).*coarser"):
        per_group(path, "val")


def test_json_is_strict_and_round_trips(tmp_path, rng):
    t, p = _awkward(rng, rows=6)
    res = per_step(_record(tmp_path / "run", t, p, chunk_rows=4, cuts=[]), "val")
    doc = json.loads(json.dumps(to_json(res), allow_nan=False))
    assert doc["per_step"]["pearson_r"][2] == [None, None, None]  # NaN -> null
    np.testing.assert_array_equal(np.array(doc["per_step"]["rmse"]), res["per_step"]["rmse"])
    assert doc["abs_error_histogram"]["counts"] == res["abs_error_histogram"]["counts"].tolist()


def test_cli_compute_by_step(tmp_path, rng, capsys):
    t, p = _awkward(rng, rows=10)
    path = _record(tmp_path / "run", t, p, chunk_rows=4, cuts=[3])
    argv = ["compute", str(path), "--split", "val", "--by", "step", "--metrics", "rmse", "r2", "--scheduler", "sync"]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert sorted(doc["per_step"]) == ["r2", "rmse"] and doc["steps"] == 7
    np.testing.assert_allclose(doc["per_step"]["rmse"], per_step(path, "val")["per_step"]["rmse"], rtol=0)
    out = tmp_path / "steps.json"
    assert main(["compute", str(path), "--split", "val", "--by", "step", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "10 rows x 7 steps x 3 outputs; pooled rmse from" in printed and f"wrote {out}" in printed
    assert json.loads(out.read_text())["per_step_overall"]["rmse"] == to_json(per_step(path, "val"))["per_step_overall"]["rmse"]


def test_errors_name_the_problem(tmp_path, rng, capsys):
    flat = _record(tmp_path / "flat", rng.standard_normal((5, 4)), rng.standard_normal((5, 4)), chunk_rows=2, cuts=[])
    with pytest.raises(ValueError, match=r"shape \(rows, steps, outputs\).*holds \(5, 4\): no step axis"):
        per_step(flat, "val")
    assert main(["compute", str(flat), "--split", "val", "--by", "step"]) == 2
    assert "no step axis" in capsys.readouterr().err
    t, p = _awkward(rng, rows=4)
    path = _record(tmp_path / "run", t, p, chunk_rows=2, cuts=[])
    with pytest.raises(oocmetrics.StoreError, match="No epoch 5"):
        per_step(path, "val", epoch=5)
    assert main(["compute", str(path), "--split", "val", "--epoch", "5", "--by", "step"]) == 2
    assert "No epoch 5" in capsys.readouterr().err
    with pytest.raises(oocmetrics.StoreError, match="No split 'test'"):
        per_step(path, "test")
    with pytest.raises(oocmetrics.StoreError, match="No oocmetrics store"):
        per_step(tmp_path / "missing", "val")
    with pytest.raises(ValueError, match=r"\['median_absolute_error'\] are order statistics.*leave"):
        per_step(path, "val", metrics=["rmse", "median_absolute_error"])
    with pytest.raises(ValueError, match="Unknown metric"):
        per_step(path, "val", metrics=["nope"])
    with pytest.raises(ValueError, match="split_every=1; expected an int >= 2"):
        per_step(path, "val", split_every=1)
    assert main(["compute", str(path), "--split", "val", "--by", "step", "--quantiles", "0.5"]) == 2
    assert "--quantiles is not available with --by step" in capsys.readouterr().err
    assert main(["compute", str(path), "--split", "val", "--by", "step", "--source", "partials"]) == 2
    assert "drop --source partials" in capsys.readouterr().err
