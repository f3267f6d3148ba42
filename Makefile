# Two entry points for a fresh clone: `make demo` and `make test`.
# Each creates or refreshes .venv idempotently (reinstalls only when pyproject.toml changed).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	# verl's core_algos is the independent reference the slow algorithm tests compare with; its own
	# dependencies (ray, an older transformers) are not needed for that, hence --no-deps.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps verl==0.9.1
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/turnwise demo

test: $(STAMP)
	$(BIN)/ruff check src tests examples bench
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests examples bench

clean:
	rm -rf $(VENV) runs mlruns .pytest_cache
