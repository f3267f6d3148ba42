"""Starts SkyRL's open Tinker API server (PyPI `skyrl==0.3.0`, `skyrl.tinker`) from its own
virtualenv (`make skyrl`: `.venv-skyrl`), for the Tinker backend's tests and for trying
`trainer.backend: tinker` on a laptop:

    JAX_PLATFORMS=cpu .venv-skyrl/bin/python tests/skyrl_server.py --base-model MODEL_DIR \\
        --backend jax --backend-config '{"max_lora_adapters": 8, "max_lora_rank": 8}' --host 127.0.0.1 --port 8000

Two departures from `python -m skyrl.tinker.api`, both for a plain virtualenv on Python 3.11:
- SkyRL's `skyrl/tinker/types.py` puts `typing.TypedDict` in a pydantic model, which pydantic
  refuses before Python 3.12; `typing.TypedDict` is pointed at `typing_extensions.TypedDict` first;
- the server starts its engine with `uv run ... -m skyrl.tinker.engine`; here the engine runs
  with this interpreter, through this file (`engine` as the first argument), so it gets the same fix.

`run_server` (for tests) builds nothing itself: give it a model directory (`random_qwen3`).
"""

from __future__ import annotations

import json
import os
import runpy
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VENV_PYTHON = ROOT / ".venv-skyrl" / "bin" / "python"
MISSING = "SkyRL's Tinker server is not installed: run `make skyrl` (its own virtualenv, .venv-skyrl)"


def _python311_typeddict() -> None:
    import typing

    import typing_extensions

    typing.TypedDict = typing_extensions.TypedDict  # type: ignore[misc]


def _main(argv: list[str]) -> None:
    _python311_typeddict()
    if argv[:1] == ["engine"]:
        sys.argv = ["skyrl.tinker.engine", *argv[1:]]
        runpy.run_module("skyrl.tinker.engine", run_name="__main__", alter_sys=True)
        return
    import argparse

    import uvicorn
    from skyrl.tinker import api
    from skyrl.tinker.config import EngineConfig, add_model, config_to_argv

    def engine_cmd(_parent: list[str], config: Any) -> list[str]:
        return [sys.executable, str(Path(__file__).resolve()), "engine", *config_to_argv(config)]

    api._build_uv_run_cmd_engine = engine_cmd
    parser = argparse.ArgumentParser(description="SkyRL's Tinker API server, without uv")
    add_model(parser, EngineConfig)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    api.app.state.engine_config = EngineConfig.model_validate(
        {k: v for k, v in vars(args).items() if k in EngineConfig.model_fields})
    uvicorn.run(api.app, host=args.host, port=args.port, log_level="warning")


# -- for tests ------------------------------------------------------------------------------


def random_qwen3(out: Path, tokenizer_dir: Path, *, seed: int = 0) -> Path:
    """A 2-layer Qwen3-shaped model with random weights and Qwen3's real tokenizer at `out`
    (hidden 64: small enough for the CPU, the architecture SkyRL's JAX backend implements)."""
    import shutil

    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    config = json.loads((ROOT / "tests" / "fixtures" / "qwen" / "qwen3_config.json").read_text())
    config |= {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "head_dim": 16, "max_window_layers": 2, "max_position_embeddings": 4096,
               "torch_dtype": "float32"}
    config.pop("transformers_version", None)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(**config))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not (out / name).is_file():
            shutil.copy(tokenizer_dir / name, out / name)
    return out


def tiny_qwen3(out: Path, tiny: Any = None) -> Path:
    """turnwise's built-in tiny model in Qwen3's shape at `out`: `TinyModelConfig`'s sizes (default:
    hidden 256, 4 layers, ~2.9M parameters), our 2,048-token BPE tokenizer and its Hermes chat
    template, random weights. SkyRL's JAX backend implements Qwen3, not the tiny model's Qwen2; the
    small vocabulary keeps its CPU fast (Qwen's own has 151,936 tokens)."""
    from turnwise.config import TinyModelConfig
    from turnwise.policy.tiny import build_tiny

    return build_tiny(tiny or TinyModelConfig(), out, "qwen3")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_server(model_dir: Path, work: Path, *, timeout: float = 300.0,
               backend: dict[str, Any] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """SkyRL's server on 127.0.0.1 serving `model_dir` (JAX on the CPU); (process, base URL) once
    healthy. `backend`: JAX backend settings over the defaults below (e.g. a larger `max_lora_rank`)."""
    import httpx

    port = free_port()
    log = (work / "skyrl.log").open("wb")
    # fixed batch shapes (sampling padded to 4 sequences, training 1 per micro-batch): fewer JIT compiles
    backend = {"max_lora_adapters": 8, "max_lora_rank": 8, "sample_max_num_sequences": 4, "train_micro_batch_size": 1,
               **(backend or {})}
    cmd = [str(VENV_PYTHON), str(Path(__file__).resolve()), "--base-model", str(model_dir), "--backend", "jax",
           "--backend-config", json.dumps(backend), "--checkpoints-base", str(work / "checkpoints"),
           "--database-url", f"sqlite:///{work / 'tinker.db'}", "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"SkyRL's server exited ({proc.returncode}); see {work / 'skyrl.log'}")
        try:
            if httpx.get(f"{url}/api/v1/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"SkyRL's server was not healthy within {timeout:.0f} s; see {work / 'skyrl.log'}")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server and its engine (their own process group)."""
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


if __name__ == "__main__":
    _main(sys.argv[1:])
