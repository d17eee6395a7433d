# Two commands for a fresh clone: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

# The demo starts with the CPU opt-in environment (`python -m prompt_tuning_jax.xla_cpu`).
demo: $(STAMP)
	env $$($(BIN)/python -m prompt_tuning_jax.xla_cpu) $(BIN)/python -m prompt_tuning_jax.demo

test: $(STAMP)
	$(BIN)/pytest tests

clean:
	rm -rf $(VENV) build *.egg-info
