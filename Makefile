# Two entry points a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Integration tests that start a stack of their own: they run in the unit tier's lane. The worker-container
# smoke builds the worker image where podman or Docker is present and says it skips where neither is.
OWN_STACK_TESTS := tests/integration/test_up.py tests/integration/test_demo.py \
	tests/integration/test_bench_smoke.py tests/integration/test_anomaly.py tests/integration/test_image_quality.py \
	tests/integration/test_rollout.py tests/integration/test_sinks.py tests/containers/test_worker_container.py
# The docs runner (its own `embedstream up`): after the own-stack tests, in their lane.
DOCS_TESTS := tests/integration/test_docs_run.py

.PHONY: install demo test lint up clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/embedstream demo

up: $(STAMP)
	$(BIN)/embedstream up

test: $(STAMP)
	$(BIN)/ruff check workers tests examples deploy/gpu
	$(BIN)/mypy
	@# Two lanes on the two cores. Lane 1: the CPU-bound unit tier, then the integration tests that
	@# start a stack of their own (up, demo, bench, anomaly, image quality, rollout, sinks), then the
	@# docs runner. Lane 2: the tests on the shared integration stack, then the fault suite. The stack
	@# tests mostly wait on real processes (group joins, restarts, timeouts); a third lane beside them
	@# made a clean clone of 531f002 take 25 min 34 s, against 22 min 32 s for 31817ff in two lanes.
	@# Lane 1's report is printed after lane 2's.
	@# One export cache for both lanes, so an encoder is exported once per run (export/cache.py).
	cache=$$(mktemp -d -t embedstream-export-cache-XXXX); export EMBEDSTREAM_EXPORT_CACHE=$$cache; \
	( $(BIN)/python -m pytest -v --durations=10 -p no:cacheprovider tests/unit; unit_rc=$$?; \
	  $(BIN)/python -m pytest -v --durations=10 -p no:cacheprovider $(OWN_STACK_TESTS) $(DOCS_TESTS); own_rc=$$?; \
	  test $$unit_rc -eq 0 && test $$own_rc -eq 0 ) > .lane1-tests.log 2>&1 & lane1=$$!; \
	$(BIN)/python -m pytest -v --durations=15 tests/integration tests/faults \
	  $(OWN_STACK_TESTS:%=--ignore=%) $(DOCS_TESTS:%=--ignore=%); rc=$$?; \
	wait $$lane1; lane1_rc=$$?; cat .lane1-tests.log; rm -rf $$cache; \
	echo "lane 1 (unit tier, own-stack integration tests, docs runner) exit $$lane1_rc, lane 2 (shared-stack integration and fault tiers) exit $$rc"; \
	test $$rc -eq 0 && test $$lane1_rc -eq 0

lint: $(STAMP)
	$(BIN)/ruff check workers tests examples deploy/gpu
	$(BIN)/mypy
	$(BIN)/ruff format --check workers tests examples deploy/gpu

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info workers/*.egg-info

# Containers (docs/deployment.md). `images` builds every image docker-compose.yml, docker-compose.cpu.yml
# and deploy/k8s name, with podman (installed with apt-get when missing), from a Debian base made with
# debootstrap: no image registry is needed. Here torch comes from PyPI (a CUDA build; ~6 GB exporter image),
# preferring the wheels this machine keeps on disk; where PyTorch's own index is reachable,
# `make images TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu WHEELS_DIR=` gives a CPU build.
TORCH_INDEX_URL ?= https://pypi.org/simple
WHEELS_DIR ?= $(wildcard /opt/pypi-more/files)

.PHONY: images compose-test

images:
	TORCH_INDEX_URL=$(TORCH_INDEX_URL) WHEELS_DIR=$(WHEELS_DIR) deploy/containers/build-images.sh

# The compose stack end to end (every message accounted for in the topics and both stores), then its
# containers killed, stopped and restarted mid-stream; and the worker-container smoke. Its time, measured:
# docs/deployment.md.
compose-test: $(STAMP) images
	$(BIN)/python -m pip install -q 'podman-compose>=1.6'
	EMBEDSTREAM_REQUIRE_CONTAINERS=1 $(BIN)/python -m pytest -v --durations=10 -p no:cacheprovider tests/containers
