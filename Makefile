# quay-bootstrap: `make demo` runs the main job locally; `make test` sets up everything and runs the suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BED ?= $(CURDIR)/.testbed
PYTEST_ARGS ?=
# The oldest Python we support (RHEL 9, Amazon Linux 2023); its unit run is skipped, saying so,
# where no 3.9 interpreter exists.
PY39 ?= $(firstword $(wildcard /usr/bin/python3.9 /usr/local/bin/python3.9 $(HOME)/.pyenv/versions/3.9*/bin/python3.9))

.PHONY: help deps venv lint unit py39 test soak bench dist deb image install demo demo-clean clean

help:
	@echo "make demo   - run 'quay-bootstrap run --once' against a local object store, registry and Docker"
	@echo "make test   - install what is needed, start the test bed, lint, run every test, stop the bed"
	@echo "make lint | unit | soak | bench | dist | deb | image | install | clean"

deps:
	@bash tests/testbed/install-debian.sh

$(VENV)/.installed: setup.cfg setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: deps $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check --isolated --select E,F,W,B,I --line-length 110 --target-version py39 \
	  --config "lint.isort.known-first-party=['quay_bootstrap','tests']" \
	  quay_bootstrap tests bench
	$(VENV)/bin/vermin --no-tips --violations --target=3.9- quay_bootstrap

unit: venv
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

# The roll's model-based test with a long, random budget (make test runs a fixed 60 examples).
SOAK_EXAMPLES ?= 3000
soak: venv
	QB_MODEL_EXAMPLES=$(SOAK_EXAMPLES) QB_MODEL_STEPS=80 $(PY) -m pytest -q -p no:cacheprovider \
	  tests/unit/test_roll_model.py $(PYTEST_ARGS)

py39: venv
	@if [ -z "$(PY39)" ]; then echo "py39: no python3.9 here; vermin still checks 3.9 syntax"; exit 0; fi; \
	  if [ ! -f .venv39/.installed ] || [ setup.cfg -nt .venv39/.installed ]; then \
	    $(PY39) -m venv .venv39 && .venv39/bin/pip install -q -e . pytest hypothesis && touch .venv39/.installed; fi; \
	  .venv39/bin/python -m pytest -q -p no:cacheprovider tests/unit

# The bed is stopped even when the tests fail; the suite's status is what make returns.
test: lint py39
	$(PY) -m tests.testbed stop $(BED) >/dev/null 2>&1 || true
	$(PY) -m tests.testbed start $(BED)
	set +e; TESTBED_DIR=$(BED) $(PY) -m pytest -q tests $(PYTEST_ARGS); rc=$$?; \
	  $(PY) -m tests.testbed stop $(BED); exit $$rc

bench: venv
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) -m tests.testbed stop $(BED) >/dev/null 2>&1 || true
	$(PY) -m tests.testbed start $(BED)
	set +e; TESTBED_DIR=$(BED) $(PY) bench/run.py; rc=$$?; $(PY) -m tests.testbed stop $(BED); exit $$rc

# The main job on this machine: a node's boot against a local object store (see tests/testbed/demo.py).
demo: venv
	$(PY) -m tests.testbed.demo run $(CURDIR)/.demo

demo-clean:
	$(PY) -m tests.testbed.demo clean $(CURDIR)/.demo

dist: venv
	$(PY) -m pip install -q build
	$(PY) -m build --outdir dist .

# For Debian/Ubuntu image builders: dist/quay-bootstrap_VERSION_ARCH.deb (systemd/build-deb.sh):
# the venv under /opt/quay-bootstrap on the release's own python3, /usr/bin/quay-bootstrap, the
# units, and a postinst that enables the service and starts nothing. Build it on the release it
# is for; the boot test installs it and checks lintian finds no error.
deb: deps
	PYTHON=/usr/bin/python3 systemd/build-deb.sh dist

# The agent as a container image (Containerfile), quay-bootstrap:VERSION on DOCKER_HOST's engine,
# built on the local Debian base the boot test uses (debootstrap, cached): no registry needed.
image: venv
	$(PY) -m tests.e2e.machine

# For image builders (Packer, a chroot): a self-contained virtualenv under /opt/quay-bootstrap,
# /usr/local/bin/quay-bootstrap, the systemd unit (enabled), and config.example.yaml beside
# /etc/quay-bootstrap/config.yaml (never over it). See systemd/install.sh for the variables.
install:
	sh systemd/install.sh

clean:
	-$(PY) -m tests.testbed stop $(BED) >/dev/null 2>&1
	rm -rf $(VENV) .venv39 dist build *.egg-info .pytest_cache .ruff_cache
