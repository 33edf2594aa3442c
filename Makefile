# Two commands on a fresh machine:  `make demo`  (set up, train and evaluate on the demo data)  and  `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup system demo test test-fast bench clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

system:
	scripts/system-deps.sh

setup: system $(STAMP)

demo: setup
	$(BIN)/sanshi-ml train
	$(BIN)/sanshi-ml evaluate
	$(BIN)/sanshi-ml predict "A3区青青家园小区的电梯坏了一个多月，物业一直不修" "楼上邻居每天深夜拖动家具，噪音太大，沟通无果"

test: setup
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf models/demo reports mlflow.db mlruns .pytest_cache
