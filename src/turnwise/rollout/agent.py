"""The agent contract, and running user agent code once.

An in-process agent is

    async def agent(task: dict, client: openai.AsyncOpenAI, ctx: RolloutContext) -> reward

where the reward is a float, a list of floats (one per turn), an `AgentResult`, a mapping
`{"reward": r, "metrics": {...}, "state": X}`, or an object with `.value` (and optionally
`.metrics`, `.state`), such as `turnwise.env.Reward`. `as_agent_result` turns any of these into
an `AgentResult` or raises `BadReward`; `run_agent` runs the function once under a timeout and
says how it ended, with a `FailureKind`. Every dispatcher, `turnwise eval` and `turnwise verify`
run agents through `run_agent`.
"""

from __future__ import annotations

import asyncio
import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from turnwise.adapter.context import RolloutContext
from turnwise.adapter.worker import load_function
from turnwise.types import AgentResult, FailureKind, Task


class AgentFn(Protocol):
    """`async def agent(task, client, ctx)` returning a reward (see the module docstring)."""

    def __call__(self, task: dict, client: Any, ctx: RolloutContext, /) -> Any: ...


class AgentLoadError(ValueError):
    """`agent.function` does not name a usable async agent function."""


class BadReward(ValueError):
    """An agent returned something that is not a finite reward."""


@dataclass(frozen=True)
class AgentRun:
    """How one agent run ended: its result, or the failure kind and message."""

    result: AgentResult | None
    failure: FailureKind | None = None
    error: str | None = None


def load_agent(spec: str | None, key: str = "agent.function") -> AgentFn:
    """Import `module:function` (the current directory is importable) and check it is async."""
    try:
        fn = load_function(spec, key)
    except ValueError as e:
        raise AgentLoadError(str(e)) from None
    if not inspect.iscoroutinefunction(fn):
        raise AgentLoadError(f"{spec} must be an async function: async def agent(task, client, ctx)")
    return fn  # type: ignore[return-value]


def as_agent_result(value: Any) -> AgentResult:
    """An agent's return value as an `AgentResult`; `BadReward` for anything else."""
    if isinstance(value, AgentResult):
        metrics, state, value = value.metrics, value.state, value.rewards
    elif isinstance(value, Mapping):
        metrics, state, value = value.get("metrics") or {}, value.get("state"), value.get("reward")
    elif hasattr(value, "value"):
        metrics, state, value = getattr(value, "metrics", None) or {}, getattr(value, "state", None), value.value
    else:
        metrics, state = {}, None
    if isinstance(value, bool) or value is None:
        raise BadReward(f"agent returned {value!r}; expected a float or a list of floats")
    rewards = (value,) if isinstance(value, int | float) else tuple(value)
    if not rewards or not all(isinstance(r, int | float) and not isinstance(r, bool) and math.isfinite(r)
                              for r in rewards):
        raise BadReward(f"agent returned rewards {rewards!r}; expected finite numbers")
    return AgentResult(rewards=tuple(float(r) for r in rewards),
                       metrics={str(k): float(v) for k, v in metrics.items()
                                if isinstance(v, int | float) and not isinstance(v, bool)},
                       state=state)


async def run_agent(agent: AgentFn, task: Task, ctx: RolloutContext, timeout: float,
                    client: Any = None, *, close: bool = True) -> AgentRun:
    """Run user agent code once with a client for `ctx` (or `client`), closed afterwards unless
    `close` is False (a client on a shared connection pool: closing it would close the pool)."""
    client = client if client is not None else ctx.async_openai()
    try:
        value = await asyncio.wait_for(agent(dict(task.row), client, ctx), timeout)
    except asyncio.TimeoutError:
        return AgentRun(None, FailureKind.AGENT_TIMEOUT, f"rollout timed out after {timeout:g}s")
    except Exception as e:  # the agent is user code: any failure is that rollout's outcome
        return AgentRun(None, FailureKind.AGENT_ERROR, f"{type(e).__name__}: {e}")
    finally:
        if close:
            await client.close()
    try:
        return AgentRun(as_agent_result(value))
    except BadReward as e:
        return AgentRun(None, FailureKind.BAD_REWARD, str(e))


NO_MODEL_CALL = "the agent made no model call"
