"""One chat call, start to end: plan the prompt, sample, parse, record the turn."""

from __future__ import annotations

from dataclasses import dataclass

from turnwise.runtime.capture import PromptPlan, plan_prompt
from turnwise.runtime.deps import ApiError, Runtime
from turnwise.runtime.schemas import ChatCompletionRequest
from turnwise.runtime.store import TrajectoryStore, TransitionError
from turnwise.types import Completion, TrajectoryStatus, Turn


@dataclass(frozen=True)
class SampledTurn:
    """A recorded turn and how it came about."""

    turn: Turn
    """As stored (its index is its position in the trajectory)."""
    plan: PromptPlan
    """How the prompt was built."""
    completion: Completion
    """What the sampler returned."""
    prefill_tokens: int
    """Prompt tokens the sampler computed."""


def _not_in_progress(trajectory_id: str, status: TrajectoryStatus) -> ApiError:
    return ApiError(409, f"trajectory {trajectory_id!r} is {status.value}: not in valid status for a new "
                         f"turn (needs in_progress; it was already completed)")


async def sample_turn(rt: Runtime, store: TrajectoryStore, trajectory_id: str,
                      body: ChatCompletionRequest) -> SampledTurn:
    """Sample the next assistant turn of a trajectory (creating it on its first call) and record it."""
    unsupported = body.unsupported()
    if unsupported is not None:
        raise ApiError(400, f"unsupported request field: {unsupported}")
    messages = body.to_messages()
    tools = body.tool_dicts()
    previous = store.get(trajectory_id, last_turn_only=True)
    if previous is not None and previous.status != TrajectoryStatus.IN_PROGRESS:
        raise _not_in_progress(trajectory_id, previous.status)
    if previous is None or not previous.turns:
        store.begin(trajectory_id, tools)
    try:
        plan = plan_prompt(previous, messages, tools, rt.chat)
    except Exception as e:  # a template refusing the conversation is the request's fault
        raise ApiError(400, f"cannot render these messages with the chat template: {e}") from None
    rt.prompt_plans[plan.reason.value] += 1

    params = body.sampling_params(rt.default_params)
    try:
        if rt.sampler_takes_cache_key:  # the engine keeps this trajectory's KV for the next turn
            completion = await rt.sampler.generate(plan.prompt_ids, params,  # type: ignore[call-arg]
                                                   cache_key=f"{store.job_id}/{trajectory_id}")
        else:
            completion = await rt.sampler.generate(plan.prompt_ids, params)
    except ValueError as e:  # e.g. the prompt does not fit the model's context
        raise ApiError(400, f"sampler refused the request: {e}") from None

    tool_specs = {t["function"]["name"]: t["function"].get("parameters") for t in tools or ()}
    message, tool_parse_error = rt.chat.parse_assistant(completion.token_ids, tool_specs)
    prefill = completion.prompt_tokens or len(plan.prompt_ids)
    turn = Turn(index=0, prompt_ids=plan.prompt_ids, completion_ids=tuple(completion.token_ids),
                logprobs=tuple(completion.logprobs), version=completion.version,
                finish_reason=completion.finish_reason, message=message, tool_parse_error=tool_parse_error,
                reused_prompt_tokens=plan.reused_prompt_tokens, request_messages=messages,
                prompt_plan=plan.reason.value)
    try:
        turn = store.append_turn(trajectory_id, turn, prefill_tokens=prefill)
    except TransitionError as e:  # completed while this turn was being sampled
        raise ApiError(409, str(e)) from None
    return SampledTurn(turn, plan, completion, prefill)
