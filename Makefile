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
	$(BIN)/python -m pytest -v --durations=15 -n 2 --dist loadgroup

lint: $(STAMP)
	$(BIN)/ruff check workers tests examples deploy/gpu
	$(BIN)/mypy
	$(BIN)/ruff format --check workers tests examples deploy/gpu

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info workers/*.egg-info
