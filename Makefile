# Two commands: `make demo` and `make test`. Both bootstrap .venv idempotently (re-installing only
# when a pyproject.toml changed) and install the real assets into $MHEE_HOME (default ~/.cache/mhee).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mhee-installed
PLUGIN_PROJECTS := $(wildcard plugins/*/pyproject.toml)

.PHONY: setup assets test test-fast test-slow lint docs demo bench clean

setup: $(STAMP) assets

$(STAMP): pyproject.toml $(PLUGIN_PROJECTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,notebook,lora,docs,ray]' \
		$(foreach p,$(PLUGIN_PROJECTS),-e $(dir $(p)))
	touch $(STAMP)

assets: $(STAMP)
	$(VENV)/bin/mhee assets install

lint: $(STAMP)
	$(VENV)/bin/ruff check .

docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict -d build/site

test-fast: setup
	$(PY) -m pytest

test-slow: setup
	$(PY) -m pytest -m slow

test: lint docs test-fast test-slow

demo: setup
	$(VENV)/bin/mhee demo

bench: setup
	$(PY) bench/early_exit.py

clean:
	rm -rf $(VENV) build demo_out
