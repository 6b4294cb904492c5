# Two commands on a fresh machine: `make run` (demo video) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTOS := $(wildcard protos/avatar/v1/*.proto)
GEN_STAMP := avatar/v1/.generated

.PHONY: setup run test test-fast lint protos clean

setup: $(STAMP) $(GEN_STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

$(GEN_STAMP): $(PROTOS) tools/gen_protos.py $(STAMP)
	$(BIN)/python tools/gen_protos.py
	touch $@

protos: $(GEN_STAMP)

run: setup
	$(BIN)/avatar generate --image assets/astronaut.png --audio assets/speech.wav \
		--prompt "An astronaut talks to the camera" --out out/demo.mp4

test: setup
	$(BIN)/python -m pytest -q tests

test-fast: setup   # the inner loop: everything but the tests that start server processes
	$(BIN)/python -m pytest -q -m "not mesh" tests

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) avatar/v1 out
