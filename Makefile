# `make run` starts the platform with a demo; `make test` runs the test suite; `make images`
# builds the container images and `make push REGISTRY=... TAG=...` publishes them.
# run and test create the virtual environment on first use (Python 3.11).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run dev test test-deps clean images image-deps tag push

$(BIN)/bucketml: requirements.txt requirements-test.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-test.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

run: $(BIN)/bucketml
	$(BIN)/bucketml dev --demo

dev: $(BIN)/bucketml
	$(BIN)/bucketml dev

test: $(BIN)/bucketml test-deps
	$(BIN)/python -m pytest -q

# Installs the tools named in $(1) that are missing (for $(2)) with apt-get, on a Debian
# machine run as root; says what could not be installed and never fails.
define apt_install_missing
	@missing=""; \
	for tool in $(1); do \
		command -v $$tool >/dev/null 2>&1 || [ -x /usr/sbin/$$tool ] || missing="$$missing $$tool"; \
	done; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing$$missing for $(2) (apt-get)"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -qq --no-install-recommends $$missing >/dev/null 2>&1 \
			|| { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends $$missing >/dev/null 2>&1; } \
			|| echo "could not install$$missing: $(2) will be skipped"; \
	fi; true
endef

# The report test renders report.html in headless Chromium, and the crash tests hold the train
# process with strace (each skips when its tool is missing).
test-deps: image-deps
	$(call apt_install_missing,chromium strace,the browser and crash tests)

# The container images, built with podman from infra/images/Dockerfile and tagged
# localhost/bucketml-<function>:latest (the names the overlays retag; docs/deploy.md). An image
# whose inputs did not change since it was built is kept as it is. The base python:3.11-slim is
# pulled, or made from Debian's packages with debootstrap where no registry is reachable.
images: image-deps
	sh infra/images/build.sh

# podman, runc (its OCI runtime here) and debootstrap (the base image without a registry), for
# `make images` and the container tests.
image-deps:
	$(call apt_install_missing,podman runc debootstrap,the container images and their tests)

# Tag the built images for a registry, and push them:
#   make push REGISTRY=europe-docker.pkg.dev/PROJECT/REPOSITORY TAG=0.1.0
# gives REGISTRY/bucketml-<function>:TAG, what `bucketml deploy --registry REGISTRY --tag TAG`
# and the prod overlay name (the images are built or brought up to date first). `make tag` only tags (e.g. REGISTRY=dev.local TAG=dev for kind).
# PUSH_FLAGS: more `podman push` options, e.g. --tls-verify=false for a plain-HTTP registry.
IMAGE_FUNCTIONS := predict deadletter monitor batch preprocess train console
TAG ?= latest
PUSH_FLAGS ?=

tag: images
	@[ -n "$(REGISTRY)" ] || { echo "set REGISTRY, e.g. make $@ REGISTRY=registry.example.com/bucketml TAG=0.1.0"; exit 2; }
	@for f in $(IMAGE_FUNCTIONS); do \
		podman tag localhost/bucketml-$$f:latest $(REGISTRY)/bucketml-$$f:$(TAG) || exit 1; \
		echo "tagged $(REGISTRY)/bucketml-$$f:$(TAG)"; \
	done

push: tag
	@for f in $(IMAGE_FUNCTIONS); do \
		podman push $(PUSH_FLAGS) $(REGISTRY)/bucketml-$$f:$(TAG) || exit 1; \
	done

clean:
	rm -rf $(VENV) bucket .bucketml
