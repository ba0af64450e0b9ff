# Two commands: `make demo` and `make test`. Both bootstrap .venv idempotently (re-installing only
# when a pyproject.toml or constraints.txt changed) and install the real assets into $MHEE_HOME (default
# ~/.cache/mhee). pyproject.toml states version ranges; constraints.txt pins the versions tested here.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mhee-installed
PLUGIN_PROJECTS := $(wildcard plugins/*/pyproject.toml)

.PHONY: setup assets test test-fast test-slow lint docs images demo bench constraints clean

setup: $(STAMP) assets

# torch's CPU build first: pip then keeps it (it satisfies the SDK's range) instead of a CUDA build
$(STAMP): pyproject.toml constraints.txt $(PLUGIN_PROJECTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev,notebook,lora,docs,mlflow]' \
		$(foreach p,$(PLUGIN_PROJECTS),-e $(dir $(p)))
	touch $(STAMP)

assets: $(STAMP)
	$(VENV)/bin/mhee assets install

lint: $(STAMP)
	$(VENV)/bin/ruff check .

docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict -d build/site

# the README's and the docs' pictures: the Pareto plot of demo_out/ (tiny demo if absent), widget screenshots
images: setup
	$(PY) docs/make_images.py demo_out/mhee_runs.duckdb
	MHEE_SCREENSHOTS=docs/images $(PY) -m pytest tests/test_browser.py

test-fast: setup
	$(PY) -m pytest

test-slow: setup
	$(PY) -m pytest -m slow

test: lint docs test-fast test-slow

demo: setup
	$(VENV)/bin/mhee demo

bench: setup
	$(PY) bench/early_exit.py

# after changing a dependency range: install it (`make setup`), then re-pin what is installed
constraints:
	$(PY) tools/freeze_constraints.py

clean:
	rm -rf $(VENV) build demo_out
