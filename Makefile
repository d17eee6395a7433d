# Two commands for a fresh clone: `make demo` and `make test`. Both set up .venv first: the demo
# installs the library (`pip install -e .`), the tests add their extras (`pip install -e ".[test]"`:
# pytest, pytest-xdist, nbclient and the PyTorch, transformers and PEFT references the tests compare against).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: setup setup-test demo test clean

setup: $(STAMP)

setup-test: $(TEST_STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): setup.py | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(TEST_STAMP)

# The demo starts with the CPU opt-in environment (`python -m prompt_tuning_jax.xla_cpu`).
demo: $(STAMP)
	env $$($(BIN)/python -m prompt_tuning_jax.xla_cpu) $(BIN)/python -m prompt_tuning_jax.demo

# The suite runs on TEST_WORKERS processes (pytest-xdist), each test file on one of them, so a
# file's module-scoped fixtures are built once.
TEST_WORKERS ?= 2

test: $(TEST_STAMP)
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile tests

clean:
	rm -rf $(VENV) build *.egg-info
