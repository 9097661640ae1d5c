"""Crash safety with real processes: a recording child SIGKILLs itself at 20+ deterministic points.

The child (``CHILD`` below, run with ``sys.executable``) records a fixed, seeded workload (batches of
(n, 3, 4) float32 into ``chunk_rows=10`` so chunk boundaries cut batches; four epochs with
``reset()``, ``compute()`` and ``flush()`` in between, the last one smaller than a chunk so that it is
sealed at ``close()``). It wraps, in the child only:

* ``zarr.storage._local._put`` (every key zarr writes: chunks, array metadata, group attributes),
* ``os.replace`` / ``os.rename`` (crash-safe epoch publication and deletion; zarr's own
  ``*.partial`` key renames are part of ``_put`` and not counted),
* ``shutil.rmtree``,
* main-thread lines executed inside oocmetrics during one public call (``sys.settrace``),

and kills itself with ``os.kill(os.getpid(), SIGKILL)`` before or after the N-th such operation.
A first child runs the workload once in trace mode and logs every operation with the public call
the main thread was in; the kill points are picked from that trace by meaning ("the rename that
publishes epoch 0", "the write of epoch 0's attributes that marks it complete in reset()", ...), so
they stay meaningful while the library's write sequence changes.

After each kill the parent checks what a user would see: the CLI (``inspect``, ``compute``), the raw
zarr arrays (bit-exact durable rows, never more than submitted, never fewer than the child reported
durable), nothing phantom, and that ``Recorder(..., mode="resume")`` continues (the kernel released
the lock).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import zarr

import oocmetrics
from oocmetrics.__main__ import main as cli_main

SPLIT = "train"
REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------- data
# Shared by the child (exec'd there) and the parent (exec'd here): the parent regenerates exactly
# what the child recorded.
DATA_SRC = r'''
import numpy as np
CHUNK_ROWS = 10
TRAILING = (3, 4)
# batch sizes per epoch: 7-row batches cut by 10-row chunks, a 23-row batch spanning three chunks,
# a 1-row batch, and a last epoch smaller than one chunk (sealed at close()).
EPOCHS = [[7, 7, 7, 7, 23, 7], [7, 7, 1, 7, 7], [7, 7], [4]]
COMPUTE_AT = {(0, 2), (0, 5), (1, 4)}   # compute() after these (epoch, batch); flush() ends epoch 2
FLUSH_EPOCHS = {2}

def sizes(e):
    return EPOCHS[e % len(EPOCHS)]

def batch(e, b):
    rng = np.random.default_rng(1000 * e + b)
    n = sizes(e)[b]
    t = rng.standard_normal((n, *TRAILING)).astype(np.float32)
    p = (t + 0.25 * rng.standard_normal((n, *TRAILING)) + 0.1 * e).astype(np.float32)
    return t, p

def epoch_data(e):
    bs = [batch(e, b) for b in range(len(sizes(e)))]
    return np.concatenate([x[0] for x in bs]), np.concatenate([x[1] for x in bs])
'''
_data: dict[str, Any] = {}
exec(DATA_SRC, _data)
CHUNK_ROWS: int = _data["CHUNK_ROWS"]
EPOCHS: list[list[int]] = _data["EPOCHS"]
epoch_data: Callable[[int], tuple[np.ndarray, np.ndarray]] = _data["epoch_data"]

# ---------------------------------------------------------------------------------------- child
CHILD = r'''
import json, os, shutil, signal, sys, threading, time
path = os.path.abspath(sys.argv[1])
spec = json.loads(sys.argv[2])
exec(spec["data_src"])
KILL = spec.get("kill")            # {"kind": put|move|rmtree|line, "n": N, "when": before|after, "call": C}
TRACE = spec.get("trace")
N_EPOCHS = spec.get("epochs", len(EPOCHS))
import faulthandler
faulthandler.dump_traceback_later(float(spec.get("hang_s", 100)), exit=True)   # a hang shows its stacks
_lock = threading.Lock()
_counts = {"put": 0, "move": 0, "rmtree": 0}
_state = {"call": "start", "call_no": -1, "lines": 0}
_tf = open(TRACE, "w") if TRACE else None

def out(msg):
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()

def log(rec):
    if _tf is not None:
        _tf.write(json.dumps(rec) + "\n")
        _tf.flush()

def die(desc):
    out("KILL " + desc)
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)

def rel(p):
    try:
        return os.path.relpath(os.path.abspath(os.fspath(p)), path)
    except Exception:
        return repr(p)

def begin(kind, what):
    with _lock:
        _counts[kind] += 1
        n = _counts[kind]
        log({"kind": kind, "n": n, "what": what, "call": _state["call"], "call_no": _state["call_no"],
             "thread": threading.current_thread().name})
    if KILL and KILL["kind"] == kind and KILL["n"] == n and KILL["when"] == "before":
        die(f"before {kind} #{n} {what} (main thread in {_state['call']})")
    return n

def end(kind, n, what):
    if KILL and KILL["kind"] == kind and KILL["n"] == n and KILL["when"] == "after":
        die(f"after {kind} #{n} {what} (main thread in {_state['call']})")

# -- instrumented operations (before oocmetrics is imported, so `from os import replace` is wrapped too)
import zarr.storage._local as _zl
_real_put = _zl._put
def _put(p, value, exclusive=False):
    what = rel(p)
    n = begin("put", what)
    try:      # an exclusive put may fail with FileExistsError (zarr expects that): still "after" it
        return _real_put(p, value, exclusive=exclusive)
    finally:
        end("put", n, what)
_zl._put = _put

def _wrap_move(real, name):
    def move(src, dst, *args, **kwargs):
        if os.fspath(src).endswith(".partial"):      # zarr's atomic key write: part of a put
            return real(src, dst, *args, **kwargs)
        what = f"{name} {rel(src)} -> {rel(dst)}"
        n = begin("move", what)
        try:
            return real(src, dst, *args, **kwargs)
        finally:
            end("move", n, what)
    return move
os.replace = _wrap_move(os.replace, "replace")
os.rename = _wrap_move(os.rename, "rename")

_real_rmtree = shutil.rmtree
def _rmtree(p, *args, **kwargs):
    what = rel(p)
    n = begin("rmtree", what)
    try:
        return _real_rmtree(p, *args, **kwargs)
    finally:
        end("rmtree", n, what)
_rmtree.avoids_symlink_attacks = getattr(_real_rmtree, "avoids_symlink_attacks", False)
shutil.rmtree = _rmtree

import oocmetrics
OOC = os.path.dirname(os.path.abspath(oocmetrics.__file__)) + os.sep

def _local(frame, event, arg):
    if event == "line":
        _state["lines"] += 1
        if KILL and KILL["kind"] == "line" and KILL["call"] == _state["call_no"] and _state["lines"] == KILL["n"]:
            die(f"line {_state['lines']} of {_state['call']}")
    return _local

def _global(frame, event, arg):
    return _local if frame.f_code.co_filename.startswith(OOC) else None

if TRACE or (KILL and KILL["kind"] == "line"):
    sys.settrace(_global)

def call(label, fn, *args, **kwargs):
    with _lock:
        _state["call_no"] += 1
        _state["call"] = label
        _state["lines"] = 0
        log({"kind": "call", "label": label, "call_no": _state["call_no"]})
    r = fn(*args, **kwargs)
    if KILL and KILL["kind"] == "line" and KILL["call"] == _state["call_no"]:
        die(f"end of {label} after {_state['lines']} lines (fewer than {KILL['n']})")
    with _lock:
        log({"kind": "endcall", "label": label, "call_no": _state["call_no"], "lines": _state["lines"]})
    return r

def main_workload():
    rec = call("init", oocmetrics.Recorder, path, "train", chunk_rows=CHUNK_ROWS, keep_epochs=1, queue_chunks=3)
    out("opened")
    for e in range(N_EPOCHS):
        rows = 0
        for b, n in enumerate(sizes(e)):
            t, p = batch(e, b)
            out(f"begin {e} {b} {rows + n}")
            call(f"update e{e} b{b}", rec.update, t, p)
            rows += n
            out(f"updated {e} {b} {rows}")
            if (e % len(EPOCHS), b) in COMPUTE_AT:
                call(f"compute e{e} b{b}", rec.compute)
                out(f"durable {e} {rows}")
        if e % len(EPOCHS) in FLUSH_EPOCHS:
            call(f"flush e{e}", rec.flush)
            out(f"durable {e} {rows}")
        out(f"finish-begin {e}")
        if e < N_EPOCHS - 1:
            call(f"reset e{e}", rec.reset)
        else:
            call("close", rec.close)
        out(f"finished {e} {rows}")

def replace_workload():
    # a store holding complete epochs 0, 1, 2 (old run); redo epoch 1 with new data (seeds of epoch 101)
    rec = call("init", oocmetrics.Recorder, path, "train", mode="resume", epoch=1, chunk_rows=CHUNK_ROWS,
               keep_epochs=None, queue_chunks=3)
    out("opened")
    rows = 0
    for b, n in enumerate(sizes(1)):
        t, p = batch(101, b)
        out(f"begin 1 {b} {rows + n}")
        call(f"update e1 b{b}", rec.update, t, p)
        rows += n
        out(f"updated 1 {b} {rows}")
    call("compute e1", rec.compute)
    out(f"durable 1 {rows}")
    out("finish-begin 1")
    call("close", rec.close)
    out(f"finished 1 {rows}")

replace_workload() if spec.get("scenario") == "replace" else main_workload()
out("closed")
if _tf is not None:
    _tf.close()
'''


def run_child(path: Path, spec: dict[str, Any], *, timeout: float = 240) -> subprocess.CompletedProcess:
    spec = {"data_src": DATA_SRC, **spec}
    return subprocess.run(
        [sys.executable, "-c", CHILD, str(path), json.dumps(spec)],
        capture_output=True, text=True, timeout=timeout, cwd=str(REPO),
    )


def cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "oocmetrics", *args], capture_output=True, text=True, timeout=timeout,
        cwd=str(REPO),
    )


# ------------------------------------------------------------------------------ kill-point picking
def _trace(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _ops(trace, kind=None, call=None, what=None, after=None, before=None):
    """Trace operations (put/move/rmtree), optionally filtered: kind, public call label (prefix; only
    meaningful for work the call waits for), a test of the path, and a window of trace positions."""
    out = []
    for i, ev in enumerate(trace):
        if ev["kind"] not in ("put", "move", "rmtree"):
            continue
        if (after is not None and i <= after) or (before is not None and i >= before):
            continue
        if kind is not None and ev["kind"] != kind:
            continue
        if call is not None and not ev["call"].startswith(call):
            continue
        if what is not None and not what(ev["what"]):
            continue
        out.append((i, ev))
    return out


def _base(p: str) -> str:
    return p.rstrip("/").split("/")[-1]


def _publishes(e: int) -> Callable[[str], bool]:
    """A rename whose destination is the epoch directory (the epoch appears)."""
    return lambda w: " -> " in w and _base(w.split(" -> ")[1]) == f"epoch={e}"


def _moves_away(e: int) -> Callable[[str], bool]:
    """A rename whose source is the epoch directory (crash-safe deletion or replacement)."""
    return lambda w: " -> " in w and _base(w.split(" -> ")[0].split(" ", 1)[1]) == f"epoch={e}"


def _chunk(e: int | None, name: str, index: int | None = None) -> Callable[[str], bool]:
    """A chunk key of array ``name`` (of epoch e, or of any epoch/staging dir); zarr v3 keys c/<i>/0/0."""
    def test(w: str) -> bool:
        key = f"{name}/c/" if index is None else f"{name}/c/{index}/"
        return key in w and (e is None or f"epoch={e}/" in w)
    return test


def _group_attrs(e: int) -> Callable[[str], bool]:
    return lambda w: w.endswith(f"epoch={e}/zarr.json")


def _array_meta(e: int, name: str) -> Callable[[str], bool]:
    return lambda w: w.endswith(f"epoch={e}/{name}/zarr.json")


def _at(ops, k, when):
    """Kill before/after the k-th (python index) of ``ops``; None when there is no such operation."""
    try:
        i, ev = ops[k]
    except IndexError:
        return None
    return {"kind": ev["kind"], "n": ev["n"], "when": when, "at": ev}


def _line(trace, label, fraction):
    ends = [ev for ev in trace if ev["kind"] == "endcall" and ev["label"] == label]
    if not ends:
        return None
    n = max(1, int(ends[0]["lines"] * fraction))
    return {"kind": "line", "call": ends[0]["call_no"], "n": n, "when": "line",
            "at": {"call": label, "lines": ends[0]["lines"], "kill_at_line": n}}


def _index(ops, k=0):
    return ops[k][0] if len(ops) > k else None


def _pick(name: str, trace) -> dict[str, Any] | None:
    """The kill point ``name`` as (operation kind, global count, before/after), from the trace.

    Writer-thread operations are found by what they write and by their order relative to the
    renames that publish and delete epochs (which thread or call they fall in depends on timing);
    main-thread points by the public call and the fraction of its oocmetrics lines.
    """
    publish = {e: _index(_ops(trace, "move", what=_publishes(e))) for e in range(4)}
    away = {e: _index(_ops(trace, "move", what=_moves_away(e))) for e in range(4)}
    init_puts = _ops(trace, "put", call="init")
    after_init = init_puts[-1][0] if init_puts else None
    first_pred2 = _index(_ops(trace, "put", what=_chunk(0, "y_pred", 2)))
    pickers: dict[str, Callable[[], Any]] = {
        # construction: after the very first key write (the store root appears) and after the last
        "init-first-write": lambda: _at(init_puts, 0, "after"),
        "init-last-write": lambda: _at(init_puts, -1, "after"),
        # epoch 0 is created (staging) and published by its first chunk
        "e0-staging-half-built": lambda: (lambda ops: _at(ops, len(ops) // 2, "after"))(
            _ops(trace, "put", after=after_init, before=publish[0])),
        "e0-before-publish": lambda: _at(_ops(trace, "move", what=_publishes(0)), 0, "before"),
        "e0-after-publish": lambda: _at(_ops(trace, "move", what=_publishes(0)), 0, "after"),
        "e0-chunk1-before-y_pred": lambda: _at(_ops(trace, "put", what=_chunk(0, "y_pred", 1)), 0, "before"),
        # compute() at 21 rows seals the partial chunk 2: resize, write, then the rows attribute
        "e0-seal-mid-resize": lambda: _at(_ops(trace, "put", what=_array_meta(0, "y_true"),
                                               before=_index(_ops(trace, "put", what=_chunk(0, "y_true", 2)))), -1, "after"),
        "e0-seal-chunk-y_true-written": lambda: _at(_ops(trace, "put", what=_chunk(0, "y_true", 2)), 0, "after"),
        "e0-seal-before-rows-attr": lambda: _at(_ops(trace, "put", what=_group_attrs(0), after=first_pred2), 0, "before"),
        # the chunk sealed half full is rewritten whole later: y_true rewritten, y_pred not yet
        "e0-rewrite-sealed-chunk": lambda: _at(_ops(trace, "put", what=_chunk(0, "y_pred", 2)), 1, "before"),
        # reset(): mark epoch 0 complete (the main thread waits in reset, so the call label holds)
        "e0-reset-mark-complete-first": lambda: _at(_ops(trace, "put", call="reset e0", what=_group_attrs(0)), 0, "before"),
        "e0-reset-mark-complete-last": lambda: _at(_ops(trace, "put", call="reset e0", what=_group_attrs(0)), -1, "after"),
        "e1-after-publish": lambda: _at(_ops(trace, "move", what=_publishes(1)), 0, "after"),
        "e1-mid-epoch-chunk": lambda: _at(_ops(trace, "put", what=_chunk(1, "y_pred")), 1, "before"),
        # reset() of epoch 1: keep_epochs=1 deletes epoch 0
        "e1-reset-retention-before-move": lambda: _at(_ops(trace, "move", what=_moves_away(0)), 0, "before"),
        "e1-reset-retention-after-move": lambda: _at(_ops(trace, "move", what=_moves_away(0)), 0, "after"),
        "e1-reset-retention-after-rmtree": lambda: _at(_ops(trace, "rmtree", after=away[0]), 0, "after"),
        # flush() seals epoch 2's partial chunk 1
        "e2-flush-seal-chunk": lambda: _at(_ops(trace, "put", what=_chunk(2, "y_true", 1)), 0, "after"),
        # close(): epoch 3 is smaller than a chunk, so it is created, sealed and marked at close
        "e3-close-before-publish": lambda: _at(_ops(trace, "move", what=_publishes(3)), 0, "before"),
        # (the attribute writes after its chunk: rows/batches, then the complete flag; kill in between)
        "e3-close-mark-complete": lambda: _at(_ops(trace, "put", what=_group_attrs(3), before=away[2]), -3, "before"),
        "e3-close-retention-before-rmtree": lambda: _at(_ops(trace, "rmtree", after=away[2]), 0, "before"),
        # main-thread points: part way through the oocmetrics lines of one public call
        "line-first-update-of-e1": lambda: _line(trace, "update e1 b0", 0.5),
        "line-update-spanning-chunks-80%": lambda: _line(trace, "update e0 b4", 0.8),
        "line-compute-e0-50%": lambda: _line(trace, "compute e0 b5", 0.5),
        "line-compute-e1-95%": lambda: _line(trace, "compute e1 b4", 0.95),
        "line-reset-e0-60%": lambda: _line(trace, "reset e0", 0.6),
        "line-close-50%": lambda: _line(trace, "close", 0.5),
    }
    return pickers[name]()


POINTS = [
    "init-first-write", "init-last-write",
    "e0-staging-half-built", "e0-before-publish", "e0-after-publish", "e0-chunk1-before-y_pred",
    "e0-seal-mid-resize", "e0-seal-chunk-y_true-written", "e0-seal-before-rows-attr", "e0-rewrite-sealed-chunk",
    "e0-reset-mark-complete-first", "e0-reset-mark-complete-last",
    "e1-after-publish", "e1-mid-epoch-chunk",
    "e1-reset-retention-before-move", "e1-reset-retention-after-move", "e1-reset-retention-after-rmtree",
    "e2-flush-seal-chunk",
    "e3-close-before-publish", "e3-close-mark-complete", "e3-close-retention-before-rmtree",
    "line-first-update-of-e1", "line-update-spanning-chunks-80%",
    "line-compute-e0-50%", "line-compute-e1-95%", "line-reset-e0-60%", "line-close-50%",
]


# --------------------------------------------------------------------------------------- checks
@dataclass
class Progress:
    """What the child reported before it died."""

    submitted: dict[int, int] = field(default_factory=dict)   # rows of the last batch whose update began
    durable: dict[int, int] = field(default_factory=dict)     # rows after the last flush/compute/reset returned
    finished: dict[int, int] = field(default_factory=dict)    # epochs whose reset()/close() returned
    finish_begun: set[int] = field(default_factory=set)
    killed_at: str = ""

    @classmethod
    def parse(cls, stdout: str) -> "Progress":
        pr = cls()
        for line in stdout.splitlines():
            parts = line.split()
            if not parts:
                continue
            if parts[0] == "begin":
                pr.submitted[int(parts[1])] = int(parts[3])
            elif parts[0] == "durable":
                pr.durable[int(parts[1])] = int(parts[2])
            elif parts[0] == "finished":
                pr.finished[int(parts[1])] = int(parts[2])
                pr.durable[int(parts[1])] = int(parts[2])
            elif parts[0] == "finish-begin":
                pr.finish_begun.add(int(parts[1]))
            elif parts[0] == "KILL":
                pr.killed_at = line[5:]
        return pr

    def may_be_deleted(self, e: int) -> bool:
        """keep_epochs=1: epoch e may go once epoch e+1 is being finished (reset/close)."""
        return (e + 1) in self.finish_begun


@dataclass
class AfterKill:
    name: str
    path: Path
    point: dict[str, Any] | None
    rc: int | None = None
    stdout: str = ""
    stderr: str = ""
    inspect: subprocess.CompletedProcess | None = None
    epochs: dict[int, dict[str, Any]] = field(default_factory=dict)   # epoch -> attrs (as read by zarr)
    read_error: str = ""
    computes: dict[int, tuple[subprocess.CompletedProcess, Any]] = field(default_factory=dict)
    wall: float = 0.0


def read_epochs(path: Path) -> dict[int, dict[str, Any]]:
    """Epoch attrs of the split as zarr lists them (raises if the store cannot be read)."""
    if not (path / SPLIT / "zarr.json").exists():
        return {}
    split = zarr.open_group(str(path), mode="r")[SPLIT]  # (listing the root would warn about lock files)
    out = {}
    for name in split.group_keys():
        if name.startswith("epoch="):
            out[int(name.split("=", 1)[1])] = dict(split[name].attrs)
    return dict(sorted(out.items()))


def examine(res: AfterKill, tmp: Path) -> AfterKill:
    """The parent's reads after the child died, run in a worker thread (subprocesses only)."""
    res.inspect = cli("inspect", str(res.path))
    try:
        res.epochs = read_epochs(res.path)
    except Exception as exc:  # reported by the test
        res.read_error = f"{type(exc).__name__}: {exc}"
        return res
    # `python -m oocmetrics compute` as its own process for the newest epoch with rows; the other
    # epochs go through the same entry point in-process (complete_computes), to keep the run short
    with_rows = [e for e, a in res.epochs.items() if a.get("rows", 0) > 0]
    for e in with_rows[-1:]:
        out = tmp / f"{res.name}-e{e}.json"
        proc = cli("compute", str(res.path), "--split", SPLIT, "--epoch", str(e), "--json", str(out))
        data = json.loads(out.read_text()) if proc.returncode == 0 and out.exists() else None
        res.computes[e] = (proc, data)
    return res


