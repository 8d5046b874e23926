# make train [CONF=fashion_mnist] [ARGS="seed=3 optim.lr=0.02"]   train a config (creates the venv first)
# make test                                            run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONF ?= fashion_mnist
ARGS ?=
PYTEST_ARGS ?=

.PHONY: venv train test docker-env slurm-env data bench record-machine clean

# The venv is rebuilt when the dependency pins or the package metadata change.
$(VENV)/.installed: requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

venv: $(VENV)/.installed

train: venv
	$(BIN)/harness train $(CONF) $(ARGS)

test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# System parts (need root): Docker engine + local registry + base image, single-node Slurm,
# and Debian's Fashion-MNIST package.
docker-env:
	bash docker/env.sh

slurm-env:
	bash slurm/env.sh

data:
	bash scripts/debian-data.sh

# Benchmarks (long: about 20 minutes on 2 cores; needs make data and make docker-env):
# writes benchmarks/results.json and the table in benchmarks/README.md.
bench: venv
	$(BIN)/python benchmarks/run_all.py

# Add this machine's class to the corpus of recorded classes (tests/golden/machines/): the
# golden config in every CPU mode it can run, and its per-op table. Needs make data.
record-machine: venv data
	$(BIN)/harness machine record

clean:
	rm -rf $(VENV) .pytest_cache
