# The two commands a newcomer needs: `make demo` and `make test`.
# Both set up everything they need on a fresh Debian 12 machine.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# The files the editable install links (see $(STAMP)); a new one needs a reinstall.
PACKAGE_FILES := $(VENV)/.package-files
# libvirt-dev, pkg-config: libvirt-python builds against them. prometheus:
# promtool checks and unit-tests etc/prometheus. amqp-tools: the plain-client
# example of docs/protocol.md runs in the tests.
APT_PACKAGES := libvirt-dev pkg-config prometheus amqp-tools
PYTEST_ARGS ?=

.PHONY: all setup services test unit lint typecheck layout schema sql-schema demo bench dist smoke clean FORCE

all: test

# The install is editable in setuptools' strict mode: build/__editable__.*
# holds a tree of links named for the import names (hostdev/messages/... ->
# messages/...), put on sys.path by a .pth file. Tools (mypy, pytest, the
# daemons) import the installed package like any other; an edit to a linked
# file shows at once, but a new or removed file needs a new link tree. So
# the stamp depends on the list of package files (rewritten only when the
# list changes, not when a file's content does) and `make` reinstalls then.
# The Debian packages are installed only when missing. libvirt-dev (which
# libvirt-python builds against) pulls in libvirt0, which ships the RELAX NG
# schemas management checks domain templates against
# (/usr/share/libvirt/schemas/domain.rng).
$(STAMP): pyproject.toml $(PACKAGE_FILES)
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[agent,test]' --config-settings editable_mode=strict
	touch $(STAMP)

$(PACKAGE_FILES): FORCE
	@mkdir -p $(VENV)
	@find messages agent mgmt demo -type f -not -path '*/__pycache__/*' | LC_ALL=C sort > $@.new
	@if cmp -s $@.new $@; then rm $@.new; else mv $@.new $@; fi

FORCE:

setup: $(STAMP)

# RabbitMQ and MariaDB must answer before the integration tests run.
services:
	@sh .ci/services

test: setup services
	$(PY) -m pytest $(PYTEST_ARGS)

unit: setup
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check messages agent mgmt demo tests bench sql tools
	$(MAKE) typecheck
	$(MAKE) layout

# mypy checks the installed package (the editable install's link tree) and tools/.
typecheck: setup
	$(VENV)/bin/mypy -p hostdev.messages -p hostdev.mgmt -p hostdev.agent -p hostdev.demo -p tools

# Module size, import cycles and the dependency rule between the daemons.
layout: setup
	$(PY) tools/check_layout.py

# Regenerates the committed JSON Schemas after a message type changed.
schema: setup
	$(VENV)/bin/hostdev schema --write messages/schema

# Regenerates the DBAs' SQL from the Alembic migrations (offline mode).
sql-schema: setup
	$(VENV)/bin/hostdev-mgmt db schema > sql/schema-mysql.sql

demo: setup
	$(VENV)/bin/hostdev demo

# The wheel and the sdist, as a release ships them.
DIST ?= dist
dist: setup
	rm -rf $(DIST)
	$(PY) -m build --outdir $(DIST) . >$(VENV)/build.log 2>&1 || { tail -n 30 $(VENV)/build.log; exit 1; }
	@ls $(DIST)

# The wheel installed in a fresh virtualenv: migrations shipped, schema on
# SQLite and MariaDB, `hostdev demo` runs; the sdist carries etc/, sql/, units.
smoke: dist services
	tools/smoke_install.sh $(DIST)

bench: setup services
	$(PY) bench/bus.py
	$(PY) bench/alloc.py
	$(PY) bench/deploy.py
	$(PY) bench/migration.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis build *.egg-info $(DIST)
