"""Where the evaluated model runs: in process (a local HF dir, through the runtime server) or
behind any OpenAI-compatible endpoint (through a proxy runtime).

Both run the job's agent of any `agent.kind` through the same dispatchers as training.
Embedded: every turn is recorded token-exactly in `trajectories.db`. Endpoint: the agents talk
to a local runtime whose chat route forwards to the endpoint (`rollout.proxy`); each exchange is
recorded as a `TurnView` (conversation, finish reason, usage; no token ids). Both run one task's
trials at a time (`run_task`) so that the caller can save each task as soon as it is done.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

from turnwise.config import JobConfig
from turnwise.eval.records import turns_from_trajectory
from turnwise.rollout.agent import AgentFn
from turnwise.rollout.dispatch import RolloutDispatcher, make_dispatcher
from turnwise.rollout.runtime import EmbeddedRuntime, run_cancelling
from turnwise.types import FailureKind, RolloutResult, Task, TrajectoryStatus, TurnView

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


async def run_trials(dispatcher: RolloutDispatcher, task: Task, group_size: int, params: Mapping[str, Any],
                     turns_of: Callable[[RolloutResult], list[TurnView]]) -> list[Trial]:
    [group] = await dispatcher.run_groups([task], group_size, params)
    out = []
    for r in group.rollouts_G:
        traj = r.trajectory
        rewarded = traj.status == TrajectoryStatus.REWARDED
        out.append(Trial(trajectory_id=traj.id, turns=turns_of(r), error=traj.error,
                         failure=None if rewarded else traj.failure or FailureKind.AGENT_ERROR,
                         agent_reward=traj.reward if rewarded else None, agent_metrics=dict(r.metrics),
                         seconds=r.seconds))
    return out


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

    async def run_task(self, task: Task, group_size: int, params: Mapping[str, Any]) -> list[Trial]:
        return await run_trials(self.dispatcher, task, group_size, params,
                                lambda r: turns_from_trajectory(r.trajectory))


class EndpointBackend:
    """Any OpenAI-compatible endpoint; the API key comes from $OPENAI_API_KEY when set."""

    def __init__(self, cfg: JobConfig, url: str, out_dir: Path, agent: AgentFn | None,
                 model: str | None = None) -> None:
        url = url.rstrip("/")
        self.url = url[: -len("/v1")] if url.endswith("/v1") else url
        self.api_key = os.environ.get("OPENAI_API_KEY") or "turnwise"
        self.cfg = cfg
        self.out_dir = out_dir
        self.model = model
        self.agent = agent
        self.loop = asyncio.new_event_loop()

    def __enter__(self) -> EndpointBackend:
        from turnwise.rollout.proxy import Recorder, proxy_app
        from turnwise.runtime.server import RuntimeServer
        from turnwise.runtime.store import TrajectoryStore

        if self.model is None:
            self.model = self._first_model()
        self.recorder = Recorder()
        self.store = TrajectoryStore(self.out_dir / "trajectories.db", job_id=self.out_dir.name)
        app = proxy_app(self.cfg, upstream=self.url, api_key=self.api_key, store=self.store,
                        model_name=self.model, recorder=self.recorder)
        self.server = RuntimeServer(app, host=self.cfg.runtime.host, port=self.cfg.runtime.port).start()
        api_key = self.cfg.runtime.own_key()
        self.dispatcher = make_dispatcher(self.cfg.agent, self.agent, base_url=self.server.base_url,
                                          model=self.model, store=self.store, api_key=api_key)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()
        self.store.close()
        self.loop.close()

    def _first_model(self) -> str:
        """The first model the endpoint lists; 'default' when it lists none."""
        try:
            r = httpx.get(self.url + "/v1/models", headers={"Authorization": f"Bearer {self.api_key}"}, timeout=10)
            return str(r.json()["data"][0]["id"])
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
            return "default"

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return run_cancelling(self.loop, coro)

    async def run_task(self, task: Task, group_size: int, params: Mapping[str, Any]) -> list[Trial]:
        return await run_trials(self.dispatcher, task, group_size, params,
                                lambda r: list(self.recorder.turns.get(r.trajectory.id, [])))
