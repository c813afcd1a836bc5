# Set-up, main job and tests on a fresh machine: `make demo`, `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# A second environment with transformer-lens 3.9 and SAELens (which pins transformer-lens <4): both are supported.
VENV_TL39 ?= .venv-tl39
PY_TL39 := $(VENV_TL39)/bin/python
# The CPU build of torch first: an open range would otherwise pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: setup setup-tl39 browser demo test test-tl39 bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,explore]"
	touch $@

# Debian's Chromium for the explorer's browser test (the test skips, saying why, where it cannot be installed).
browser:
	@command -v chromium >/dev/null || apt-get install -y -q chromium >/dev/null 2>&1 \
		|| (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1) \
		|| echo "chromium could not be installed: the explorer's browser test will be skipped"

setup-tl39: $(VENV_TL39)/.installed

$(VENV_TL39)/.installed: pyproject.toml
	python3 -m venv $(VENV_TL39)
	$(PY_TL39) -m pip install -q --upgrade pip
	$(PY_TL39) -m pip install -q "$(TORCH)"
	$(PY_TL39) -m pip install -q -e ".[dev,sae]" "transformer-lens==3.9.*"
	touch $@

demo: setup
	$(VENV)/bin/tl-vlm demo

# Both supported transformer-lens lines: 4.x (tools.analysis) and 3.9 with SAELens.
test: setup setup-tl39 browser
	$(PY) -m pytest -q -rs tests
	$(PY_TL39) -m pytest -q -rs tests

test-tl39: setup-tl39
	$(PY_TL39) -m pytest -q -rs tests

bench: setup
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/load_memory.py
