"""One chat call, start to end: plan the prompt, sample, parse, record the turn.

Sampling parameters: the request's, over the job's for this trajectory (what the trainer chose
for the rollout, `TrajectoryStore.expect_sampling`), over the runtime's defaults. When the
request sets temperature, top_p or max_tokens other than the job's, `Runtime.sampling_overrides`
decides: allow (the request's win), warn (the job's win; logged once per value), deny (400);
each case is counted in `Runtime.override_counts`.

Forced tool use (`tool_choice` required or a named function) and structured output
(`response_format` json_object / json_schema) become a grammar in the family's own format
(`policy.grammars`) that the sampler decodes under (`SamplingParams.grammar`); `top_logprobs`
is passed on. A sampler or family that cannot honour one is a 400 naming the field, never ignored. A request without `seed` samples with
`derive_seed(job seed, trajectory id, turn)`, so the same job seed, trajectory ids and
requests give the same tokens (see README "Reproducibility" for what else that needs).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from turnwise.policy.grammars import Constraint, ConstraintError, request_grammar
from turnwise.policy.renderers import Renderer
from turnwise.runtime.capture import PromptPlan, plan_prompt
from turnwise.runtime.deps import ApiError, Runtime
from turnwise.runtime.schemas import ChatCompletionRequest
from turnwise.runtime.store import TrajectoryStore, TransitionError
from turnwise.types import Completion, SampleContext, SamplingParams, TrajectoryStatus, Turn

log = logging.getLogger(__name__)
_OVERRIDABLE = ("temperature", "top_p", "max_tokens")


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


def derive_seed(job_seed: int, trajectory_id: str, turn: int) -> int:
    """A 63-bit seed from the job seed, the trajectory id and the turn index (SHA-256)."""
    digest = hashlib.sha256(f"{job_seed}\x00{trajectory_id}\x00{turn}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _request_value(body: ChatCompletionRequest, name: str) -> float | int | None:
    if name == "max_tokens":
        return body.max_completion_tokens or body.max_tokens
    return getattr(body, name)


def sampling_for(rt: Runtime, store: TrajectoryStore, trajectory_id: str, body: ChatCompletionRequest,
                 turn: int) -> SamplingParams:
    """The parameters this turn samples with (module docstring)."""
    job = store.expected_sampling(trajectory_id) or {}
    defaults = dataclasses.replace(rt.default_params, **job)
    params = body.sampling_params(defaults)
    differing = {k: v for k in _OVERRIDABLE if k in job and (v := _request_value(body, k)) is not None
                 and v != job[k]}
    if differing and rt.sampling_overrides == "deny":
        for k in differing:
            rt.override_counts[f"{k}/denied"] += 1
        listed = ", ".join(f"{k}={v!r} (the job's: {job[k]!r})" for k, v in differing.items())
        raise ApiError(400, f"this rollout samples with the job's parameters; the request sets {listed} "
                            "(runtime.sampling_overrides: deny)")
    if differing and rt.sampling_overrides == "warn":
        params = dataclasses.replace(params, **{k: job[k] for k in differing})
        for k, v in differing.items():
            if (k, v) not in rt.override_warned:
                rt.override_warned.add((k, v))
                log.warning("a request set %s=%r; the job's %s=%r is used instead "
                            "(runtime.sampling_overrides: warn; allow lets agents override)", k, v, k, job[k])
            rt.override_counts[f"{k}/replaced"] += 1
    elif differing:
        for k in differing:
            rt.override_counts[f"{k}/allowed"] += 1
    if params.seed is None and rt.seed is not None:
        params = dataclasses.replace(params, seed=derive_seed(rt.seed, trajectory_id, turn))
    return params


def constraint_params(rt: Runtime, body: ChatCompletionRequest) -> dict[str, object]:
    """`grammar` and `top_logprobs` for this request's `SamplingParams` (module docstring); ApiError 400 naming
    the field the runtime cannot honour."""
    try:
        forced, schema = body.forced_tools(), body.response_schema()
    except ValueError as e:
        raise ApiError(400, f"unsupported request field: {e}") from None
    out: dict[str, object] = {}
    if forced or schema is not None:
        field = "tool_choice" if forced else "response_format"
        if not rt.sampler_supports_grammar or not isinstance(rt.chat, Renderer):
            raise ApiError(400, f"unsupported request field: {field}: this runtime's sampler cannot constrain "
                                "decoding (forced tool use and structured output need the local sampler)")
        tools = {t["function"]["name"]: t["function"].get("parameters") for t in body.tool_dicts() or ()}
        named = isinstance(body.tool_choice, dict)  # exactly one call of that function
        constraint = Constraint(tools, forced, parallel=not named and body.parallel_tool_calls is not False,
                                schema=schema)
        try:
            out["grammar"] = request_grammar(rt.chat, constraint)
        except ConstraintError as e:
            raise ApiError(400, f"unsupported request field: {e}") from None
    if body.top_logprobs:
        if not body.logprobs:
            raise ApiError(400, "unsupported request field: top_logprobs needs logprobs: true")
        if not rt.sampler_supports_top_logprobs:
            raise ApiError(400, "unsupported request field: top_logprobs: this runtime's sampler returns only the "
                                "sampled token's logprob; send 0 or omit it")
        out["top_logprobs"] = body.top_logprobs
    return out


async def sample_turn(rt: Runtime, store: TrajectoryStore, trajectory_id: str, body: ChatCompletionRequest, *,
                      on_token: Callable[[int, float], None] | None = None,
                      on_plan: Callable[[PromptPlan, int], None] | None = None) -> SampledTurn:
    """Sample the next assistant turn of a trajectory (creating it on its first call) and record it.
    `on_plan(plan, turn index)` runs before sampling; `on_token(id, logprob)` for every token as
    the sampler produces it (from the sampler's thread), when the sampler supports it. A sampler
    whose `generate` takes `context` gets a `SampleContext` (trajectory, task, turn)."""
    started_at = time.time()
    constrained = constraint_params(rt, body)
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

    turn_index = previous.turns[-1].index + 1 if previous is not None and previous.turns else 0
    params = dataclasses.replace(sampling_for(rt, store, trajectory_id, body, turn_index), **constrained)
    if on_plan is not None:
        on_plan(plan, turn_index)
    extra: dict[str, object] = {}
    if rt.sampler_takes_cache_key:  # the engine keeps this trajectory's KV for the next turn
        extra["cache_key"] = f"{store.job_id}/{trajectory_id}"
    if on_token is not None and rt.sampler_takes_on_token:
        extra["on_token"] = on_token
    if rt.sampler_takes_context:  # a scripted policy answers per task without reading the prompt
        extra["context"] = SampleContext(trajectory_id=trajectory_id, turn=turn_index,
                                         task_id=previous.task_id if previous is not None else None)
    try:
        completion = await rt.sampler.generate(plan.prompt_ids, params, **extra)  # type: ignore[call-arg]
    except ValueError as e:  # e.g. the prompt does not fit the model's context
        raise ApiError(400, f"sampler refused the request: {e}") from None

    tool_specs = {t["function"]["name"]: t["function"].get("parameters") for t in tools or ()}
    message, tool_parse_error = rt.chat.parse_assistant(completion.token_ids, tool_specs)
    prefill = completion.prompt_tokens or len(plan.prompt_ids)
    turn = Turn(index=0, prompt_ids=plan.prompt_ids, completion_ids=tuple(completion.token_ids),
                logprobs=tuple(completion.logprobs), version=completion.version,
                finish_reason=completion.finish_reason, message=message, tool_parse_error=tool_parse_error,
                reused_prompt_tokens=plan.reused_prompt_tokens, request_messages=messages,
                prompt_plan=plan.reason.value, started_at=started_at)
    try:
        turn = store.append_turn(trajectory_id, turn, prefill_tokens=prefill)
    except TransitionError as e:  # completed while this turn was being sampled
        raise ApiError(409, str(e)) from None
    return SampledTurn(turn, plan, completion, prefill)
