# egress-warden — developer entry points. `make run` and `make test` work from a fresh clone.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Find a Python >= 3.12: PATH first, then pyenv's installed versions.
define FIND_PYTHON
for c in python3 python3.14 python3.13 python3.12 python; do \
  p=$$(command -v $$c 2>/dev/null) || continue; \
  "$$p" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null && { echo "$$p"; exit 0; }; \
done; \
root=$$(pyenv root 2>/dev/null || echo "$$HOME/.pyenv"); \
for p in $$(ls -d "$$root"/versions/3.* 2>/dev/null | sort -t. -k2,2nr -k3,3nr); do \
  [ -x "$$p/bin/python3" ] || continue; \
  "$$p/bin/python3" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null && { echo "$$p/bin/python3"; exit 0; }; \
done; exit 1
endef

.PHONY: install run test lint typecheck unit e2e bench bench-quick clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@py=$$( $(FIND_PYTHON) ) || { echo "error: egress-warden needs Python >= 3.12; none found on PATH or under pyenv ($$(pyenv root 2>/dev/null || echo $$HOME/.pyenv)/versions). Install one (e.g. 'pyenv install 3.12') and retry." >&2; exit 1; }; \
	echo "using $$py ($$($$py --version))"; \
	[ -x $(BIN)/python ] || "$$py" -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@# undici: the tests run Node's fetch through its EnvHttpProxyAgent (as Node agents do).
	@if command -v npm >/dev/null 2>&1; then \
	  npm install --silent --no-audit --no-fund --prefix $(VENV)/node undici@7 >/dev/null \
	    || { echo "error: npm install undici failed" >&2; exit 1; }; \
	else echo "note: npm not found: the Node client tests need it (apt-get install nodejs)" >&2; fi
	@touch $(STAMP)

run: install
	$(BIN)/egress-warden run --policy policies/default.yaml --listen 127.0.0.1:8080 --control 127.0.0.1:8081 --state-dir .state

lint: install
	$(BIN)/ruff check proxy addons tests benchmarks
	$(BIN)/ruff format --check proxy addons tests benchmarks
	$(BIN)/lint-imports

typecheck: install
	$(BIN)/mypy proxy addons

unit: install
	$(BIN)/pytest tests/unit

test: lint typecheck
	$(BIN)/pytest

bench: install
	$(BIN)/python benchmarks/run.py
	$(BIN)/python benchmarks/bench_secrets.py

bench-quick: install
	$(BIN)/python benchmarks/run.py --quick

clean:
	rm -rf $(VENV) .state .pytest_cache .mypy_cache .ruff_cache
