# Two commands for a fresh machine:  `make run` (set up .venv, train on the default config)
# and `make test` (set up .venv, run the test suite). Every install step uses constraints.txt.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: run test install bench bench-quick clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip 2>&1 | { grep -v 'is ignored: it is neither' || true; }
	$(PIP) install -q -c constraints.txt -e '.[trainer,test,bench,distributed]' 2>&1 | { grep -v 'is ignored: it is neither' || true; }
	$(PY) -c "import oocmetrics, trainer, torch, zarr, dask, distributed, numba, filelock, psutil, tqdm, sklearn, scipy, hypothesis, torchmetrics, matplotlib, xarray, lightning, transformers, accelerate"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) -m trainer.run $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# full runs, as in benchmarks/RESULTS.md (~7 min and ~5 min); outputs under bench_out/
bench: $(STAMP)
	$(PY) benchmarks/run_memory.py --out bench_out/memory
	$(PY) benchmarks/run_speed.py --out bench_out/speed

bench-quick: $(STAMP)
	$(PY) benchmarks/run_memory.py --quick

clean:
	rm -rf $(VENV) runs .pytest_cache
