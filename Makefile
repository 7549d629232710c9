# One entry point for people and CI. `make demo` and `make test` are all a newcomer needs.
PYTHON ?= python3
VENV ?= .venv
DEMO_SECONDS ?= 60
BIN := $(VENV)/bin

.PHONY: setup deps demo test test-train bench schemas lint clean

$(BIN)/edge-gateway: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: deps $(BIN)/edge-gateway

# System packages: the mosquitto broker (demo and tests). Needs root or sudo once.
deps:
	@bash deploy/dev-deps.sh

demo: setup
	$(BIN)/edge-gateway demo --seconds $(DEMO_SECONDS)

# Two worker processes: most tests wait on sockets, brokers and PLC sessions, so two at once halve the
# wall time on a 2-core machine (CI runs the suite twice, on Python 3.10 and 3.12).
test: setup
	$(BIN)/python -m pytest -n 2

# Training/export tests need PyTorch (CPU build): kept apart so the gateway never depends on it.
test-train: setup
	$(BIN)/pip install -q 'torch==2.13.0' 'onnx>=1.15'
	$(BIN)/python -m pytest -m torch

bench: setup
	$(BIN)/edge-gateway bench --tags 1000 --hz 10 --seconds 30

schemas: setup  ## regenerate docs/schemas/command.schema.json from the command models
	$(BIN)/python -m gateway.commands > docs/schemas/command.schema.json

lint: setup
	$(BIN)/pip install -q ruff
	$(BIN)/ruff check gateway edge_models tests benchmarks

clean:
	rm -rf $(VENV) .venv-* .pytest_cache build *.egg-info
