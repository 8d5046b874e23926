# make train [CONF=fashion_mnist] [ARGS="seed=3 optim.lr=0.02"]   train a config (creates the venv first)
# make test                                            run the test suite (the default tier)
# make test-fast                                       the unit tier: the in-process tests in
#                                                      tests/unit, under a minute, no system parts
# make lint                                            ruff and the layers contract (make test runs it)
# make test-long                                       the long tier: minutes-long builds and
#                                                      the end-to-end variations
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONF ?= fashion_mnist
ARGS ?=
PYTEST_ARGS ?=

.PHONY: venv train lint test test-fast test-long test-all system docker-env slurm-env data bench bench-quick record-machine clean

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

# Tests in two tiers (tests/conftest.py): `make test` runs the default one, under 20 minutes
# on 2 cores, against the real system parts; `make test-long` the rest (marker `long`).
test: venv system lint
	$(BIN)/python -m pytest -m "not long" $(PYTEST_ARGS)

# The unit tier (tests/unit): tests that run in process, with no data sets, subprocesses or
# system parts; under a minute on 2 cores, so no `system`. make test runs them too.
test-fast: venv
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

# ruff (pycodestyle, pyflakes, bugbear, blind excepts) and import-linter (the package's
# layers), both configured in pyproject.toml: part of make test, and of pre-commit
# (.pre-commit-config.yaml) for who uses it.
lint: venv
	$(BIN)/ruff check .
	$(BIN)/lint-imports

test-long: venv system lint
	$(BIN)/python -m pytest -m long $(PYTEST_ARGS)

test-all: venv system lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The system parts the tests use, installed and started where this runs as root (each script
# is idempotent: seconds where the part runs already). Not as root, the tests that need a
# missing part skip with the reason (in CI they fail).
system:
	@if [ "$$(id -u)" = 0 ]; then \
		$(MAKE) --no-print-directory data docker-env slurm-env; \
	else \
		echo "make: not root, so the system parts are not installed here: run make data docker-env slurm-env as root, or the tests that need them skip"; \
	fi

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

# Every benchmark script in its smoke-test mode (a few minutes): they still run and write
# their figures. Nothing is recorded.
bench-quick: venv
	$(BIN)/python benchmarks/run_all.py --quick

# Add this machine's class to the corpus of recorded classes (tests/golden/machines/): the
# golden config in every CPU mode it can run, and its per-op table. Needs make data.
record-machine: venv data
	$(BIN)/harness machine record

clean:
	rm -rf $(VENV) .pytest_cache
