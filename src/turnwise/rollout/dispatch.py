"""Pick the dispatcher of an `agent.kind`: one of three, all satisfying `RolloutDispatcher`:

- python: `rollout.inprocess.InProcessDispatcher`, an async function in this process;
- http: `rollout.push.PushDispatcher`, an agent server's `POST /rollout` (the managed agent SDK's contract);
- worker: `rollout.pull.WorkerDispatcher`, pull workers that lease rollouts from the runtime.

Training, `turnwise eval` and `turnwise verify` all run agents through them.
"""

from __future__ import annotations

from turnwise.config import AgentConfig, ConfigError
from turnwise.rollout.agent import AgentFn, load_agent
from turnwise.rollout.base import RolloutDispatcher, as_groups
from turnwise.rollout.inprocess import InProcessDispatcher
from turnwise.rollout.pull import WorkerDispatcher
from turnwise.rollout.push import PushDispatcher
from turnwise.runtime.store import TrajectoryStore

__all__ = ["InProcessDispatcher", "PushDispatcher", "RolloutDispatcher", "WorkerDispatcher", "as_groups",
           "make_dispatcher"]


def make_dispatcher(agent_cfg: AgentConfig, agent: AgentFn | None, *, base_url: str, model: str,
                    store: TrajectoryStore, api_key: str | None = None) -> RolloutDispatcher:
    """The dispatcher of `agent_cfg.kind` for a runtime at `base_url` (`api_key`: the runtime's key).
    `agent` is the in-process function (kind python; None loads `agent.function`)."""
    if agent_cfg.kind == "http":
        if not agent_cfg.url:
            raise ConfigError("agent.kind is http: set agent.url to the agent server, e.g. http://127.0.0.1:8080")
        return PushDispatcher(agent_cfg.url, base_url=base_url, model=model, store=store,
                              concurrency=agent_cfg.concurrency, timeout=agent_cfg.rollout_timeout,
                              max_retries=agent_cfg.rollout_max_retries, api_key=agent_cfg.api_key,
                              endpoint=agent_cfg.endpoint, unavailable_timeout=agent_cfg.unavailable_timeout,
                              retry_backoff=agent_cfg.retry_backoff)
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


