# One-command set-up: `make run` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup tools browser run test lint typecheck webcheck pytest loadtest bench soak clean

# The web client (web/): node modules from the committed lock file, built by Vite into
# server/webdist, which the Python package ships and `threadline serve` serves at /.
WEB_STAMP := web/node_modules/.installed
WEB_DIST := server/webdist/index.html
WEB_SOURCES := $(shell find web/src web/public -type f 2>/dev/null) web/index.html web/vite.config.ts web/tsconfig.json

setup: $(STAMP) $(WEB_DIST)

$(WEB_STAMP): web/package.json web/package-lock.json
	cd web && npm ci --no-audit --no-fund
	touch $(WEB_STAMP)

$(WEB_DIST): $(WEB_STAMP) $(WEB_SOURCES)
	cd web && npm run build

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

# promtool (Debian package `prometheus`) checks the alert rules and dashboard queries. Installed
# when missing, as root; `make test` cannot pass without it: fail loudly. (pytest run by hand
# without it skips those tests with a reason; under `make test` THREADLINE_REQUIRE_TOOLS=1 turns
# that skip into a failure.)
tools:
	@command -v promtool >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }; \
	  fi; \
	  command -v promtool >/dev/null 2>&1 || { \
	    echo "tools: promtool (Debian's prometheus) is required by the alert-rule tests and could not be installed (apt-get install prometheus, as root)" >&2; \
	    exit 1; }; }

# Debian's chromium drives the browser tests (tests/web); Playwright cannot download its own
# browser here. Installed when missing, as root; without it the suite cannot pass: fail loudly.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; }; \
	  fi; \
	  command -v chromium >/dev/null 2>&1 || { \
	    echo "browser: Debian's chromium is required by tests/web and could not be installed (apt-get install chromium, as root)" >&2; \
	    exit 1; }; }

# The client: API types match the server's OpenAPI document, tsc, eslint (React hooks rules), vitest.
webcheck: setup
	cd web && PYTHON=$(abspath $(BIN)/python) npm run check:api
	cd web && npm run typecheck
	cd web && npm run lint
	cd web && npm test

pytest: setup tools browser
	THREADLINE_REQUIRE_TOOLS=1 $(BIN)/pytest --cov --cov-report=term --cov-fail-under=85

test: lint typecheck webcheck pytest

loadtest: setup
	$(BIN)/python loadtests/run_locust.py

# Benchmarks print figures measured side by side in one run (docs/performance.md has them all).
bench: setup
	$(BIN)/python loadtests/bench_writes.py --clients 50 --procs 3 --seconds 8 --rate 500 --before b5641cb --without-notify
	$(BIN)/python loadtests/bench_bridge.py --tasks 20 --queries 300
	$(BIN)/python loadtests/bench_fanout.py --subscribers 100 1000 10000 --deliveries-per-s 30000 --procs 3 --idle 1000 10000
	$(BIN)/python loadtests/bench_stream.py --replies 10 --watchers 4
	$(BIN)/python loadtests/bench_tx.py --tasks 20 --transactions 200 --statements 2
	$(BIN)/python loadtests/bench_locks.py --tasks 8 --senders 4 --seconds 4 --rounds 2
	$(BIN)/python loadtests/bench_locks.py --tasks 8 --senders 4 --seconds 4 --rounds 2 --busy-ms 2
	$(BIN)/python loadtests/bench_stream.py --ttft --budget-compare --before 72b84ba
	$(BIN)/python loadtests/bench_cluster.py --subscribers 50 --rate 20 --writers 50

# Long runs that are not part of `make test`; docs/reliability.md quotes their last figures.
soak: setup tools
	$(BIN)/python loadtests/ws_fuzz.py --rounds 30
	THREADLINE_CANCEL_FUZZ_OPS=10000 THREADLINE_SCHEMATHESIS_REQUESTS=10000 \
	  $(BIN)/pytest -q -p no:cacheprovider tests/ops/test_cancellation_fuzz.py \
	  tests/server/test_openapi.py::test_schemathesis_against_the_real_server
	$(BIN)/python loadtests/soak.py --minutes 10

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage web/node_modules server/webdist
