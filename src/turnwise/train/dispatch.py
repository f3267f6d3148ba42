"""Run agents on tasks: `len(tasks) x group_size` rollouts with a concurrency limit.

Three dispatchers share `run_groups(tasks, group_size, inference_params) -> list[Group]`, one per
`agent.kind` (`make_dispatcher` picks): `Dispatcher` here (python: an in-process function),
`turnwise.train.push.PushDispatcher` (http: an agent server's /rollout) and
`turnwise.train.pull.WorkerDispatcher` (worker: pull workers lease tasks from the runtime).

An in-process agent is `async def agent(task: dict, client: openai.AsyncOpenAI, ctx: RolloutContext)`.
It returns its reward: a float, a list of floats (one per turn), or an object with `.value`
(or `["reward"]`) and `.metrics`. The dispatcher then reports complete-rollout and
update-reward over HTTP, the same path an external agent takes, and reads the recorded
trajectory back. An agent that raises or times out yields a FAILED trajectory with its reason.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

from turnwise.adapter.context import RolloutContext
from turnwise.adapter.feedback import FeedbackClient
from turnwise.adapter.worker import load_function
from turnwise.config import AgentConfig, ConfigError
from turnwise.runtime.store import TrajectoryStore
from turnwise.types import Group, RolloutResult, Task, TrajectoryStatus

AgentFn = Callable[[dict, Any, RolloutContext], Awaitable[Any]]


class RolloutDispatcher(Protocol):
    """What the training loop needs from a dispatcher, whatever the agent kind."""

    async def run_groups(self, tasks: Sequence[Task], group_size: int,
                         inference_params: Mapping[str, Any]) -> list[Group]:
        """A `Group` per task with `group_size` rollouts; failed ones FAILED with their error."""
        ...


def make_dispatcher(agent_cfg: AgentConfig, agent: AgentFn | None, *, base_url: str, model: str,
                    store: TrajectoryStore, api_key: str | None = None) -> RolloutDispatcher:
    """The dispatcher of `agent_cfg.kind` for a runtime at `base_url` (`api_key`: the runtime's key)."""
    from turnwise.train.pull import WorkerDispatcher
    from turnwise.train.push import PushDispatcher

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
    return Dispatcher(agent, base_url=base_url, model=model, store=store, concurrency=agent_cfg.concurrency,
                      timeout=agent_cfg.rollout_timeout, api_key=api_key)


class AgentLoadError(ValueError):
    """`agent.function` does not name a usable async agent function."""


def load_agent(spec: str | None) -> AgentFn:
    """Import `module:function` (the current directory is importable) and check it is async."""
    try:
        fn = load_function(spec, "agent.function")
    except ValueError as e:
        raise AgentLoadError(str(e)) from None
    if not inspect.iscoroutinefunction(fn):
        raise AgentLoadError(f"{spec} must be an async function: async def agent(task, client, ctx)")
    return fn


async def call_agent(agent: AgentFn, task: Task, client: Any, ctx: RolloutContext,
                     timeout: float) -> tuple[Any, str | None]:
    """Run user agent code once: (its return value, None) or (None, why it failed). Closes `client`."""
    try:
        return await asyncio.wait_for(agent(dict(task.row), client, ctx), timeout), None
    except asyncio.TimeoutError:
        return None, f"rollout timed out after {timeout:g}s"
    except Exception as e:  # the agent is user code: any failure is that rollout's outcome
        return None, f"{type(e).__name__}: {e}"
    finally:
        await client.close()


def split_agent_return(value: Any) -> tuple[tuple[float, ...], dict[str, float]]:
    """Agent return value -> (rewards, metrics). Raises ValueError on anything else."""
    metrics: Mapping[str, Any] = {}
    if isinstance(value, Mapping):
        metrics = value.get("metrics") or {}
        value = value.get("reward")
    elif hasattr(value, "value"):
        metrics = getattr(value, "metrics", None) or {}
        value = value.value
    if isinstance(value, bool) or value is None:
        raise ValueError(f"agent returned {value!r}; expected a float or a list of floats")
    rewards = (value,) if isinstance(value, int | float) else tuple(value)
    if not rewards or not all(isinstance(r, int | float) and math.isfinite(r) for r in rewards):
        raise ValueError(f"agent returned rewards {rewards!r}; expected finite numbers")
    return tuple(float(r) for r in rewards), {str(k): float(v) for k, v in metrics.items()
                                               if isinstance(v, int | float)}


class Dispatcher:
    """Runs rollouts of one agent against one runtime server."""

    def __init__(self, agent: AgentFn, *, base_url: str, model: str,
                 store: TrajectoryStore,
                 concurrency: int, timeout: float, api_key: str | None = None) -> None:
        self.agent = agent
        self.base_url = base_url
        self.model = model
        self.store = store
        self.timeout = timeout
        self.api_key = api_key
        self.concurrency = concurrency

    async def run_groups(self, tasks: Sequence[Task], group_size: int,
                         inference_params: Mapping[str, Any]) -> list[Group]:
        feedback = FeedbackClient(self.base_url, api_key=self.api_key)
        limit = asyncio.Semaphore(self.concurrency)
        try:
            results = await asyncio.gather(*(
                self._run_one(task, inference_params, feedback, limit)
                for task in tasks for _ in range(group_size)))
        finally:
            await feedback.aclose()
        return [Group(task=t, rollouts_G=tuple(results[i * group_size:(i + 1) * group_size]))
                for i, t in enumerate(tasks)]

    async def _run_one(self, task: Task, inference_params: Mapping[str, Any],
                       feedback: FeedbackClient, limit: asyncio.Semaphore) -> RolloutResult:
        async with limit:
            ctx = RolloutContext(trajectory_id=f"traj-{uuid.uuid4().hex}", base_url=self.base_url,
                                 model=self.model, inference_params=dict(inference_params),
                                 api_key=self.api_key)
            self.store.begin(ctx.trajectory_id)
            self.store.expect_sampling(ctx.trajectory_id, inference_params)  # runtime.sampling_overrides
            client = ctx.async_openai()
            start = time.perf_counter()
            metrics: dict[str, float] = {}
            value, error = await call_agent(self.agent, task, client, ctx, self.timeout)
            if error is None:
                try:
                    rewards, metrics = split_agent_return(value)
                except ValueError as e:
                    error = str(e)
            seconds = time.perf_counter() - start
            if error is None and not self.store.get(ctx.trajectory_id, last_turn_only=True).turns:
                error = "the agent made no model call"
            if error is None:
                await feedback.complete_rollout(ctx.trajectory_id, "ready")
                await feedback.update_reward(ctx.trajectory_id, list(rewards))
            else:
                self.store.complete(ctx.trajectory_id, TrajectoryStatus.FAILED, error=error)
            return RolloutResult(task=task, trajectory=self.store.get(ctx.trajectory_id), seconds=seconds,
                                 metrics=metrics)