def complete_computes(path: Path, epochs: dict[int, Any], computes: dict[int, Any], tmp: Path) -> dict[int, Any]:
    """``python -m oocmetrics compute`` of every epoch not yet computed, run in-process (main())."""
    import contextlib
    import io

    for e in epochs:
        if e in computes:
            continue
        out = tmp / f"inproc-e{e}.json"
        args = ["compute", str(path), "--split", SPLIT, "--epoch", str(e), "--json", str(out)]
        so, se = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
            rc = cli_main(args)
        proc = subprocess.CompletedProcess(args, rc, so.getvalue(), se.getvalue())
        computes[e] = (proc, json.loads(out.read_text()) if rc == 0 and out.exists() else None)
    return computes


def run_point(name: str, point: dict[str, Any] | None, base: Path, *, scenario: str = "main",
              template: Path | None = None) -> AfterKill:
    t0 = time.perf_counter()
    path = base / name / "run"
    path.parent.mkdir(parents=True)
    res = AfterKill(name, path, point)
    if point is None:
        return res
    if template is not None:
        shutil.copytree(template, path)
    kill = {k: point[k] for k in ("kind", "n", "when", "call") if k in point}
    proc = run_child(path, {"kill": kill, "scenario": scenario})
    res.rc, res.stdout, res.stderr = proc.returncode, proc.stdout, proc.stderr
    if proc.returncode == -signal.SIGKILL:
        examine(res, base / name)
    res.wall = time.perf_counter() - t0
    return res


