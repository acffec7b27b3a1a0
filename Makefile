# Two entry points a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

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
	@# Two lanes on the two cores: the CPU-bound unit tier beside the real-stack tiers, which mostly
	@# wait (group joins, restarts, timeouts); the unit lane's report follows the other's.
	$(BIN)/python -m pytest -v --durations=15 -p no:cacheprovider tests/unit > .unit-tests.log 2>&1 & unit=$$!; \
	$(BIN)/python -m pytest -v --durations=15 tests/integration tests/faults; rc=$$?; \
	wait $$unit; unit_rc=$$?; cat .unit-tests.log; \
	echo "unit tier exit $$unit_rc, integration and fault tiers exit $$rc"; \
	test $$rc -eq 0 && test $$unit_rc -eq 0

lint: $(STAMP)
	$(BIN)/ruff check workers tests examples deploy/gpu
	$(BIN)/mypy
	$(BIN)/ruff format --check workers tests examples deploy/gpu

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info workers/*.egg-info
