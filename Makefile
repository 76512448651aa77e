# `make run` starts the platform with a demo; `make test` runs the test suite.
# Both create the virtual environment on first use (Python 3.11).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run dev test test-deps clean

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

test: $(BIN)/bucketml test-deps
	$(BIN)/python -m pytest -q

# The report test renders report.html in headless Chromium (it skips when there is none).
# On a Debian machine run as root, install Debian's chromium if it is missing; never fails.
test-deps:
	@if ! command -v chromium >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium for the browser test (apt-get)"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
			|| { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; } \
			|| echo "could not install chromium: the browser test will be skipped"; \
	fi; true

clean:
	rm -rf $(VENV) bucket .bucketml
