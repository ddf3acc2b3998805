# The README's two commands: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test test-all demo clean

setup: $(STAMP)

# Reinstall only when the dependency pins change; the package itself is installed editable.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# One pytest worker per core (pytest-xdist), each test file on one worker so its module fixtures are
# built once; `make test` deselects the tests marked slow (pyproject.toml), `make test-all` runs them too.
# Bytecode is cached even where the environment says not to (PYTHONDONTWRITEBYTECODE): the suite starts
# dozens of interpreters that would each compile poelm from source, and pytest would rewrite and compile
# every test module in every worker on every run (10% of make test's time on 2 cores).
WORKERS ?= auto
PYTEST  := env -u PYTHONDONTWRITEBYTECODE $(PY) -m pytest -n $(WORKERS) --dist loadfile

test: setup
	$(PYTEST)

test-all: setup
	$(PYTEST) -m ''

demo: setup
	$(VENV)/bin/poelm demo

clean:
	rm -rf runs .pytest_cache