def _as_float(v):
    return np.nan if v is None else float(v)  # to_dict: NaN -> None, inf -> "inf"


def assert_metrics_equal(data: dict[str, Any], expected: oocmetrics.EpochMetrics, what: str) -> None:
    assert data["n_rows"] == expected.n_rows, what
    for k, v in expected.overall.items():
        np.testing.assert_allclose(_as_float(data["overall"][k]), v, rtol=1e-12, atol=1e-15, err_msg=f"{what}: {k}")
    for k, v in expected.per_output.items():
        got = np.array([_as_float(x) for x in data["per_output"][k]], dtype=float)
        np.testing.assert_allclose(got, v, rtol=1e-12, atol=1e-15, err_msg=f"{what}: per_output {k}")


def reference(t: np.ndarray, p: np.ndarray) -> oocmetrics.EpochMetrics:
    return oocmetrics.compute_arrays(t, p, chunk_rows=CHUNK_ROWS)


def check_store_after_kill(path: Path, pr: Progress, epochs: dict[int, dict[str, Any]], computes=None) -> None:
    """(3) durable rows bit-exact and bounded, (4) nothing phantom, plus the retention bound."""
    ctx = f"killed {pr.killed_at!r}; epochs on disk {({e: (a.get('rows'), a.get('complete')) for e, a in epochs.items()})}"
    # no directory that looks like an epoch but is not one (a half-deleted or half-created epoch)
    split_dir = path / SPLIT
    if split_dir.is_dir():
        for d in split_dir.iterdir():
            if d.name.startswith("epoch=") and d.is_dir():
                assert (d / "zarr.json").exists() and int(d.name.split("=", 1)[1]) in epochs, \
                    f"phantom {d.name}: a directory named like an epoch that zarr does not list as one; {ctx}"
    assert len(epochs) <= 2, f"keep_epochs=1 keeps at most the finished epoch and the current one; {ctx}"
    g = zarr.open_group(str(path), mode="r")[SPLIT] if epochs else None
    for e, attrs in epochs.items():
        assert e in pr.submitted, f"epoch {e} on disk but the child never began recording it; {ctx}"
        rows = attrs["rows"]
        assert attrs["epoch"] == e and list(attrs["trailing_shape"]) == [3, 4], ctx
        assert 0 <= rows <= pr.submitted[e], f"epoch {e}: {rows} durable rows but only {pr.submitted[e]} submitted; {ctx}"
        assert isinstance(attrs["complete"], bool), ctx
        yt, yp = g[f"epoch={e}"]["y_true"], g[f"epoch={e}"]["y_pred"]
        assert yt.shape[1:] == yp.shape[1:] == (3, 4), ctx
        assert yt.shape[0] >= rows and yp.shape[0] >= rows, f"epoch {e}: arrays shorter than rows={rows}; {ctx}"
        if attrs["complete"]:
            assert yt.shape[0] == yp.shape[0] == rows, f"complete epoch {e}: arrays {yt.shape[0]}/{yp.shape[0]} != rows {rows}; {ctx}"
            assert rows == sum(_data["sizes"](e)), f"complete epoch {e} with {rows} rows; {ctx}"
        T, P = epoch_data(e)
        np.testing.assert_array_equal(yt[:rows], T[:rows], err_msg=f"epoch {e} y_true; {ctx}")
        np.testing.assert_array_equal(yp[:rows], P[:rows], err_msg=f"epoch {e} y_pred; {ctx}")
        if computes is not None:
            proc, data = computes[e]
            if rows > 0:
                assert proc.returncode == 0, f"compute --epoch {e} exit {proc.returncode}: {proc.stderr[-2000:]}; {ctx}"
                assert_metrics_equal(data, reference(T[:rows], P[:rows]), f"CLI compute epoch {e} ({rows} rows)")
            else:
                assert proc.returncode == 2 and "error:" in proc.stderr, \
                    f"compute of an epoch with 0 durable rows: exit {proc.returncode}, stderr {proc.stderr[-500:]!r}"
    for e, r in pr.durable.items():
        if e in epochs:
            assert epochs[e]["rows"] >= r, f"epoch {e}: {epochs[e]['rows']} durable rows < {r} reported durable; {ctx}"
        else:
            assert pr.may_be_deleted(e), f"epoch {e} ({r} rows reported durable) is gone; {ctx}"
    for e, r in pr.finished.items():
        if e in epochs:
            assert epochs[e]["complete"] is True and epochs[e]["rows"] == r, f"finished epoch {e}; {ctx}"


