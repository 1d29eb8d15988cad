# The README's two commands: `make train` (set up, then the default run) and `make test`.
PY ?= python3
NPROC ?= 4

.PHONY: setup train test test-fast bench clean

setup:
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"

train: setup
	$(PY) -m meshtrain train --config configs/default.toml --nproc $(NPROC) --run-dir runs/default
	$(PY) -m meshtrain generate --run-dir runs/default --prompt "def " --max-new-tokens 120

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q tests -m "not dist and not e2e"

bench: setup
	$(PY) benchmarks/bench_dp.py

clean:
	rm -rf runs .pytest_cache
