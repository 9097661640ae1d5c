"""The benchmarks run end to end in --quick mode and write sane, verified results.

No timed assertions: speed and memory figures live in the benchmark outputs, not in unit tests.
What is asserted: every configuration ran, the numbers are physically sane (positive, finite,
RSS at least the process's start), the exact strategy matches the in-process float64 reference,
sampled differs from it on the ordered data, and the JSON/PNG files exist.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
METRICS = ("mse", "rmse", "mae", "r2", "r2_variance_weighted", "explained_variance", "pearson_r", "nrmse", "max_error")

pytestmark = pytest.mark.slow


def run_script(name: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(BENCH / name), "--quick", "--out", str(out), *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def memory_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("memory")
    proc = run_script("run_memory.py", out)
    return out, proc, json.loads((out / "memory.json").read_text())


@pytest.fixture(scope="module")
def speed_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("speed")
    proc = run_script("run_speed.py", out)
    return out, proc, json.loads((out / "speed.json").read_text())


def _png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# run_memory.py
# ---------------------------------------------------------------------------------------------
def test_memory_outputs_cover_every_strategy_and_size(memory_run):
    out, proc, doc = memory_run
    assert _png(out / "memory.png")
    cfg = doc["config"]
    assert cfg["sizes"] == [20, 80]
    assert set(cfg["strategies"]) == {"exact", "sampled", "naive"}
    got = {(r["strategy"], r["n_batches"]) for r in doc["results"]}
    assert got == {(s, n) for s in cfg["strategies"] for n in cfg["sizes"]}
    assert all(r["status"] == "ok" for r in doc["results"]), [r.get("reason") for r in doc["results"]]
    # one table line per configuration, with units, on stdout and in the JSON
    header, *rows = doc["table"]
    assert len(rows) == len(doc["results"])
    assert all(line in proc.stdout for line in doc["table"])
    assert all((" MB" in line or " GB" in line) and line.rstrip().endswith("ok") for line in rows)
    # nothing left behind: the stores and per-run files are deleted
    assert sorted(p.name for p in out.iterdir()) == ["memory.json", "memory.png"]


def test_memory_values_are_sane(memory_run):
    _, _, doc = memory_run
    per_batch = 2 * 4 * 16 * 500 * 20
    for r in doc["results"]:
        assert r["data_bytes"] == per_batch * r["n_batches"]
        assert 50e6 < r["rss_start"] <= r["rss_peak"] < 20e9, r
        assert r["ru_maxrss"] >= r["rss_start"]
        assert r["rss_samples"] >= 2
        for key in ("t_update_s", "t_compute_s", "t_strategy_s", "t_total_s"):
            assert 0 <= r[key] < 120 and math.isfinite(r[key]), (key, r)
        assert set(r["metrics"]) == set(METRICS) == set(r["reference"]) == set(r["rel_error"])


def test_memory_exact_matches_float64_reference(memory_run):
    _, _, doc = memory_run
    exact = [r for r in doc["results"] if r["strategy"] == "exact"]
    assert exact
    for r in exact:
        assert r["n_rows"] == 16 * r["n_batches"]
        assert r["n_skipped"] == 0
        for name in METRICS:
            assert r["rel_error"][name] < 1e-9, (name, r["metrics"][name], r["reference"][name])
            assert math.isclose(r["metrics"][name], r["reference"][name], rel_tol=1e-9)


def test_memory_naive_exact_and_sampled_biased(memory_run):
    _, _, doc = memory_run
    by = {(r["strategy"], r["n_batches"]): r for r in doc["results"]}
    for n in doc["config"]["sizes"]:
        assert max(by["naive", n]["rel_error"].values()) < 1e-9
        # the first 10 batches of an ordered epoch are not a sample of it
        assert by["sampled", n]["rel_error"]["mse"] > 0.1
        assert by["sampled", n]["held_bytes"] == by["naive", n]["held_bytes"]  # the seed keeps every batch


# ---------------------------------------------------------------------------------------------
# run_speed.py
# ---------------------------------------------------------------------------------------------
METHODS = ("memcpy", "memcpy_paced", "seed_view", "seed_copy", "torchmetrics", "oocmetrics", "oocmetrics_warm",
           "oocmetrics_paced", "zarr_append", "zarr_append_batchchunk_nocodec")


def test_speed_outputs_and_sane_values(speed_run):
    out, proc, doc = speed_run
    assert _png(out / "speed.png")
    assert sorted(p.name for p in out.iterdir()) == ["speed.json", "speed.png"]  # stores and test file removed
    for key in ("memcpy_GBps", "first_touch_GBps", "disk_write_GBps", "disk_write_fsync_GBps", "disk_write_warm_GBps",
                "disk_write_fsync_warm_GBps", "zarr_chunk_write_warm_GBps"):
        assert 0 < doc["figures"][key] < 1000 and math.isfinite(doc["figures"][key])
    pb = doc["per_batch"]
    assert set(pb) == set(METHODS) | {"zarr_whole_chunks_warm"}
    assert pb["zarr_whole_chunks_warm"]["MBps"] > 0 and pb["zarr_whole_chunks_warm"]["chunks"] > 0
    for name in METHODS:
        s = pb[name]
        assert s["n"] > 0
        assert 0 < s["median_ms"] <= s["max_ms"] and math.isfinite(s["mean_ms"]), (name, s)
    assert pb["zarr_append"]["chunks"] == [1, 500, 20]  # zarr's auto chunks for this shape
    assert "ms" in proc.stdout and "MB/s" in proc.stdout


def test_speed_compute_agrees_with_numpy(speed_run):
    _, _, doc = speed_run
    assert [c["n_batches"] for c in doc["compute"]] == doc["config"]["compute_sizes"]
    for c in doc["compute"]:
        assert c["max_rel_diff_vs_numpy"] < 1e-9
        assert c["max_rel_diff_numpy_load"] == 0.0  # the store round-trips the data bit for bit
        for key in ("ooc_compute_s", "numpy_concat_compute_s", "numpy_concat_compute_first_s", "numpy_load_compute_s",
                    "numpy_load_compute_first_s", "ooc_kernels_in_ram_s"):
            assert 0 < c[key] < 120, (key, c[key])
        assert c["numpy_concat_compute_s"] <= c["numpy_concat_compute_first_s"]  # the faster of two runs


def test_speed_targets_are_reported(speed_run):
    _, proc, doc = speed_run
    names = " ".join(t["target"] for t in doc["targets"])
    for needle in ("90% of zarr's own whole-chunk writes", "2x memcpy", "< 1 s after the last update", ">= 4 GB/s"):
        assert needle in names
    for t in doc["targets"]:
        assert isinstance(t["met"], bool) and math.isfinite(t["value"]) and t["value"] > 0
        assert ("[met]" if t["met"] else "[NOT met]") + " " + t["target"] in proc.stdout


# ---------------------------------------------------------------------------------------------
# run_memory.py guards: a size that cannot fit is skipped, a run that drains RAM is killed
# ---------------------------------------------------------------------------------------------
def _run_memory(out: Path, *extra: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(BENCH / "run_memory.py"), "--out", str(out), "--sizes", "5", "--strategies", "naive",
         *extra], cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((out / "memory.json").read_text())


def test_memory_skips_what_cannot_fit(tmp_path):
    doc = _run_memory(tmp_path, "--reserve-gb", "1e6")
    (r,) = doc["results"]
    assert r["status"] == "skipped" and "needs ~" in r["reason"]
    assert _png(tmp_path / "memory.png")


def test_memory_kills_a_run_that_drains_ram(tmp_path):
    doc = _run_memory(tmp_path, "--kill-below-gb", "1e6")
    (r,) = doc["results"]
    assert r["status"] == "killed" and "available" in r["reason"]
    assert not list(tmp_path.glob("run_memory-*"))  # its temp dir is gone
