# Two commands on a fresh machine: `make demo` and `make test`. Everything else
# (the virtualenv, dependencies, generated code) is set up on the way.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The shared contract checker lives next to the checkout; a clone elsewhere
# (e.g. /tmp/x) falls back to the workspace copy, and says so if neither exists.
CHECK_CONTRACT ?= $(firstword $(wildcard ../shared/tools/check-contract /work/shared/tools/check-contract))
PYTEST_ARGS ?=
# `make test` runs the suite in two worker processes (pytest-xdist), a test file per worker at a
# time (module fixtures are set up once): most tests wait on servers and subprocesses, so two
# workers on two cores take 5.6 -> 3.2 minutes. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2

.PHONY: help venv generate check-generated docs lint test test-all demo run cluster bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@# An editable install compiles nothing, and where PYTHONDONTWRITEBYTECODE is set (as on this
	@# machine) every start of every program compiled the project's modules again (importing the
	@# marketplace: 1.0 -> 0.9 s). Compiled once here, as installing a wheel does (a stale .pyc is ignored).
	$(PY) -m compileall -q marketplace_server aiida_stub eddie_sink eddie_common eddie_client eddie_cli generated
	@touch $(STAMP)

venv: $(STAMP) ## create .venv and install the pinned dependencies

generate: $(STAMP) ## regenerate generated/ from protos/
	bash scripts/generate.sh

check-generated: $(STAMP) ## fail if generated/ differs from what protos/ produce
	bash scripts/check-generated.sh

docs: $(STAMP) ## refresh the README's configuration tables from the flags
	$(PY) scripts/flags_table.py --write

lint: $(STAMP) ## ruff, mypy, buf lint, and the contract check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/buf lint
	@if [ -n "$(CHECK_CONTRACT)" ]; then $(PY) $(CHECK_CONTRACT); \
	else echo "check-contract: ../shared/tools/check-contract not found, contract check skipped"; fi

test: $(STAMP) ## run the test suite (without the slow tests), in TEST_WORKERS processes
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-all: $(STAMP) ## run every test, slow ones included (in one process: the fleets of 1,000 want a core)
	$(PY) -m pytest -m '' $(PYTEST_ARGS)

demo: $(STAMP) ## run all six workflows end to end on SQLite
	$(PY) -m eddie_client.demo $(DEMO_ARGS)

run: $(STAMP) ## run a marketplace on 127.0.0.1:50051 with data in ./var/marketplace
	$(VENV)/bin/marketplace-server --listen 127.0.0.1:50051 --data-dir var/marketplace

cluster: $(STAMP) ## three replicas (local PostgreSQL, fresh schema, and NATS), a fleet and a sink
	$(PY) scripts/cluster.py

bench: $(STAMP) ## benchmarks: search fan-out vs the bare grpc.aio floor, approval latency
	$(PY) -m bench.run $(BENCH_ARGS)

clean: ## remove the virtualenv and local state
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