def check_resume(path: Path, epochs: dict[int, dict[str, Any]]) -> None:
    """(5) the kill released the lock; resume continues (or replaces the incomplete last epoch)."""
    rng = np.random.default_rng(7)
    t = rng.standard_normal((5, 3, 4)).astype(np.float32)
    p = (t + 0.5).astype(np.float32)
    rec = oocmetrics.Recorder(path, SPLIT, mode="resume", chunk_rows=CHUNK_ROWS, keep_epochs=None)
    try:
        if epochs:
            last = max(epochs)
            want = last + 1 if epochs[last]["complete"] else last
            assert rec.epoch == want, f"resume over {({e: a['complete'] for e, a in epochs.items()})} chose epoch {rec.epoch}"
        rec.update(t, p)
        res = rec.compute()
        assert res.n_rows == 5
        ref = reference(t, p)
        for k, v in ref.overall.items():
            np.testing.assert_allclose(res[k], v, rtol=1e-12, atol=1e-15, err_msg=k)
        new_epoch = rec.epoch
    finally:
        rec.close()
    after = read_epochs(path)
    assert after[new_epoch]["rows"] == 5 and after[new_epoch]["complete"] is True
    g = zarr.open_group(str(path), mode="r")[SPLIT]
    np.testing.assert_array_equal(g[f"epoch={new_epoch}"]["y_true"][:], t)
    np.testing.assert_array_equal(g[f"epoch={new_epoch}"]["y_pred"][:], p)
    for e, attrs in epochs.items():  # the other epochs are untouched
        if e != new_epoch:
            assert after[e]["rows"] == attrs["rows"], f"epoch {e} changed by resume"
    assert cli_main(["inspect", str(path)]) == 0
    assert cli_main(["compute", str(path), "--split", SPLIT, "--epoch", str(new_epoch)]) == 0


