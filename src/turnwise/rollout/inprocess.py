"""The in-process dispatcher (`agent.kind: python`): an async agent function in this process.

It runs the agent (`rollout.agent.run_agent`), checks its rewards against the recorded
trajectory, then seals and rewards it in the store (the transactions the complete-rollout and
update-reward routes run; this is the trainer's side, in the runtime's process, so it skips their
HTTP hops) and reads the recorded trajectory back. A rollout that fails is FAILED in the store
with its `FailureKind` and message; nothing is raised.

The agent's model calls still go over HTTP with the real OpenAI client, one per rollout carrying
that rollout's headers; the clients of one `run_groups` share one connection pool (a client of its
own costs ~2 ms of CPU and a new connection per rollout, under the GIL the sampler needs).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import openai

from turnwise.adapter.context import RolloutContext
from turnwise.rollout.agent import NO_MODEL_CALL, AgentFn, run_agent
from turnwise.rollout.base import as_groups
from turnwise.runtime.rollout_routes import INVALID_REWARD
from turnwise.runtime.store import TrajectoryStore, TransitionError
from turnwise.types import FailureKind, Group, RolloutResult, Task, TrajectoryStatus


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
        async with self._http() as http:
            results = await asyncio.gather(*(self._run_one(task, inference_params, None, http)
                                             for task in tasks for _ in range(group_size)))
        return as_groups(tasks, group_size, results)

    async def run_one(self, task: Task, inference_params: Mapping[str, Any],
                      trajectory_id: str | None = None) -> RolloutResult:
        async with self._http() as http:
            return await self._run_one(task, inference_params, trajectory_id, http)

    def _http(self) -> openai.DefaultAsyncHttpxClient:
        """The connection pool the rollouts' OpenAI clients share (no TLS setup for plain http)."""
        plain = self.base_url.startswith("http://")
        return openai.DefaultAsyncHttpxClient(**({"verify": False} if plain else {}))

    async def _run_one(self, task: Task, inference_params: Mapping[str, Any], trajectory_id: str | None,
                       http: openai.DefaultAsyncHttpxClient) -> RolloutResult:
        async with self.limit:
            ctx = RolloutContext(trajectory_id=trajectory_id or self.store.new_trajectory_id(),
                                 base_url=self.base_url, model=self.model,
                                 inference_params=dict(inference_params), api_key=self.api_key)
            self.store.begin(ctx.trajectory_id, task_id=task.id)  # the runtime's SampleContext names it
            self.store.expect_sampling(ctx.trajectory_id, inference_params)  # runtime.sampling_overrides
            start = time.perf_counter()
            run = await run_agent(self.agent, task, ctx, self.timeout, ctx.async_openai(http_client=http),
                                  close=False)
            seconds = time.perf_counter() - start
            failure, error = run.failure, run.error
            if run.result is not None:
                failure, error = check_rewards(self.store, ctx.trajectory_id, run.result.rewards,
                                               self.require_model_call)
            if failure is None and run.result is not None:
                failure, error = seal(self.store, ctx.trajectory_id, run.result.rewards)
            if failure is not None:
                self.store.fail(ctx.trajectory_id, failure, error or failure.value)
            return RolloutResult(task=task, trajectory=self.store.get(ctx.trajectory_id), seconds=seconds,
                                 metrics=dict(run.result.metrics) if run.result else {},
                                 state=run.result.state if run.result else None)


def seal(store: TrajectoryStore, trajectory_id: str,
         rewards: Sequence[float]) -> tuple[FailureKind | None, str | None]:
    """Complete a checked rollout as ready and store its rewards, as the two feedback routes do
    (and as `FeedbackClient` takes their answers: a trajectory already sealed or rewarded, e.g. by
    an agent that reported itself, is left as it is; a reward the store refuses fails the rollout)."""
    with contextlib.suppress(TransitionError):
        store.complete(trajectory_id, TrajectoryStatus.READY)
    try:
        store.set_rewards(trajectory_id, rewards)
    except TransitionError:
        pass
    except ValueError as e:  # not finite: the route's 400
        return FailureKind.BAD_REWARD, f"{INVALID_REWARD}: {e}"
    return None, None


def check_rewards(store: TrajectoryStore, trajectory_id: str, rewards: Sequence[float],
                  require_model_call: bool = True) -> tuple[FailureKind | None, str | None]:
    """Whether an agent's rewards fit its recorded trajectory: a model call (when required), and
    one reward or one per turn."""
    last = store.get(trajectory_id, last_turn_only=True)
    n_turns = last.turns[-1].index + 1 if last is not None and last.turns else 0
    if n_turns == 0 and require_model_call:
        return FailureKind.NO_MODEL_CALL, NO_MODEL_CALL
    if len(rewards) not in (1, max(n_turns, 1)):
        return FailureKind.BAD_REWARD, (f"invalid reward: got {len(rewards)} rewards for a trajectory of {n_turns} "
                                        f"turns: send one value or one per turn")
    return None, None
