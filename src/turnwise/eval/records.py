"""What one evaluation trial produced, graded, in a form that survives a JSONL round trip.

Both backends (the embedded runtime, which records token ids, and an external OpenAI-compatible
endpoint, which only shows the conversation and usage) reduce a rollout to `TurnView`s; one
function turns those into an `EvalRollout`, so every metric is computed the same way.

Scoring is independent of the training reward: the grader (`eval.grader`, default strict
`exact_match`) reads the last assistant message and compares its `<final_output>` JSON with
`task[eval.answer_key]`. The agent's own reward is kept as `agent_reward` for reference. A
rollout that failed (any `FailureKind`) scores 0 and keeps its kind and message.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from turnwise.env.rewards import exact_match, field_accuracy, lenient_match
from turnwise.types import FailureKind, Message, Trajectory, TurnView

GRADERS = {"exact_match": exact_match, "lenient_match": lenient_match, "field_accuracy": field_accuracy}
"""Grader name -> `fn(output, ground_truth) -> Reward`; `reward` (the agent's own) is handled apart."""


class Outcome(str, enum.Enum):
    """How an evaluation rollout ended: a normal stop, or the `FailureKind` of a failed rollout
    (same values); `eval/stop/<value>` is the fraction of rollouts."""

    ANSWERED = "answered"
    """The last model turn ended normally without calling a tool."""
    TOOL_CALL = "tool_call"
    """The agent stopped while the model was still calling tools (its turn limit)."""
    LENGTH = "length"
    """The last model turn hit max_tokens."""
    AGENT_ERROR = FailureKind.AGENT_ERROR.value
    TIMEOUT = FailureKind.AGENT_TIMEOUT.value
    QUEUE_TIMEOUT = FailureKind.QUEUE_TIMEOUT.value
    NO_MODEL_CALL = FailureKind.NO_MODEL_CALL.value
    BAD_REWARD = FailureKind.BAD_REWARD.value
    NO_REWARD = FailureKind.NO_REWARD.value
    TRANSPORT = FailureKind.TRANSPORT.value
    WORKER_LOST = FailureKind.WORKER_LOST.value
    ABANDONED = FailureKind.ABANDONED.value


FAILURE_STOPS = frozenset(Outcome(k.value) for k in FailureKind)


@dataclass(frozen=True)
class EvalRollout:
    """One graded trial of one task (one line's `rollouts` entry in `tasks.jsonl`)."""

    task_id: str
    trial: int
    trajectory_id: str
    """Id in `trajectories.db` (embedded backend; token ids live there)."""
    stop_reason: Outcome
    error: str | None
    """Why it failed (crash, timeout, no model call, grader error); None otherwise."""
    score: float
    """The grader's value (0 for a failed rollout)."""
    success: bool
    """score >= `success_threshold` (what pass@k counts)."""
    exact_match: float | None
    """Strict `<final_output>` exact match; None when the task has no ground truth."""
    agent_reward: float | None
    """The reward the agent returned (the training reward), for reference; None if it failed."""
    turns: int
    tool_calls: int
    """Tool calls the model made, unparseable attempts included."""
    tool_errors: int
    """Calls whose result was an error (the agent's `tool_errors` metric when it reports one, else
    tool results that are a JSON object with an `error` key), plus unparseable attempts."""
    completion_tokens: int
    prompt_tokens: int
    latency_s: float
    """Wall time of the agent run."""
    finish_reasons: tuple[str, ...] = ()
    """Per model call."""
    agent_metrics: Mapping[str, float] = field(default_factory=dict)
    messages: tuple[Mapping[str, Any], ...] = ()
    """The whole conversation in OpenAI's shape, ending with the last assistant message."""

    @property
    def failed(self) -> bool:
        return self.stop_reason in FAILURE_STOPS

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["stop_reason"] = self.stop_reason.value
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> EvalRollout:
        return cls(**{**d, "stop_reason": Outcome(d["stop_reason"]),
                      "finish_reasons": tuple(d.get("finish_reasons", ())),
                      "messages": tuple(d.get("messages", ()))})


def turns_from_trajectory(traj: Trajectory) -> list[TurnView]:
    return [TurnView(request_messages=t.request_messages, message=t.message, finish_reason=t.finish_reason.value,
                     completion_tokens=len(t.completion_ids), prompt_tokens=len(t.prompt_ids),
                     tool_parse_error=t.tool_parse_error) for t in traj.turns]


def grade_rollout(*, task_id: str, trial: int, trajectory_id: str, turns: Sequence[TurnView],
                  error: str | None, failure: FailureKind | None, agent_reward: float | None, agent_metrics: Mapping[str, float],
                  latency_s: float, answer: Any, grader: str, success_threshold: float) -> EvalRollout:
    """Grade one trial. `answer` is the task's ground truth (None when it has none)."""
    last = turns[-1] if turns else None
    messages = tuple(m.to_openai() for m in (*last.request_messages, last.message)) if last else ()
    # an unparseable tool call is an attempted call that failed
    parse_errors = sum(t.tool_parse_error for t in turns)
    tool_calls = sum(len(t.message.tool_calls) for t in turns) + parse_errors
    if "tool_errors" in agent_metrics:  # the agent knows what its tools count as an error
        tool_errors = int(agent_metrics["tool_errors"]) + parse_errors
    else:
        tool_errors = sum(_is_tool_error(m) for m in (last.request_messages if last else ())) + parse_errors
    score, exact = 0.0, None
    if failure is None:
        stop = _normal_stop(last)  # type: ignore[arg-type]
        try:
            score, exact = _grade(last.message.content, answer, grader, agent_reward)  # type: ignore[union-attr]
        except Exception as e:  # a malformed ground truth fails this trial, not the run
            error = f"grader {grader}: {type(e).__name__}: {e}"
            stop = Outcome.AGENT_ERROR
    else:
        stop = Outcome(failure.value)
        if answer is not None:
            exact = 0.0
    failed = stop in FAILURE_STOPS
    return EvalRollout(
        task_id=task_id, trial=trial, trajectory_id=trajectory_id, stop_reason=stop, error=error,
        score=0.0 if failed else score, success=not failed and score >= success_threshold,
        exact_match=exact, agent_reward=None if failed else agent_reward, turns=len(turns),
        tool_calls=tool_calls, tool_errors=tool_errors,
        completion_tokens=sum(t.completion_tokens for t in turns),
        prompt_tokens=sum(t.prompt_tokens for t in turns), latency_s=latency_s,
        finish_reasons=tuple(t.finish_reason for t in turns), agent_metrics=dict(agent_metrics),
        messages=messages)


def _normal_stop(last: TurnView) -> Outcome:
    if last.finish_reason == "length":
        return Outcome.LENGTH
    return Outcome.TOOL_CALL if last.message.tool_calls else Outcome.ANSWERED


def _grade(text: str, answer: Any, grader: str, agent_reward: float | None) -> tuple[float, float | None]:
    exact = None if answer is None else exact_match(text, answer).value
    if grader == "reward":
        return float(agent_reward or 0.0), exact
    if answer is None:
        raise ValueError("the task has no ground truth")
    return GRADERS[grader](text, answer).value, exact


def _is_tool_error(m: Message) -> bool:
    """A tool result that reports an error: a JSON object with an `error` key, or text starting 'error'."""
    if m.role != "tool":
        return False
    text = m.content.strip()
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text.lower().startswith("error")
    return isinstance(value, dict) and "error" in value
