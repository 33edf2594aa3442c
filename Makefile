# Two commands on a fresh machine:  `make demo`  (set up, train and evaluate on the demo data)  and  `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup system demo test test-fast lint lock clean

# Every machine installs the same versions: those pinned in requirements.lock (regenerate it with `make lock`).
$(STAMP): pyproject.toml requirements.lock
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

system:
	scripts/system-deps.sh

setup: system $(STAMP)

demo: setup
	$(BIN)/sanshi-ml train
	$(BIN)/sanshi-ml evaluate
	$(BIN)/sanshi-ml predict "A3区青青家园小区的电梯坏了一个多月，物业一直不修" "楼上邻居每天深夜拖动家具，噪音太大，沟通无果"

test: setup
	$(BIN)/python -m pytest --durations=25

# The inner loop: unit tests without the real-data, system and slow ones (see docs/architecture.md).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" tests/code

# Style, and the import rule between the layers (docs/architecture.md); .ci/run runs it before the tests.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

# Re-resolve requirements.lock from pyproject.toml: `make lock` keeps every pin that still fits,
# `make lock UPGRADE=--upgrade` (or UPGRADE="--upgrade-package scikit-learn") moves them on.
lock: $(STAMP)
	$(BIN)/uv pip compile pyproject.toml --extra dev --universal --python-version 3.11 -o requirements.lock $(UPGRADE)

clean:
	rm -rf models/demo reports mlflow.db mlruns .pytest_cache
