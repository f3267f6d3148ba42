"""`@rollout_handler`: run an agent on one push payload and report its outcome.

    @rollout_handler
    async def agent(payload: dict, ctx: RolloutContext) -> float | list[float] | dict:
        client = ctx.async_openai()
        ...
        return reward            # or [r_turn0, r_turn1, ...], or {"reward": r}

The decorated function takes the push `/rollout` body (DESIGN.md), the SDK's (`instance`,
`metadata.trajectory_id`, `inference_params`) or AgentCore's (`prompt`, `metadata.jobArn`,
`metadata.rolloutId`, `inferenceParams`), with both sets of names filled in
(`turnwise.adapter.context.normalize_payload`), and, optionally, the
`RolloutContext` built from it, which is also the current rollout (`headers()`, the clients
of `turnwise.adapter.clients`) while it runs. Afterwards it reports:

| the function                          | reported                                              |
|---------------------------------------|-------------------------------------------------------|
| returns a number or a list of numbers | complete-rollout(ready), update-reward(value(s))      |
| returns `{"reward": ...}`             | the same                                              |
| returns None or `{}`                  | complete-rollout(ready) only (rewarded elsewhere)     |
| returns `{"status": "error", ...}`    | complete-rollout(failed) with the error               |
| raises                                | complete-rollout(failed) with the error; re-raised    |

The same contract as the managed service's `sagemaker_rft_handler`. Sync functions are
supported too (reports then go through `SyncFeedbackClient`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from turnwise.adapter.context import RolloutContext, normalize_payload, rollout_scope
from turnwise.adapter.feedback import FeedbackClient, FeedbackError, SyncFeedbackClient


@dataclass(frozen=True)
class Outcome:
    """What an agent's return value means."""

    failed: bool
    rewards: tuple[float, ...] = ()
    error: str | None = None


def outcome_of(result: Any) -> Outcome:
    """Interpret an agent's return value (see the module docstring). Raises ValueError on nonsense."""
    if isinstance(result, Mapping):
        if result.get("status") == "error":
            return Outcome(failed=True, error=str(result.get("error") or "agent reported an error"))
        result = result.get("reward")
    if result is None:
        return Outcome(failed=False)
    if isinstance(result, bool) or not isinstance(result, int | float | list | tuple):
        raise ValueError(f"agent returned {result!r}: expected a number, a list of numbers, or a dict with 'reward'")
    values = (result,) if isinstance(result, int | float) else tuple(result)
    if not values or not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                             for v in values):
        raise ValueError(f"agent returned rewards {values!r}: expected finite numbers")
    return Outcome(failed=False, rewards=tuple(float(v) for v in values))


@contextlib.contextmanager
def _reporting_failure_of(error: Exception) -> Iterator[None]:
    """Report a failure without hiding it: a report that fails too becomes a note on the error
    (404: it failed before its first model call, so there is no trajectory to fail)."""
    try:
        yield
    except (FeedbackError, httpx.TransportError) as e:
        if not (isinstance(e, FeedbackError) and e.status == 404):
            error.add_note(f"reporting the failure to the runtime failed too: {e}")


def _wants_ctx(fn: Callable[..., Any]) -> bool:
    params = [p for p in inspect.signature(fn).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    return len(params) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


def rollout_handler(fn: Callable[..., Any] | None = None, *, base_url: str | None = None,
                    api_key: str | None = None) -> Any:
    """Decorate an agent function (see the module docstring). `base_url` overrides the payload's
    `metadata.endpoint`; `api_key` is the runtime server's key, when it needs one."""
    if fn is None:
        return functools.partial(rollout_handler, base_url=base_url, api_key=api_key)
    wants_ctx = _wants_ctx(fn)

    def context(payload: Mapping[str, Any]) -> RolloutContext:
        return RolloutContext.from_payload(payload, base_url=base_url, api_key=api_key)

    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def async_wrapper(payload: Mapping[str, Any]) -> Any:
            payload = normalize_payload(payload)
            ctx = context(payload)
            async with FeedbackClient(ctx.base_url, ctx.api_key, job_arn=ctx.job_arn) as feedback:
                with rollout_scope(ctx):
                    try:
                        result = await (fn(payload, ctx) if wants_ctx else fn(payload))
                        outcome = outcome_of(result)
                    except Exception as e:
                        with _reporting_failure_of(e):
                            await feedback.complete_rollout(ctx.trajectory_id, "failed",
                                                            error=f"{type(e).__name__}: {e}")
                        raise
                if outcome.failed:
                    await feedback.complete_rollout(ctx.trajectory_id, "failed", error=outcome.error)
                else:
                    await feedback.complete_rollout(ctx.trajectory_id, "ready")
                    if outcome.rewards:
                        await feedback.update_reward(ctx.trajectory_id, outcome.rewards)
            return result

        async_wrapper.__turnwise_rollout_handler__ = True  # type: ignore[attr-defined]
        return async_wrapper

    @functools.wraps(fn)
    def sync_wrapper(payload: Mapping[str, Any]) -> Any:
        payload = normalize_payload(payload)
        ctx = context(payload)
        with SyncFeedbackClient(ctx.base_url, ctx.api_key, job_arn=ctx.job_arn) as feedback:
            with rollout_scope(ctx):
                try:
                    result = fn(payload, ctx) if wants_ctx else fn(payload)
                    outcome = outcome_of(result)
                except Exception as e:
                    with _reporting_failure_of(e):
                        feedback.complete_rollout(ctx.trajectory_id, "failed", error=f"{type(e).__name__}: {e}")
                    raise
            if outcome.failed:
                feedback.complete_rollout(ctx.trajectory_id, "failed", error=outcome.error)
            else:
                feedback.complete_rollout(ctx.trajectory_id, "ready")
                if outcome.rewards:
                    feedback.update_reward(ctx.trajectory_id, outcome.rewards)
        return result

    sync_wrapper.__turnwise_rollout_handler__ = True  # type: ignore[attr-defined]
    return sync_wrapper
