# Two entry points for a fresh clone: `make demo` and `make test`.
# Each creates or refreshes .venv idempotently (reinstalls only when pyproject.toml changed).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint venv clean skyrl

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,tinker]'
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

# SkyRL's open Tinker API server (JAX, CPU) in its own virtualenv, for tests/test_train_tinker.py and
# for trying `trainer.backend: tinker` locally: its pins (transformers<=5.8, peft 0.18.1, jax) are not
# ours. torch is pinned as in pyproject.toml, so peft does not pull the newest (CUDA) one. Not part of
# `make test` (the Tinker tests skip without it); started by tests/skyrl_server.py, not by `uv run`.
SKYRL_VENV := .venv-skyrl
SKYRL_STAMP := $(SKYRL_VENV)/.installed

$(SKYRL_STAMP):
	test -x $(SKYRL_VENV)/bin/python || $(PY) -m venv $(SKYRL_VENV)
	$(SKYRL_VENV)/bin/python -m pip install --quiet --disable-pip-version-check 'torch==2.13.0' \
		'skyrl[tinker,jax]==0.3.0' 'tinker==0.24.1'
	touch $(SKYRL_STAMP)

skyrl: $(SKYRL_STAMP)

clean:
	rm -rf $(VENV) $(SKYRL_VENV) runs mlruns .pytest_cache
