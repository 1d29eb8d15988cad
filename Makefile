# The README's two commands: `make train` (set up, then the default run) and `make test`.
PY ?= python3
NPROC ?= 4

.PHONY: setup train test test-fast lint bench clean

setup:
	$(PY) -m pip install -q -c constraints.txt -e ".[test,dev]"

train: setup
	$(PY) -m meshtrain train --config configs/default.toml --nproc $(NPROC) --run-dir runs/default
	$(PY) -m meshtrain generate --run-dir runs/default --prompt "def " --max-new-tokens 120

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q tests -m pure

lint:
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks
	$(PY) -m mypy

bench: setup
	$(PY) benchmarks/run_all.py

clean:
	rm -rf runs .pytest_cache