# --------------------------------------------------------------------------------------- the runs
@pytest.fixture(scope="module")
def trace(tmp_path_factory) -> list[dict[str, Any]]:
    base = tmp_path_factory.mktemp("trace")
    proc = run_child(base / "run", {"trace": str(base / "trace.jsonl")})
    assert proc.returncode == 0, f"the workload fails without faults:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert "closed" in proc.stdout
    return _trace(base / "trace.jsonl")


@pytest.fixture(scope="module")
def kill_runs(trace, tmp_path_factory) -> dict[str, AfterKill]:
    """Every kill point, run two or three at a time (each child and CLI call is its own process)."""
    base = tmp_path_factory.mktemp("kills")
    points = {name: _pick(name, trace) for name in POINTS}
    workers = max(2, min(4, (os.cpu_count() or 2) + 1))
    with ThreadPoolExecutor(workers) as pool:
        futures = {name: pool.submit(run_point, name, points[name], base) for name in POINTS}
        return {name: f.result() for name, f in futures.items()}


def test_trace_has_the_operations_the_kill_points_need(trace):
    """The library publishes/deletes epochs by rename and rmtree, so the named kill points exist."""
    missing = [name for name in POINTS if _pick(name, trace) is None]
    summary = {k: sum(1 for ev in trace if ev["kind"] == k) for k in ("put", "move", "rmtree")}
    moves = [ev["what"] + " @ " + ev["call"] for ev in trace if ev["kind"] == "move"]
    assert not missing, f"no operation in the trace for kill points {missing}; ops {summary}; moves {moves}"
    assert len(POINTS) - len(missing) >= 20


