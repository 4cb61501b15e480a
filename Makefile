# Herald: `make run` starts a node, `make test` runs every test. Both set up what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.synced
# uv, pinned with hashes (ops/uv-requirements.txt), in a venv of its own: it installs .venv from uv.lock.
TOOLS := .tools
UV := $(TOOLS)/bin/uv
# uv uses the machine's Python ($(PYTHON)), never one it downloads, and installs into .venv.
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)

.PHONY: run test check setup system-deps lint lock upgrade-check demo bench bench-fanout loadtest cluster cluster-down clean

$(UV): ops/uv-requirements.txt
	rm -rf $(TOOLS)
	$(PYTHON) -m venv $(TOOLS) || { ops/install-system-deps.sh && rm -rf $(TOOLS) && $(PYTHON) -m venv $(TOOLS); }
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r ops/uv-requirements.txt
	touch $(UV)

# Exactly the versions of uv.lock, what `make test` ran against (--locked: refuses a lock that pyproject.toml
# has moved away from). Nothing else stays in .venv.
$(STAMP): pyproject.toml uv.lock $(UV)
	$(UV) sync --locked --extra loadtest --python $(PYTHON)
	touch $(STAMP)

setup: $(STAMP)

system-deps:
	ops/install-system-deps.sh

## Start one node (embedded broker unless REDIS_URL is set) on HERALD_HOST:HERALD_PORT.
run: setup
	$(PY) -m api

## Run the whole suite: lint, types, then every test.
test: system-deps setup lint
	$(PY) -m pytest

## The fast loop: lint, types and the unit tests (in-process, no server started), in under a minute.
check: setup lint
	$(PY) -m pytest -q -m unit

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

## Refresh uv.lock on purpose: the newest versions pyproject.toml allows (PACKAGE=name: that one only), and uv's
## own pin from ops/uv.in. Then `make test`; when uvicorn moved, see docs/development.md.
PACKAGE ?=
lock: $(UV)
	$(UV) lock --python $(PYTHON) $(if $(PACKAGE),--upgrade-package $(PACKAGE),--upgrade)
	$(UV) pip compile --quiet --universal --generate-hashes --python-version 3.11 ops/uv.in -o ops/uv-requirements.txt
	@grep -A1 '^name = "uvicorn"' uv.lock | tail -1

## The newest versions the ranges allow (RESOLUTION=lowest-direct: the lowest), in a throwaway copy: what moved,
## then lint, types and the whole suite there. UPGRADE_CHECK_ARGS="--no-tests" for lint and types only.
RESOLUTION ?= highest
UPGRADE_CHECK_ARGS ?=
upgrade-check: system-deps $(UV)
	$(PYTHON) ops/upgrade_check.py --uv $(UV) --python $(PYTHON) --resolution $(RESOLUTION) $(UPGRADE_CHECK_ARGS)

# While a cluster of `make cluster AUTH=1` runs, the tools below mint their tokens from its secret
# (unless HERALD_JWT_SECRET is set already). A token sent to a node with access control off is ignored.
CLUSTER_SECRET := .run/cluster/jwt-secret
TOOL_AUTH = $(if $(and $(wildcard $(CLUSTER_SECRET)),$(if $(HERALD_JWT_SECRET),,yes)),HERALD_JWT_SECRET="$$(cat $(CLUSTER_SECRET))")

## Publish the demo streams (ticker and a token-by-token reply) to a running node.
## Access control on: --token in DEMO_ARGS, or a token minted from HERALD_JWT_SECRET.
DEMO_ARGS ?=
demo: setup
	$(TOOL_AUTH) $(PY) -m workers.demo $(DEMO_ARGS)

## Herald, nchan and sse-starlette side by side, each pinned to one core; writes docs/benchmarks.md.
bench: system-deps setup
	ops/bench/install.sh
	$(PY) -m workers.bench

## The quick fan-out measurement: 1,000 subscribers on one topic of one node.
bench-fanout: setup
	$(PY) -m workers.bench_fanout

## Load-test the cluster of `make cluster` (override with LOADTEST_ARGS="--subscribers 5000 ...").
LOADTEST_TARGET ?= http://127.0.0.1:$(FRONT_PORT)
LOADTEST_ARGS ?=
loadtest: setup
	@mkdir -p .run
	$(TOOL_AUTH) $(PY) -m workers.loadtest --target $(LOADTEST_TARGET) --subscribers 1000 --rate 100 --duration 20 \
		--json .run/loadtest.json --report .run/loadtest-report.html $(LOADTEST_ARGS)

## Start redis-server + NODES API nodes (default 3) + nginx on loopback; front at http://127.0.0.1:8080.
## SENTINEL=1: Redis as primary + replica + three sentinels (master name "herald"), for failover.
## AUTH=1: access control on, a random HERALD_JWT_SECRET for every node (kept in .run/cluster/jwt-secret,
## mode 0600); tokens from .venv/bin/python -m ops.cluster token [--publish SEL] [--subscribe SEL] [--admin].
## OBSERVE=1: Debian's Prometheus too (http://127.0.0.1:9090, or a free port when that one is taken: start
## and status print it), scraping every node's /metrics with the alerts of ops/prometheus-rules.yml; its data in
## .run/cluster/prometheus. With AUTH=1 it scrapes with an admin token (.run/cluster/prometheus-token, mode 0600).
## TLS=1: the front serves https:// with HTTP/2 (a page's EventSources share one connection), with a certificate
## made for the cluster by Debian's openssl (.run/cluster/tls/cert.pem: trust it, or curl --cacert it).
## REDIS=cluster: Redis is a Redis Cluster (3 primaries with a replica each, ports 6380-6385); PARTITIONS=3 spreads
## the topics over its shards (HERALD_REDIS_PARTITIONS), READ_REPLICAS=1 reads feeds and resumes from the replicas
## (docs/operations.md, "Redis deployments").
## Then: .venv/bin/python -m ops.cluster status|restart|stop-node node-1|token|... (see ops/cluster/).
## Ports (each checked before anything starts): FRONT_PORT (8080), NODE_PORT (8001: node i on it + i), REDIS_PORT
## (6380, and the ports after it for replicas), SENTINEL_PORT (26380).
NODES ?= 3
FRONT_PORT ?= 8080
NODE_PORT ?= 8001
REDIS_PORT ?= 6380
SENTINEL_PORT ?= 26380
SENTINEL ?=
AUTH ?=
OBSERVE ?=
TLS ?=
REDIS ?=
PARTITIONS ?=
READ_REPLICAS ?=
cluster: system-deps setup
	NODES=$(NODES) $(PY) -m ops.cluster start --nodes $(NODES) --front $(FRONT_PORT) --first-node-port $(NODE_PORT) \
		--redis-port $(REDIS_PORT) --first-sentinel-port $(SENTINEL_PORT) $(if $(SENTINEL),--sentinel) $(if $(AUTH),--auth) \
		$(if $(filter cluster,$(REDIS)),--redis-cluster) $(if $(PARTITIONS),--partitions $(PARTITIONS)) \
		$(if $(READ_REPLICAS),--read-replicas) \
		$(if $(OBSERVE),--observe) $(if $(TLS),--tls)

## Stop exactly what `make cluster` started, sentinels, replica and Prometheus included (pid files in .run/cluster).
cluster-down: setup
	$(PY) -m ops.cluster stop

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .mypy_cache .ruff_cache .hypothesis .run
