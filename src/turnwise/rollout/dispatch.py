"""Run agents on tasks: `len(tasks) x group_size` rollouts with a concurrency limit.

Three dispatchers satisfy `RolloutDispatcher`, one per `agent.kind` (`make_dispatcher` picks):
`InProcessDispatcher` here (python: an async function in this process),
`turnwise.rollout.push.PushDispatcher` (http: an agent server's /rollout) and
`turnwise.rollout.pull.WorkerDispatcher` (worker: pull workers lease rollouts from the runtime).
Training, `turnwise eval` and `turnwise verify` all run agents through them.

The in-process dispatcher runs the agent (`rollout.agent.run_agent`), then reports
complete-rollout and update-reward over HTTP, the same path an external agent takes, and reads
the recorded trajectory back. A rollout that fails is FAILED in the store with its
`FailureKind` and message; nothing is raised.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from turnwise.adapter.context import RolloutContext
from turnwise.adapter.feedback import FeedbackClient
from turnwise.config import AgentConfig, ConfigError
from turnwise.rollout.agent import NO_MODEL_CALL, AgentFn, load_agent, run_agent
from turnwise.runtime.store import TrajectoryStore
from turnwise.types import FailureKind, Group, RolloutResult, Task


class RolloutDispatcher(Protocol):
    """What the loops, eval and verify need from a dispatcher, whatever the agent kind."""

    async def run_groups(self, tasks: Sequence[Task], group_size: int,
                         inference_params: Mapping[str, Any]) -> list[Group]:
        """A `Group` per task with `group_size` rollouts; failed ones FAILED with their kind."""
        ...

    async def run_one(self, task: Task, inference_params: Mapping[str, Any],
                      trajectory_id: str | None = None) -> RolloutResult:
        """One rollout; `trajectory_id` names its (first attempt's) trajectory (verify routes by it)."""
        ...


def as_groups(tasks: Sequence[Task], group_size: int, results: Sequence[RolloutResult]) -> list[Group]:
    """Rollouts in task-major order -> one `Group` per task."""
    return [Group(task=t, rollouts_G=tuple(results[i * group_size:(i + 1) * group_size]))
            for i, t in enumerate(tasks)]


def make_dispatcher(agent_cfg: AgentConfig, agent: AgentFn | None, *, base_url: str, model: str,
                    store: TrajectoryStore, api_key: str | None = None) -> RolloutDispatcher:
    """The dispatcher of `agent_cfg.kind` for a runtime at `base_url` (`api_key`: the runtime's key).
    `agent` is the in-process function (kind python; None loads `agent.function`)."""
    from turnwise.rollout.pull import WorkerDispatcher
    from turnwise.rollout.push import PushDispatcher

    if agent_cfg.kind == "http":
        if not agent_cfg.url:
            raise ConfigError("agent.kind is http: set agent.url to the agent server, e.g. http://127.0.0.1:8080")
        return PushDispatcher(agent_cfg.url, base_url=base_url, model=model, store=store,
                              concurrency=agent_cfg.concurrency, timeout=agent_cfg.rollout_timeout,
                              max_retries=agent_cfg.rollout_max_retries, api_key=agent_cfg.api_key,
                              endpoint=agent_cfg.endpoint)
    if agent_cfg.kind == "worker":
        if agent_cfg.queue_timeout <= agent_cfg.rollout_timeout:
            raise ConfigError(f"agent.queue_timeout ({agent_cfg.queue_timeout:g}) must be above "
                              f"agent.rollout_timeout ({agent_cfg.rollout_timeout:g}): busy workers lease "
                              f"nothing new until their rollouts end")
        return WorkerDispatcher(model=model, store=store, timeout=agent_cfg.rollout_timeout,
                                queue_timeout=agent_cfg.queue_timeout,
                                max_retries=agent_cfg.rollout_max_retries, endpoint=agent_cfg.endpoint)
    if agent is None:
        agent = load_agent(agent_cfg.function)
    return InProcessDispatcher(agent, base_url=base_url, model=model, store=store,
                               concurrency=agent_cfg.concurrency, timeout=agent_cfg.rollout_timeout,
                               api_key=api_key)


class InProcessDispatcher:
    """Runs rollouts of one in-process agent against one runtime server."""

    def __init__(self, agent: AgentFn, *, base_url: str, model: str, store: TrajectoryStore,
                 concurrency: int, timeout: float, api_key: str | None = None,
                 require_model_call: bool = True) -> None:
        self.agent = agent
        self.require_model_call = require_model_call
        """False for verify's oracle and null agents, which may answer without the model."""
        self.base_url = base_url
        self.model = model
        self.store = store
        self.timeout = timeout
        self.api_key = api_key
        self.limit = asyncio.Semaphore(concurrency)

    async def run_groups(self, tasks: Sequence[Task], group_size: int,
                         inference_params: Mapping[str, Any]) -> list[Group]:
        async with FeedbackClient(self.base_url, api_key=self.api_key) as feedback:
            results = await asyncio.gather(*(self._run_one(task, inference_params, None, feedback)
                                             for task in tasks for _ in range(group_size)))
        return as_groups(tasks, group_size, results)

    async def run_one(self, task: Task, inference_params: Mapping[str, Any],
                      trajectory_id: str | None = None) -> RolloutResult:
        async with FeedbackClient(self.base_url, api_key=self.api_key) as feedback:
            return await self._run_one(task, inference_params, trajectory_id, feedback)

    async def _run_one(self, task: Task, inference_params: Mapping[str, Any], trajectory_id: str | None,
                       feedback: FeedbackClient) -> RolloutResult:
        async with self.limit:
            ctx = RolloutContext(trajectory_id=trajectory_id or f"traj-{uuid.uuid4().hex}",
                                 base_url=self.base_url, model=self.model,
                                 inference_params=dict(inference_params), api_key=self.api_key)
            self.store.begin(ctx.trajectory_id)
            start = time.perf_counter()
            run = await run_agent(self.agent, task, ctx, self.timeout)
            seconds = time.perf_counter() - start
            failure, error = run.failure, run.error
            if run.result is not None:
                failure, error = check_rewards(self.store, ctx.trajectory_id, run.result.rewards,
                                               self.require_model_call)
            if failure is None and run.result is not None:
                await feedback.complete_rollout(ctx.trajectory_id, "ready")
                await feedback.update_reward(ctx.trajectory_id, list(run.result.rewards))
            if failure is not None:
                self.store.fail(ctx.trajectory_id, failure, error or failure.value)
            return RolloutResult(task=task, trajectory=self.store.get(ctx.trajectory_id), seconds=seconds,
                                 metrics=dict(run.result.metrics) if run.result else {},
                                 state=run.result.state if run.result else None)


def check_rewards(store: TrajectoryStore, trajectory_id: str, rewards: Sequence[float],
                  require_model_call: bool = True) -> tuple[FailureKind | None, str | None]:
    """Whether an agent's rewards fit its recorded trajectory: a model call (when required), and
    one reward or one per turn."""
    last = store.get(trajectory_id, last_turn_only=True)
    n_turns = last.turns[-1].index + 1 if last is not None and last.turns else 0
    if n_turns == 0 and require_model_call:
        return FailureKind.NO_MODEL_CALL, NO_MODEL_CALL
    if len(rewards) not in (1, max(n_turns, 1)):
        return FailureKind.BAD_REWARD, (f"agent returned {len(rewards)} rewards for a trajectory of {n_turns} "
                                        f"turns: return one value or one per turn")
    return None, None
