# One-command set-up: `make run` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup tools run test lint typecheck pytest loadtest bench soak clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

run: setup
	$(BIN)/threadline serve

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

# promtool (Debian package `prometheus`) checks the alert rules; installed when missing and we can.
# Without it the alert-rule tests skip with a visible reason.
tools:
	@command -v promtool >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 || \
	     { apt-get update -qq >/dev/null 2>&1 && \
	       DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1; }) || \
	    echo "tools: could not install promtool; its tests will be skipped"; \
	  else echo "tools: promtool not found; its tests will be skipped"; fi; }

pytest: setup tools
	$(BIN)/pytest --cov --cov-report=term --cov-fail-under=85

test: lint typecheck pytest

loadtest: setup
	$(BIN)/python loadtests/run_locust.py

# Benchmarks print figures measured side by side in one run (see docs/architecture.md, docs/assistant.md).
bench: setup
	$(BIN)/python loadtests/bench_fanout.py --subscribers 100 1000 --idle 1000
	$(BIN)/python loadtests/bench_stream.py --replies 10 --watchers 4

# Long runs that are not part of `make test`; docs/reliability.md quotes their last figures.
soak: setup
	$(BIN)/python loadtests/ws_fuzz.py --rounds 30

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage
