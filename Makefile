# The two commands a newcomer needs: `make demo` and `make test`.
# Both set up everything they need on a fresh Debian 12 machine.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
APT_PACKAGES := libvirt-dev pkg-config
PYTEST_ARGS ?=

.PHONY: all setup services test unit lint typecheck schema sql-schema demo bench clean

all: test

# libvirt-python builds against libvirt-dev; install it only when missing.
$(STAMP): pyproject.toml
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
	$(PY) -m pip install -q -e '.[agent,test]'
	touch $(STAMP)

setup: $(STAMP)

# RabbitMQ and MariaDB must answer before the integration tests run.
services:
	@sh .ci/services

test: setup services
	$(PY) -m pytest $(PYTEST_ARGS)

unit: setup
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check messages agent mgmt demo tests bench sql
	$(MAKE) typecheck

# mypy cannot follow setuptools' package-dir mapping through the editable
# install, so it checks a tree of symlinks that mirrors the import names.
typecheck: setup
	@mkdir -p .typecheck/hostdev
	@for p in messages agent mgmt demo; do ln -sfn ../../$$p .typecheck/hostdev/$$p; done
	cd .typecheck && ../$(VENV)/bin/mypy --config-file ../pyproject.toml -p hostdev.messages -p hostdev.mgmt -p hostdev.agent -p hostdev.demo

# Regenerates the committed JSON Schemas after a message type changed.
schema: setup
	$(VENV)/bin/hostdev schema --write messages/schema

# Regenerates the DBAs' SQL from the Alembic migrations (offline mode).
sql-schema: setup
	$(VENV)/bin/hostdev-mgmt db schema > sql/schema-mysql.sql

demo: setup
	$(VENV)/bin/hostdev demo

bench: setup services
	$(PY) bench/bus.py
	$(PY) bench/alloc.py
	$(PY) bench/deploy.py

clean:
	rm -rf $(VENV) .typecheck .pytest_cache .mypy_cache .ruff_cache .hypothesis build *.egg-info
