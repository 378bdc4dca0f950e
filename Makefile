# yap: the two commands of the README, and the checks CI runs.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8000
# Where torch comes from: pip's own index by default. Public PyPI has only the CUDA build for
# Linux x86_64 (several GB, no use to the CPU engine); TORCH_INDEX=https://download.pytorch.org/whl/cpu
# takes the CPU build (about 200 MB) where that host is reachable.
TORCH_INDEX ?=

.PHONY: demo test install lint typecheck check clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch 2.13.0 first, pinned: a plain "torch" requirement would take the newest CUDA build.
# The awq extra (llmcompressor, for the AWQ job tests) fits this torch and transformers (docs/awq.md).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "torch==2.13.0"
	$(BIN)/pip install -q -e ".[cpu,dev,awq]"
	touch $@

install: $(VENV)/.installed

## Run yapd with tiny random-weight demo models on the CPU (ws://127.0.0.1:$(PORT)/ws?api_key=yap_token).
demo: install
	$(BIN)/yapd --demo --host 127.0.0.1 --port $(PORT)

lint: install
	$(BIN)/ruff check yapd yapctl tests

typecheck: install
	$(BIN)/mypy

# Test files run on up to 4 workers (one file's tests on one worker: they share its
# daemons); most of the suite's time is spent waiting on real yapd processes.
JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)

## Lint, type-check and run the whole CPU test suite.
test: install lint typecheck
	$(BIN)/python -m pytest -q -n $(JOBS) --dist loadfile

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