@pytest.mark.parametrize("name", POINTS)
def test_sigkill_point(name, kill_runs, tmp_path):
    res = kill_runs[name]
    if res.point is None:
        pytest.fail(f"kill point {name!r} not found in the trace (see test_trace_has_the_operations_the_kill_points_need)")
    pr = Progress.parse(res.stdout)
    assert res.rc == -signal.SIGKILL, (
        f"the child was not killed at {res.point} (exit {res.rc}):\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    )
    # (1) inspect works
    assert res.inspect is not None and res.inspect.returncode == 0, (
        f"inspect after kill {pr.killed_at!r}: exit {res.inspect.returncode}\n{res.inspect.stdout}\n{res.inspect.stderr[-3000:]}"
    )
    assert not res.read_error, f"zarr cannot read the store after kill {pr.killed_at!r}: {res.read_error}"
    # (2)-(4) durable rows, CLI compute, nothing phantom
    complete_computes(res.path, res.epochs, res.computes, tmp_path)
    check_store_after_kill(res.path, pr, res.epochs, res.computes)
    # (5) resume
    check_resume(res.path, res.epochs)


# ------------------------------------------------------------ resume(epoch=1) replacing stored epochs
def build_template(path: Path) -> dict[int, str]:
    """Complete epochs 0, 1, 2 of the main data, as an earlier run left them; returns their run ids."""
    rec = oocmetrics.Recorder(path, SPLIT, chunk_rows=CHUNK_ROWS, keep_epochs=None, queue_chunks=3)
    for e in range(3):
        for b in range(len(EPOCHS[e])):
            rec.update(*_data["batch"](e, b))
        rec.reset() if e < 2 else rec.close()
    return {e: a["run_id"] for e, a in read_epochs(path).items()}


def _pick_replace(name: str, trace) -> dict[str, Any] | None:
    away = _ops(trace, "move", what=lambda w: _moves_away(1)(w) or _moves_away(2)(w))
    publish = _ops(trace, "move", what=_publishes(1))
    pickers: dict[str, Callable[[], Any]] = {
        "replace-after-first-deletion": lambda: _at(away, 0, "after"),
        "replace-after-second-deletion": lambda: _at(away, 1, "after"),
        "replace-before-publish": lambda: _at(publish, 0, "before"),
        "replace-after-publish": lambda: _at(publish, 0, "after"),
        "replace-close-mark-complete": lambda: _at(_ops(trace, "put", call="close", what=_group_attrs(1)), 0, "before"),
    }
    return pickers[name]()


REPLACE_POINTS = [
    "replace-after-first-deletion", "replace-after-second-deletion", "replace-before-publish",
    "replace-after-publish", "replace-close-mark-complete",
]


@pytest.fixture(scope="module")
def replace_runs(tmp_path_factory) -> tuple[dict[str, AfterKill], dict[int, str], list]:
    base = tmp_path_factory.mktemp("replace")
    template = base / "template"
    old_ids = build_template(template)
    shutil.copytree(template, base / "trace-run")
    proc = run_child(base / "trace-run", {"trace": str(base / "trace.jsonl"), "scenario": "replace"})
    assert proc.returncode == 0, f"the replace workload fails without faults:\n{proc.stderr[-5000:]}"
    trace = _trace(base / "trace.jsonl")
    points = {name: _pick_replace(name, trace) for name in REPLACE_POINTS}
    with ThreadPoolExecutor(max(2, min(4, (os.cpu_count() or 2) + 1))) as pool:
        futures = {name: pool.submit(run_point, name, points[name], base, scenario="replace", template=template)
                   for name in REPLACE_POINTS}
        return {name: f.result() for name, f in futures.items()}, old_ids, trace


@pytest.mark.parametrize("name", REPLACE_POINTS)
def test_sigkill_while_resume_replaces_epochs(name, replace_runs, tmp_path):
    """resume(epoch=1) over complete epochs 0-2: a kill leaves old epochs whole, never a mix of runs."""
    runs, old_ids, trace = replace_runs
    res = runs[name]
    if res.point is None:
        moves = [ev["what"] + " @ " + ev["call"] for ev in trace if ev["kind"] == "move"]
        pytest.fail(f"kill point {name!r} not found in the replace trace; moves: {moves}")
    pr = Progress.parse(res.stdout)
    assert res.rc == -signal.SIGKILL, f"not killed at {res.point} (exit {res.rc}):\n{res.stderr[-4000:]}"
    assert res.inspect is not None and res.inspect.returncode == 0, res.inspect.stderr[-3000:]
    assert not res.read_error, res.read_error
    epochs = res.epochs
    complete_computes(res.path, epochs, res.computes, tmp_path)
    ctx = f"killed {pr.killed_at!r}; epochs {({e: (a['rows'], a['complete'], a['run_id'] == old_ids.get(e)) for e, a in epochs.items()})} (rows, complete, from the old run)"
    g = zarr.open_group(str(res.path), mode="r")[SPLIT]
    new_t, new_p = epoch_data(101)                      # what the child records as the new epoch 1
    old = {e: epoch_data(e) for e in range(3)}
    kinds = {}
    for e, attrs in epochs.items():
        rows = attrs["rows"]
        yt, yp = g[f"epoch={e}"]["y_true"], g[f"epoch={e}"]["y_pred"]
        if attrs["run_id"] == old_ids.get(e):           # an old epoch: untouched
            kinds[e] = "old"
            assert attrs["complete"] is True and rows == old[e][0].shape[0] and yt.shape[0] == rows, ctx
            np.testing.assert_array_equal(yt[:], old[e][0], err_msg=ctx)
            np.testing.assert_array_equal(yp[:], old[e][1], err_msg=ctx)
        else:                                           # the new epoch 1
            kinds[e] = "new"
            assert e == 1, f"epoch {e} is from neither run; {ctx}"
            assert pr.durable.get(1, 0) <= rows <= pr.submitted.get(1, 0), ctx
            np.testing.assert_array_equal(yt[:rows], new_t[:rows], err_msg=ctx)
            np.testing.assert_array_equal(yp[:rows], new_p[:rows], err_msg=ctx)
        if rows > 0:
            proc, data = res.computes[e]
            assert proc.returncode == 0, f"compute --epoch {e}: {proc.stderr[-2000:]}; {ctx}"
            ref_t, ref_p = (old[e] if kinds[e] == "old" else (new_t, new_p))
            assert_metrics_equal(data, reference(ref_t[:rows], ref_p[:rows]), f"epoch {e}; {ctx}")
    assert kinds.get(0) == "old", f"epoch 0 (below the replaced range) must stay; {ctx}"
    if kinds.get(1) == "new":
        assert 2 not in epochs, f"the new epoch 1 next to the old run's epoch 2; {ctx}"
    if 2 in epochs:
        assert kinds.get(1) == "old", f"the old run's epoch 2 survives without its epoch 1 (a hole); {ctx}"
    if 1 in pr.durable:
        assert kinds.get(1) == "new", f"the child flushed the new epoch 1 but it is not on disk; {ctx}"
    check_resume(res.path, epochs)


def test_parent_kills_child_at_a_random_moment(tmp_path):
    """Sanity check without instrumentation: SIGKILL from outside, at a seeded random moment."""
    delay = random.Random(20240229).uniform(0.05, 0.6)
    path = tmp_path / "run"
    spec = {"data_src": DATA_SRC, "epochs": 12}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path), json.dumps(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO))
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:  # wait until it records, then let it run for `delay` more seconds
        lines.append(line)
        if line.startswith("updated"):
            break
    timer = threading.Timer(delay, proc.kill)
    timer.start()
    rest, err = proc.communicate(timeout=240)
    timer.cancel()
    stdout = "".join(lines) + rest
    assert proc.returncode == -signal.SIGKILL, f"child finished before the kill ({delay:.2f}s): {err[-3000:]}"
    pr = Progress.parse(stdout)
    pr.killed_at = f"parent SIGKILL after {delay:.3f}s"
    assert cli("inspect", str(path)).returncode == 0
    epochs = read_epochs(path)
    computes = {}
    for e in epochs:
        out = tmp_path / f"e{e}.json"
        c = cli("compute", str(path), "--split", SPLIT, "--epoch", str(e), "--json", str(out))
        computes[e] = (c, json.loads(out.read_text()) if c.returncode == 0 else None)
    check_store_after_kill(path, pr, epochs, computes)
    check_resume(path, epochs)


