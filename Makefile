# Two commands set everything up on a fresh machine (Python 3.11 and redis-server needed;
# .ci/run installs redis-server and haproxy with apt when they are missing):
#   make demo   the whole system on embedded defaults
#   make test   lint, format check and the whole test suite
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo serve test lint bench docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

demo: $(STAMP)
	$(VENV)/bin/combiner demo

serve: $(STAMP)
	$(VENV)/bin/combiner serve

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(VENV)/bin/pytest -q -ra

# The benchmark suite with same-run baselines (bench/README.md); ARGS=--quick for a short run
bench: $(STAMP)
	$(VENV)/bin/python -m bench $(ARGS)

# The generated docs: the CLI reference and the HTTP side's OpenAPI description
docs: $(STAMP)
	$(VENV)/bin/python -m combiner.cli_docs docs/configuration.md
	$(VENV)/bin/combiner openapi > docs/openapi.json

clean:
	rm -rf $(VENV) .cache .combiner .pytest_cache .ruff_cache
