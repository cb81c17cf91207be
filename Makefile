# recloop: two commands on a fresh machine (Python 3.11+, Java 17+, Maven):
#   make demo   run the live loop against a local Kafka broker
#   make test   create the environment, install everything and run the whole suite
#
# The virtual environment lives outside the repository, keyed by the lock file's hash, so a
# fresh clone (as CI makes) reuses it and only a changed lock file triggers a reinstall.

PYTHON ?= python3
LOCK := requirements/lock.txt
CACHE ?= $(HOME)/.cache/recloop
VENV ?= $(CACHE)/venv-$(shell sha1sum $(LOCK) | cut -c1-12)
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test lint unit integration demo lock clean-venv

# The path already names the lock file's hash, so the stamp's existence is all that matters: a
# fresh clone's lock file is newer than the stamp, and must not trigger a reinstall (order-only).
# A half-built environment (no stamp) is removed first: `python -m venv` refuses a path that is a
# symlink or a leftover file, and pip would otherwise build on whatever a failed run left.
# --require-hashes: every package, pip and setuptools included, must match a SHA-256 in the lock.
$(STAMP): | $(LOCK)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --require-hashes -r $(LOCK)
	touch $(STAMP)

# The project itself is installed editable on every run: cheap, and it follows this checkout.
install: $(STAMP)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .

lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy

test: install lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

unit: install
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

integration: install
	$(BIN)/python -m pytest tests/integration $(PYTEST_ARGS)

demo: install
	$(BIN)/recloop demo

# A hashed lock: pip-compile resolves the project's dependencies afresh and records every file's
# SHA-256, setuptools included (--allow-unsafe), as --require-hashes needs.
lock:
	$(PYTHON) -m venv $(CACHE)/venv-lock && $(CACHE)/venv-lock/bin/pip install --quiet pip-tools
	$(CACHE)/venv-lock/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras \
	  --no-annotate --no-emit-find-links --extra dev -o $(LOCK) pyproject.toml

clean-venv:
	rm -rf $(VENV)