# ------------------------------------------------------------------------------- KeyboardInterrupt
INTERRUPT_CHILD = r'''
import json, os, signal, sys, threading, time
path = sys.argv[1]
import numpy as np
import zarr.storage._local as _zl
slow = {"on": True}
_real_put = _zl._put
def _put(*args, **kwargs):          # a slow disk: the writer thread falls behind, update() waits
    if slow["on"]:
        time.sleep(0.02)
    return _real_put(*args, **kwargs)
_zl._put = _put
import oocmetrics

where = {}
def on_sigint(signum, frame):       # the default handler's KeyboardInterrupt, noting where it landed
    names = []
    f = frame
    while f is not None:
        names.append((f.f_code.co_filename, f.f_code.co_name))
        f = f.f_back
    where["in_update"] = any(fn.endswith(os.path.join("oocmetrics", "recorder.py")) and name == "update" for fn, name in names)
    where["frame"] = f"{frame.f_code.co_filename}:{frame.f_code.co_name}:{frame.f_lineno}"
    raise KeyboardInterrupt

signal.signal(signal.SIGINT, on_sigint)
results = []
for trial, delay in enumerate([0.25, 0.5, 0.8]):
    rec = oocmetrics.Recorder(path, f"s{trial}", chunk_rows=4, queue_chunks=1)
    slow["on"] = True
    where.clear()
    done = 0
    timer = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    interrupted = False
    try:
        for b in range(10_000):
            rng = np.random.default_rng(100 * trial + b)
            t = rng.standard_normal((3, 3)).astype(np.float32)   # 3 rows: a batch spans at most 2 of the
            rec.update(t, t + np.float32(0.5) * rng.standard_normal((3, 3)).astype(np.float32))  # 2 buffers
            done += 1
    except KeyboardInterrupt:
        interrupted = True
    timer.cancel()
    slow["on"] = False
    state = {"trial": trial, "interrupted": interrupted, "done": done, "rows": rec.rows,
             "batches": rec.batches, **where}
    try:
        state["metrics"] = rec.compute().to_dict() if rec.rows else None
        rec.close()
        state["closed"] = True
    except BaseException as exc:
        state["error"] = f"{type(exc).__name__}: {exc}"
    results.append(state)
print("RESULT " + json.dumps(results))
'''


