"""Exact quantiles of |y_true - y_pred| (per output and pooled), bit for bit NumPy's ``np.quantile``,
and the bounded memory of the order-statistics passes."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import oocmetrics
from oocmetrics import compute as C
from oocmetrics.__main__ import main
from oocmetrics.kernels import select

QS = (0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)


def reference(t, p, q):
    """np.quantile of |e| in float64 over the finite pairs: (Q, J) per output and (Q,) pooled."""
    q = np.asarray(q, dtype=np.float64)
    T = np.asarray(t).astype(np.float64)
    P = np.asarray(p).astype(np.float64)
    J = T.shape[-1] if T.ndim > 1 else 1  # outputs: the last axis; leading axes are rows
    T, P = T.reshape(-1, J), P.reshape(-1, J)
    ok = np.isfinite(T) & np.isfinite(P)
    with np.errstate(invalid="ignore", over="ignore"):
        E = np.abs(T - P)
        per = np.stack([np.quantile(E[ok[:, j], j], q) if ok[:, j].any() else np.full(q.size, np.nan)
                        for j in range(J)], axis=1)
        pooled = np.quantile(E[ok], q) if ok.any() else np.full(q.size, np.nan)
    return per, pooled


def same_bits(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    both_nan = np.isnan(a) & np.isnan(b)
    ok = both_nan | (a.view(np.uint64) == b.view(np.uint64))
    assert ok.all(), (a[~ok], b[~ok])


def check(t, p, q=QS, **kwargs):
    kwargs.setdefault("nonfinite", "skip")
    res = oocmetrics.compute_arrays(t, p, ["mae"], quantiles=q, **kwargs)
    per, pooled = reference(t, p, q)
    assert res.quantiles["q"] == [float(x) for x in q]
    same_bits(res.quantiles["per_output"], per)
    same_bits(res.quantiles["pooled"], pooled)
    json.dumps(res.to_dict(), allow_nan=False)
    return res


def _awkward(kind, rng):
    n, J = 61, 3
    t = rng.standard_normal((n, J))
    p = rng.standard_normal((n, J))
    if kind == "ties":
        t, p = np.round(t, 1), np.round(p, 1)
    elif kind == "equal":
        t = np.zeros((n, J))
        p = np.where(rng.random((n, J)) < 0.8, 0.25, rng.standard_normal((n, J)))
    elif kind == "signed_zero":
        t = np.where(rng.random((n, J)) < 0.5, 0.0, -0.0)
        p = np.where(rng.random((n, J)) < 0.5, -0.0, np.round(rng.standard_normal((n, J))))
    elif kind == "subnormal":
        tiny = np.float64(5e-324)
        t = rng.integers(0, 7, (n, J)) * tiny
        p = -rng.integers(0, 7, (n, J)) * tiny * np.where(rng.random((n, J)) < 0.5, 1, 1e300)
    elif kind == "nan_skip":
        t[rng.random((n, J)) < 0.2] = np.nan
        p[rng.random((n, J)) < 0.1] = np.inf
        t[:, 2] = np.nan  # an output with no finite pair: NaN quantiles
    elif kind == "overflow":
        t[::5] = 1.5e308
        p[::5] = -1.5e308  # finite pairs whose |e| is +inf: counted and ordered last, as NumPy does
    elif kind == "huge_range":
        t = t * 10.0 ** rng.integers(-300, 300, (n, J))
    return t, p


@pytest.mark.parametrize("kind", ["plain", "ties", "equal", "signed_zero", "subnormal", "nan_skip",
                                  "overflow", "huge_range"])
@pytest.mark.parametrize("chunk_rows", [1, 3, 1000])
def test_bit_equal_to_np_quantile_on_awkward_data(kind, chunk_rows):
    t, p = _awkward(kind, np.random.default_rng(7))
    check(t, p, chunk_rows=chunk_rows)


def test_order_statistics_on_chunk_edges():
    # 12 rows in chunks of 3 and 4: q chosen so (n - 1) * q lands on the first/last row of a chunk
    rng = np.random.default_rng(3)
    t, p = rng.standard_normal((12, 2)), np.zeros((12, 2))
    q = [k / 11 for k in range(12)] + [2.5 / 11, 3.5 / 11]
    for chunk_rows in (1, 3, 4, 5):
        check(t, p, q, chunk_rows=chunk_rows)


def test_one_row_one_output_and_float16():
    check(np.array([[3.0]]), np.array([[1.0]]))
    check(np.array([3.0, -1.0, 2.0]), np.array([1.0, 1.0, 1.0]), chunk_rows=1)
    rng = np.random.default_rng(5)
    t16 = rng.standard_normal((40, 4)).astype(np.float16)
    p16 = rng.standard_normal((40, 4)).astype(np.float16)
    check(t16, p16, chunk_rows=3)
    check(rng.standard_normal((30, 2, 3)).astype(np.float32), rng.standard_normal((30, 2, 3)).astype(np.float32),
          chunk_rows=4)  # (batch, time, outputs): 3 outputs


def test_defaults_validation_and_median_in_the_same_select():
    rng = np.random.default_rng(9)
    t, p = rng.standard_normal((50, 3)), rng.standard_normal((50, 3))
    res = oocmetrics.compute_arrays(t, p, ["median_absolute_error"], quantiles=True, chunk_rows=7)
    assert res.quantiles["q"] == list(C.DEFAULT_QUANTILES)
    plain = oocmetrics.compute_arrays(t, p, ["median_absolute_error"], chunk_rows=7)
    assert plain.quantiles is None and "quantiles" not in plain.to_dict()
    np.testing.assert_array_equal(res.per_output["median_absolute_error"], plain.per_output["median_absolute_error"])
    np.testing.assert_array_equal(res.per_output["median_absolute_error"], np.median(np.abs(t - p), axis=0))
    assert res.copy() == res and res != plain
    for bad in ((), (0.5, 1.5), (-0.1,), (float("nan"),)):
        with pytest.raises(ValueError, match="quantiles"):
            oocmetrics.compute_arrays(t, p, quantiles=bad)


@given(
    data=st.lists(st.sampled_from([0.0, -0.0, 0.5, 1.0, -1.0, 1e-310, 3.0, 2.5, 1e300, -1e300, np.nan, 7.25]),
                  min_size=2, max_size=120),
    J=st.integers(1, 3),
    chunk_rows=st.integers(1, 9),
    q=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=6),
)
def test_hypothesis_random_data(data, J, chunk_rows, q):
    x = np.array(data, dtype=np.float64)
    half = x.size // 2 // J * J
    if half == 0:
        return
    t, p = x[:half].reshape(-1, J), x[half:2 * half].reshape(-1, J)
    check(t, p, q, chunk_rows=chunk_rows)


@given(rows=st.integers(1, 300), J=st.integers(1, 4), seed=st.integers(0, 2**32 - 1), chunk_rows=st.integers(1, 64))
def test_hypothesis_continuous(rows, J, seed, chunk_rows):
    rng = np.random.default_rng(seed)
    t = rng.standard_normal((rows, J)).astype(np.float32)
    p = (rng.standard_normal((rows, J)) * 10.0 ** rng.integers(-8, 8)).astype(np.float32)
    check(t, p, QS, chunk_rows=chunk_rows)


def test_every_quantile_in_one_select_of_at_most_three_passes(monkeypatch):
    """All quantiles per output and pooled: one radix select; reads counted per block."""
    rng = np.random.default_rng(11)
    t = rng.standard_normal((20_000, 20)).astype(np.float32)
    p = (t + rng.standard_normal(t.shape).astype(np.float32) * np.float32(0.1))
    blocks = C.RowBlocks(t, p, t.shape[0], 1000)
    reads = []
    orig = C.RowBlocks.read
    monkeypatch.setattr(C.RowBlocks, "read", lambda self, i: (reads.append(i), orig(self, i))[1])
    counts = np.full(20, t.shape[0])
    out = C.abs_error_quantiles(blocks, counts, QS, median=True)
    assert len(reads) <= 3 * blocks.n_blocks, len(reads) / blocks.n_blocks
    per, pooled = reference(t, p, QS)
    same_bits(out["per_output"], per)
    same_bits(out["pooled"], pooled)
    np.testing.assert_array_equal(out["median"], np.median(np.abs(t.astype(np.float64) - p), axis=0))


def test_many_targets_split_over_passes_same_result(monkeypatch):
    # a histogram budget of 3 rows: targets are split over several passes, results unchanged
    monkeypatch.setattr(C, "HIST_BUDGET", 3 * select.BINS * 8)
    rng = np.random.default_rng(13)
    t, p = np.round(rng.standard_normal((300, 5)), 2), np.zeros((300, 5))
    check(t, p, chunk_rows=17)
    monkeypatch.setattr(select, "GATHER_MAX", 0)  # never gather: all 64 bits from histograms
    check(t, p, chunk_rows=17)


def test_through_a_stored_epoch_recorder_and_cli(tmp_path, capsys):
    rng = np.random.default_rng(17)
    batches = [(np.round(rng.standard_normal((5, 2, 3)), 1).astype(np.float32),
                rng.standard_normal((5, 2, 3)).astype(np.float32)) for _ in range(7)]
    batches[2][0][0, 0, 0] = np.nan
    q = (0.0, 0.5, 0.9, 0.99, 1.0)
    with oocmetrics.Recorder(tmp_path / "r", "val", metrics=["mae", "median_absolute_error"], chunk_rows=4,
                             nonfinite="skip", quantiles=q) as rec:
        for t, p in batches:
            rec.update(t, p)
        res = rec.compute()
        again = rec.compute(quantiles=(0.5,))
        assert again.quantiles["q"] == [0.5] and rec.compute().quantiles["q"] == list(q)
    T = np.concatenate([b[0] for b in batches])
    P = np.concatenate([b[1] for b in batches])
    per, pooled = reference(T, P, q)
    same_bits(res.quantiles["per_output"], per)
    same_bits(res.quantiles["pooled"], pooled)
    stored = oocmetrics.compute_stored(tmp_path / "r", "val", quantiles=q, source="data")
    same_bits(stored.quantiles["per_output"], per)
    same_bits(stored.quantiles["pooled"], pooled)
    assert oocmetrics.compute_stored(tmp_path / "r", "val").quantiles is None
    out_json = tmp_path / "m.json"
    assert main(["compute", str(tmp_path / "r"), "--split", "val", "--quantiles", "0.5", "0.9", "0.99",
                 "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "quantiles of |y_true - y_pred|" in text and "q=0.99" in text
    d = json.loads(out_json.read_text())["quantiles"]
    assert d["q"] == [0.5, 0.9, 0.99]
    assert d["pooled"] == pooled[[1, 2, 3]].tolist()
    assert d["per_output"] == per[[1, 2, 3]].tolist()


MEMORY = r"""
import json, sys
import numpy as np
import oocmetrics
rows, J = int(sys.argv[1]), 20
rng = np.random.default_rng(0)
t = rng.standard_normal((rows, J), dtype=np.float32)
p = t + rng.standard_normal((rows, J), dtype=np.float32) * np.float32(0.1)
oocmetrics.compute_arrays(t[:50], p[:50], ["median_absolute_error"], quantiles=True, chunk_rows=7)  # load kernels
oocmetrics.compute_arrays(t, p, ["mse"], chunk_rows=2000)  # the one-pass metrics alone
base = oocmetrics.peak_rss_bytes()
res = oocmetrics.compute_arrays(t, p, ["median_absolute_error"], quantiles=True, chunk_rows=2000)
print(json.dumps({"base_mb": base / 2**20, "peak_mb": oocmetrics.peak_rss_bytes() / 2**20,
                  "blocks": -(-rows // 2000), "med0": float(res.per_output["median_absolute_error"][0])}))
"""


@pytest.mark.slow
def test_order_statistics_memory_is_bounded_at_20_outputs():
    # 1M rows x 20 outputs in 500 blocks: one (targets x 65,536) histogram per task would be ~10 GB
    out = subprocess.run([sys.executable, "-c", MEMORY, "1000000"], capture_output=True, text=True,
                         timeout=600, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["blocks"] == 500
    assert r["peak_mb"] - r["base_mb"] < 100, r
