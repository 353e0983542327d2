# Two entry points for a fresh clone:
#   make run    install everything into .venv, then run the main job on the digits
#               default: the escape experiment, its layerwise analysis and the report
#   make test   install everything into .venv (and, as root, the single-node Slurm the
#               cluster test starts), then lint, type-check and run the whole test suite
#
# torch: the CPU build 2.13.0 is installed first so that pip never pulls a CUDA build.
# On a GPU machine pass your own, e.g.
#   make run TORCH="torch --index-url https://download.pytorch.org/whl/cu128"

VENV ?= .venv
ifndef OUT
OUT := runs/digits-$(shell date +%Y%m%d-%H%M%S)
endif
PYTHON ?= python3
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.escapelab-installed

.PHONY: run test install

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet $(TORCH)
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/escapelab run --out $(OUT) $(ARGS)
	$(VENV)/bin/escapelab analyze $(OUT)

test: $(STAMP)
	./scripts/install-system-test-deps.sh
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy src
	$(VENV)/bin/python -m pytest
