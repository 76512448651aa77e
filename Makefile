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

# The report test renders report.html in headless Chromium, and the crash tests hold the train
# process with strace (each skips when its tool is missing). On a Debian machine run as root,
# install what is missing with apt-get; never fails.
test-deps:
	@missing=""; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v strace >/dev/null 2>&1 || missing="$$missing strace"; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing$$missing for the browser and crash tests (apt-get)"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -qq --no-install-recommends $$missing >/dev/null 2>&1 \
			|| { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends $$missing >/dev/null 2>&1; } \
			|| echo "could not install$$missing: the tests that need them will be skipped"; \
	fi; true

clean:
	rm -rf $(VENV) bucket .bucketml
