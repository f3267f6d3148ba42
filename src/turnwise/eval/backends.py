"""Where the evaluated model runs: in process (a local HF dir, through the runtime server) or
behind any OpenAI-compatible endpoint.

Embedded: the same `EmbeddedRuntime` and dispatchers as training (every `agent.kind`), so every
turn is recorded token-exactly in `trajectories.db`. Endpoint: no token ids; the client handed to the agent
records each `/chat/completions` exchange (request messages, reply, finish reason, usage)
through httpx response hooks. Streaming calls are not recorded. Both run one task's trials at a
time (`run_task`) so that the caller can save each task as soon as it is done.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai

from turnwise.adapter.context import RolloutContext
from turnwise.config import JobConfig
from turnwise.eval.records import TurnView, turns_from_trajectory
from turnwise.rollout.agent import NO_MODEL_CALL, AgentFn, run_agent
from turnwise.rollout.runtime import EmbeddedRuntime, run_cancelling
from turnwise.types import FailureKind, TrajectoryStatus, as_messages

T = TypeVar("T")


@dataclass(frozen=True)
class Trial:
    """One agent run before grading."""

    trajectory_id: str
    turns: list[TurnView]
    error: str | None
    failure: FailureKind | None
    agent_reward: float | None
    agent_metrics: Mapping[str, float]
    seconds: float


class EmbeddedBackend:
    """A local HF model dir (or the built-in tiny model) served by the embedded runtime."""

    def __init__(self, cfg: JobConfig, out_dir: Path, agent: AgentFn | None, model_path: str | None) -> None:
        self.runtime = EmbeddedRuntime(cfg, out_dir, job_id=out_dir.name, model_path=model_path)
        self.agent = agent

    def __enter__(self) -> EmbeddedBackend:
        self.runtime.__enter__()
        self.dispatcher = self.runtime.dispatcher(self.agent)
        return self

    def __exit__(self, *exc: object) -> None:
        self.runtime.__exit__(*exc)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return run_cancelling(self.runtime.loop, coro)

    async def run_task(self, task: Any, group_size: int, params: Mapping[str, Any]) -> list[Trial]:
        [group] = await self.dispatcher.run_groups([task], group_size, params)
        out = []
        for r in group.rollouts_G:
            traj = r.trajectory
            rewarded = traj.status == TrajectoryStatus.REWARDED
            out.append(Trial(trajectory_id=traj.id, turns=turns_from_trajectory(traj), error=traj.error,
                             failure=traj.failure, agent_reward=traj.reward if rewarded else None,
                             agent_metrics=dict(r.metrics),
                             seconds=r.seconds))
        return out


@dataclass
class _Recorder:
    """Collects the chat-completion exchanges of one rollout."""

    turns: list[TurnView] = field(default_factory=list)

    async def on_response(self, response: httpx.Response) -> None:
        if not response.request.url.path.endswith("/chat/completions") or response.status_code != 200:
            return
        await response.aread()
        try:
            body = json.loads(response.request.content)
            data = response.json()
            choice = data["choices"][0]
        except (ValueError, KeyError, IndexError, TypeError):
            return  # a streaming or unusual reply: not recorded
        usage = data.get("usage") or {}
        [message] = as_messages([{**choice["message"], "role": "assistant"}])
        self.turns.append(TurnView(
            request_messages=as_messages(body.get("messages") or []), message=message,
            finish_reason=str(choice.get("finish_reason") or "stop"),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            prompt_tokens=int(usage.get("prompt_tokens") or 0)))


class EndpointBackend:
    """Any OpenAI-compatible endpoint; the API key comes from $OPENAI_API_KEY when set."""

    def __init__(self, cfg: JobConfig, url: str, agent: AgentFn, model: str | None = None) -> None:
        url = url.rstrip("/")
        self.base_url = url[: -len("/v1")] if url.endswith("/v1") else url  # RolloutContext adds /v1
        self.api_key = os.environ.get("OPENAI_API_KEY") or "turnwise"
        self.model = model
        self.agent = agent
        self.timeout = cfg.agent.rollout_timeout
        self.loop = asyncio.new_event_loop()

    def __enter__(self) -> EndpointBackend:
        if self.model is None:
            self.model = self._first_model()
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.close()

    def _first_model(self) -> str:
        """The first model the endpoint lists; 'default' when it lists none."""
        try:
            r = httpx.get(self.base_url + "/v1/models", headers={"Authorization": f"Bearer {self.api_key}"},
                          timeout=10)
            return str(r.json()["data"][0]["id"])
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
            return "default"

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return run_cancelling(self.loop, coro)

    async def run_task(self, task: Any, group_size: int, params: Mapping[str, Any]) -> list[Trial]:
        return list(await asyncio.gather(*(self._one(task, params) for _ in range(group_size))))

    async def _one(self, task: Any, params: Mapping[str, Any]) -> Trial:
        ctx = RolloutContext(trajectory_id=f"traj-{uuid.uuid4().hex}", base_url=self.base_url,
                             model=str(self.model), inference_params=dict(params), api_key=self.api_key)
        recorder = _Recorder()
        client = ctx.async_openai(http_client=openai.DefaultAsyncHttpxClient(
            event_hooks={"response": [recorder.on_response]}))
        start = time.perf_counter()
        run = await run_agent(self.agent, task, ctx, self.timeout, client=client)
        failure, error = run.failure, run.error
        if run.result is not None and not recorder.turns:
            failure, error = FailureKind.NO_MODEL_CALL, NO_MODEL_CALL
        return Trial(trajectory_id=ctx.trajectory_id, turns=recorder.turns, error=error, failure=failure,
                     agent_reward=sum(run.result.rewards) if run.result and failure is None else None,
                     agent_metrics=dict(run.result.metrics) if run.result else {},
                     seconds=time.perf_counter() - start)

