"""The embedded default: policy, sampler engine, trajectory store and runtime server in one process.

The server still listens on 127.0.0.1 and agents still call it with the OpenAI SDK, so the
code path is the one a cluster uses. Training, evaluation and verification all start here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from turnwise.config import JobConfig
from turnwise.policy.chat import ChatFormat
from turnwise.policy.checkpoint import apply_lora, export_state_dict
from turnwise.policy.load import load_policy
from turnwise.policy.sampler import SamplerEngine
from turnwise.runtime.app import create_app
from turnwise.runtime.server import RuntimeServer
from turnwise.runtime.store import TrajectoryStore
from turnwise.train.dispatch import AgentFn, RolloutDispatcher, make_dispatcher

T = TypeVar("T")


class EmbeddedRuntime:
    """Owns the trainer's model, a sampler copy of it, and a runtime server on loopback."""

    def __init__(self, cfg: JobConfig, run_dir: Path, job_id: str, model_path: str | None = None) -> None:
        model_cfg = cfg.model if model_path is None else cfg.model.model_copy(update={"path": model_path})
        self.cfg = cfg
        self.model, self.tokenizer = load_policy(model_cfg)
        self.chat = ChatFormat(self.tokenizer, cfg.model.chat_format)
        self.engine = SamplerEngine(self.model, self.tokenizer, max_batch_size=cfg.sampler.max_batch_size,
                                    stop_token_ids=self.chat.stop_token_ids)
        self.store = TrajectoryStore(run_dir / "trajectories.db", job_id=job_id)
        self.model_name = job_id
        app = create_app(sampler=self.engine, chat=self.chat, store=self.store, model_name=self.model_name,
                         default_params=cfg.sampling_params(), api_keys=cfg.runtime.api_keys,
                         max_body_bytes=cfg.runtime.max_body_bytes,
                         opaque_tokens_on_loopback=cfg.runtime.opaque_tokens_on_loopback)
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
        return self.loop.run_until_complete(coro)

    def dispatcher(self, agent: AgentFn | None = None) -> RolloutDispatcher:
        """The dispatcher of `agent.kind`: `agent` runs in process (python; None loads
        `agent.function`); http pushes to `agent.url`; worker queues tasks for pull workers."""
        api_key = self.cfg.runtime.api_keys[0] if self.cfg.runtime.api_keys else None
        return make_dispatcher(self.cfg.agent, agent, base_url=self.server.base_url, model=self.model_name,
                               store=self.store, api_key=api_key)

    def apply_lora(self, base_dir: Path | None = None) -> None:
        """Wrap the trained model with LoRA adapters (`lora_rank`, `lora_alpha`); the sampler keeps
        the full weights. `base_dir` is the directory saved adapters name as their base."""
        self.model = apply_lora(self.model, self.cfg.lora_rank, self.cfg.lora_alpha)
        if base_dir is not None:
            self.model.peft_config["default"].base_model_name_or_path = str(base_dir)

    def push_weights(self) -> int:
        """Send the trainer's current weights to the sampler; returns the new policy version."""
        return self.engine.update_weights(export_state_dict(self.model))