def test_keyboard_interrupt_during_update_keeps_counts_consistent(tmp_path):
    proc = subprocess.run([sys.executable, "-c", INTERRUPT_CHILD, str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=240, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-5000:]
    results = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert any(r.get("in_update") for r in results), f"no interrupt landed inside update(): {results}"
    for r in results:
        assert r["interrupted"] and "error" not in r, r
        if r.get("in_update"):
            # the batch whose update() was interrupted is not recorded, not even in part
            assert (r["batches"], r["rows"]) == (r["done"], 3 * r["done"]), r
        else:  # landed in the loop itself, next to update(): still whole batches only
            assert r["batches"] in (r["done"], r["done"] + 1) and r["rows"] == 3 * r["batches"], r
        n = r["batches"]
        if n == 0:
            continue
        ts, ps = [], []
        for b in range(n):
            rng = np.random.default_rng(100 * r["trial"] + b)
            t = rng.standard_normal((3, 3)).astype(np.float32)
            ts.append(t)
            ps.append(t + np.float32(0.5) * rng.standard_normal((3, 3)).astype(np.float32))
        T, P = np.concatenate(ts), np.concatenate(ps)
        assert_metrics_equal(r["metrics"], oocmetrics.compute_arrays(T, P, chunk_rows=4), f"trial {r['trial']}")
        g = zarr.open_group(str(tmp_path / "run"), mode="r")[f"s{r['trial']}"]
        ep = g["epoch=0"]
        assert ep.attrs["rows"] == 3 * n and ep.attrs["complete"] is True
        np.testing.assert_array_equal(ep["y_true"][:], T)
        np.testing.assert_array_equal(ep["y_pred"][:], P)


def test_exception_in_with_block_leaves_epoch_incomplete(tmp_path):
    rng = np.random.default_rng(3)
    t = rng.standard_normal((12, 3)).astype(np.float32)
    for exc_type, split in ((KeyboardInterrupt, "a"), (RuntimeError, "b")):
        with pytest.raises(exc_type):
            with oocmetrics.Recorder(tmp_path / "run", split, chunk_rows=5) as rec:
                rec.update(t, t + 1)
                rec.flush()
                raise exc_type("training stopped")
        attrs = read_epochs_split(tmp_path / "run", split)
        assert attrs[0]["complete"] is False and attrs[0]["rows"] == 12, attrs
        # the lock is released: the split can be resumed, which replaces the incomplete epoch
        with oocmetrics.Recorder(tmp_path / "run", split, mode="resume", chunk_rows=5) as rec:
            assert rec.epoch == 0
            rec.update(t[:3], t[:3])
        attrs = read_epochs_split(tmp_path / "run", split)
        assert attrs[0]["complete"] is True and attrs[0]["rows"] == 3, attrs


def read_epochs_split(path: Path, split: str) -> dict[int, dict[str, Any]]:
    g = zarr.open_group(str(path), mode="r")[split]
    return {int(n.split("=")[1]): dict(g[n].attrs) for n in g.group_keys() if n.startswith("epoch=")}


LOCK_CHILD = r'''
import sys, oocmetrics
try:
    rec = oocmetrics.Recorder(sys.argv[1], sys.argv[2], mode="resume")
except oocmetrics.StoreError as exc:
    print("LOCKED " + str(exc))
    sys.exit(3)
import numpy as np
rec.update(np.zeros((2, 3), np.float32), np.ones((2, 3), np.float32))
rec.close()
print("OK")
'''


def test_one_writer_per_split_across_processes(tmp_path):
    import socket

    path = tmp_path / "run"
    rec = oocmetrics.Recorder(path, "train")
    try:
        with pytest.raises(oocmetrics.StoreError, match=str(os.getpid())):
            oocmetrics.Recorder(path, "train", mode="resume")
        other = subprocess.run([sys.executable, "-c", LOCK_CHILD, str(path), "train"],
                               capture_output=True, text=True, timeout=240, cwd=str(REPO))
        assert other.returncode == 3, other.stdout + other.stderr[-3000:]
        assert str(os.getpid()) in other.stdout and socket.gethostname() in other.stdout, other.stdout
        side = subprocess.run([sys.executable, "-c", LOCK_CHILD, str(path), "val"],  # another split: fine
                              capture_output=True, text=True, timeout=240, cwd=str(REPO))
        assert side.returncode == 0 and "OK" in side.stdout, side.stdout + side.stderr[-3000:]
        rec.update(np.zeros((2, 3), np.float32), np.ones((2, 3), np.float32))
    finally:
        rec.close()
    after = subprocess.run([sys.executable, "-c", LOCK_CHILD, str(path), "train"],
                           capture_output=True, text=True, timeout=240, cwd=str(REPO))
    assert after.returncode == 0 and "OK" in after.stdout, after.stdout + after.stderr[-3000:]


BIG_BATCH_CHILD = r'''
import faulthandler, sys
faulthandler.dump_traceback_later(20, exit=True)   # a hang prints where it waits, then exits 1
import numpy as np, oocmetrics
rng = np.random.default_rng(5)
batches = [rng.standard_normal((n, 3)).astype(np.float32) for n in (3, 30, 1, 17)]
with oocmetrics.Recorder(sys.argv[1], "train", chunk_rows=4, queue_chunks=1) as rec:
    for t in batches:        # 30 rows = 8 chunks of 4, with a pool of queue_chunks + 1 = 2 buffers
        rec.update(t, t + 1)
    res = rec.compute()
print("OK", res.n_rows)
'''


def test_batch_spanning_more_chunks_than_the_buffer_pool_does_not_hang(tmp_path):
    """queue_chunks bounds buffers in flight; it must not bound the size of one batch."""
    proc = subprocess.run([sys.executable, "-c", BIG_BATCH_CHILD, str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=240, cwd=str(REPO))
    assert proc.returncode == 0 and "OK 51" in proc.stdout, f"exit {proc.returncode}:\n{proc.stderr[-4000:]}"
