# `make run` starts the platform with a demo; `make test` runs the test suite.
# Both create the virtual environment on first use (Python 3.11).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run dev test clean

$(BIN)/bucketml: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

run: $(BIN)/bucketml
	$(BIN)/bucketml dev --demo

dev: $(BIN)/bucketml
	$(BIN)/bucketml dev

test: $(BIN)/bucketml
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) bucket .bucketml
