"""The runtime built from a config: policy, sampler engine, trajectory store and server.

`runtime_app` is the one place a runtime server app is built from a `JobConfig`; `turnwise
serve`, `turnwise verify`, evaluation and training all call it. `EmbeddedRuntime` is the
embedded default: everything in one process, the server on 127.0.0.1, agents still calling it
with the OpenAI SDK, so the code path is the one a cluster uses.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI

from turnwise.backends import Sampler
from turnwise.config import JobConfig
from turnwise.rollout.agent import AgentFn
from turnwise.rollout.dispatch import RolloutDispatcher, make_dispatcher
from turnwise.runtime.protocols import Chat
from turnwise.runtime.store import TrajectoryStore

T = TypeVar("T")


def runtime_app(cfg: JobConfig, *, sampler: Sampler, chat: Chat, store: TrajectoryStore,
                model_name: str) -> FastAPI:
    """The runtime server app for `cfg` (auth, body limit, default sampling) around `sampler`."""
    from turnwise.runtime.app import create_app

    return create_app(sampler=sampler, chat=chat, store=store, model_name=model_name,
                      default_params=cfg.sampling_params(), api_keys=cfg.runtime.api_keys,
                      max_body_bytes=cfg.runtime.max_body_bytes,
                      opaque_tokens_on_loopback=cfg.runtime.opaque_tokens_on_loopback,
                      seed=cfg.seed, sampling_overrides=cfg.runtime.sampling_overrides)


def load_engine(cfg: JobConfig, model_path: str | None = None, *,
                copy_model: bool = True) -> tuple[Any, Any, Any, Any]:
    """(model, tokenizer, chat format, sampler engine) for `cfg.model` (or `model_path`); the
    engine holds its own copy of the weights (`copy_model` False: the model itself) and is not started.
    `sampler.backend` vllm: the engine is vLLM servers (`policy/vllm_model.py`), started with it."""
    from turnwise.policy.chat import ChatFormat
    from turnwise.policy.load import load_policy
    from turnwise.policy.sampler import SamplerEngine

    if cfg.sampler.backend == "tinker":  # the service holds the weights: no model here
        return (None, *tinker_engine(cfg, model_path))
    model_cfg = cfg.model if model_path is None else cfg.model.model_copy(update={"path": model_path})
    model, tokenizer = load_policy(model_cfg)
    chat = ChatFormat(tokenizer, cfg.model.chat_format)
    if cfg.sampler.backend == "vllm":
        from turnwise.policy.vllm_model import vllm_engine

        lora = cfg.lora_sizes()
        return model, tokenizer, chat, vllm_engine(cfg.sampler.vllm, model_cfg, model, tokenizer,
                                                   chat.stop_token_ids, lora_rank=lora[0] if lora else None)
    engine = SamplerEngine(model, tokenizer, max_batch_size=cfg.sampler.max_batch_size,
                           stop_token_ids=chat.stop_token_ids, copy_model=copy_model)
    return model, tokenizer, chat, engine


def tinker_engine(cfg: JobConfig, model_path: str | None = None) -> tuple[Any, Any, Any]:
    """(tokenizer, chat format, `policy.tinker.TinkerSampler`): the tokenizer and chat template
    from `model.path`, the weights at the service (`model_path`: a Tinker checkpoint directory)."""
    from transformers import AutoTokenizer

    from turnwise.config import ConfigError
    from turnwise.policy.chat import ChatFormat
    from turnwise.policy.tinker import open_sampler

    if not cfg.tinker.base_model:
        raise ConfigError("sampler.backend tinker needs tinker.base_model (the service's name of the model)")
    if not cfg.model.path or not Path(cfg.model.path).expanduser().is_dir():
        raise ConfigError("sampler.backend tinker needs model.path: a local directory with the model's "
                          "tokenizer and chat template (its weights stay at the service)")
    tokenizer = AutoTokenizer.from_pretrained(Path(cfg.model.path).expanduser())
    chat = ChatFormat(tokenizer, cfg.model.chat_format)
    return tokenizer, chat, open_sampler(cfg, chat.stop_token_ids, model_path)


class EmbeddedRuntime:
    """The policy, a sampler copy of it, a trajectory store and a runtime server on loopback."""

    def __init__(self, cfg: JobConfig, run_dir: Path, job_id: str, model_path: str | None = None) -> None:
        from turnwise.runtime.server import RuntimeServer

        self.cfg = cfg
        cfg.sandbox.export()  # in-process agents' sandboxes follow sandbox.require_isolation
        # a LoRA run's sampler gets an adapter twin sharing this model's base (`train/learner.py`), no copy
        self.model, self.tokenizer, self.chat, self.engine = load_engine(cfg, model_path,
                                                                         copy_model=cfg.lora_sizes() is None)
        self.store = TrajectoryStore(run_dir / "trajectories.db", job_id=job_id)
        self.model_name = job_id
        app = runtime_app(cfg, sampler=self.engine, chat=self.chat, store=self.store, model_name=job_id)
        self.server = RuntimeServer(app, host=cfg.runtime.host, port=cfg.runtime.port)
        self.loop = asyncio.new_event_loop()

    def __enter__(self) -> EmbeddedRuntime:
        self.engine.start()
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()
        self.engine.close()
        self.loop.close()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the runtime's event loop; from a worker thread while the loop runs (async mode)."""
        if self.loop.is_running():
            return asyncio.run_coroutine_threadsafe(coro, self.loop).result()
        return run_cancelling(self.loop, coro)

    def dispatcher(self, agent: AgentFn | None = None) -> RolloutDispatcher:
        """The dispatcher of `agent.kind`: `agent` runs in process (python; None loads
        `agent.function`); http pushes to `agent.url`; worker queues tasks for pull workers."""
        api_key = self.cfg.runtime.own_key()
        return make_dispatcher(self.cfg.agent, agent, base_url=self.server.base_url, model=self.model_name,
                               store=self.store, api_key=api_key)


def run_cancelling(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> T:
    """`loop.run_until_complete`; on an interruption (Ctrl-C) the rollouts still running are
    cancelled and awaited, so that they close their clients before the loop closes."""
    import contextlib

    try:
        return loop.run_until_complete(coro)
    except BaseException:
        for _ in range(5):  # a cancelled rollout may itself be interrupted again
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            if not pending:
                break
            for task in pending:
                task.cancel()
            with contextlib.suppress(BaseException):
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        raise
