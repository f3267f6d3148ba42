"""A step's rollouts in MLflow: traces for a sample of them, and a table of all of them.

A trace is one rollout: a root span (the task in, the final output, reward and verdict out), a
span per turn (the new messages the agent sent, the assistant message, tokens, policy version)
and a span per tool call the model made (its arguments, and the tool result the agent sent
back next turn), under the rollout's span. Durations are the real ones: a turn spans from its request reaching the runtime
to the sampled turn being recorded (`Turn.started_at`, `Turn.ended_at`); a tool call spans the
agent's time between that turn and its next request (the calls of one turn share that window).
Reward and verdict are the root span's outputs (the Traces tab's Response column) and tags.

The table (`mlflow.log_table`, `rollouts/step_NNNNN.json`) has one row per rollout of the step:
task, final output, expected answer, reward, verdict, turns, tool errors.

MLflow exports traces in a background queue to the global tracking URI, so `log_traces` points
it at the run's store; `flush` waits for the queue.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from turnwise.types import Group, RolloutResult, TrajectoryStatus


@dataclass(frozen=True)
class TraceOptions:
    """What the per-step traces and table show."""

    groups_per_step: int | None = 2
    """Groups of a step logged as traces (every rollout of each); None: all of them."""
    success_threshold: float = 1.0
    """A reward at or above it is a pass."""
    answer_key: str = "answer"
    """The task field holding the expected answer, shown beside the final output."""


def verdict(r: RolloutResult, success_threshold: float) -> str:
    """pass | fail | failed: <kind> (the rollout never got a usable reward)."""
    traj = r.trajectory
    if traj.status != TrajectoryStatus.REWARDED or not traj.turns:
        return f"failed: {traj.failure.value if traj.failure else traj.status.value}"
    return "pass" if traj.reward >= success_threshold else "fail"


def final_output(r: RolloutResult) -> str:
    """The last assistant message: its text, or its tool calls as `name(arguments)`."""
    turns = r.trajectory.turns
    if not turns:
        return ""
    message = turns[-1].message
    calls = [f"{c.name}({c.arguments})" for c in message.tool_calls]
    return "\n".join([t for t in [message.content or ""] if t] + calls)


def tool_errors(r: RolloutResult) -> int:
    return int(r.metrics.get("rollout/tool_errors", r.metrics.get("tool_errors", 0)))


def rollout_table(groups: Sequence[Group], options: TraceOptions) -> dict[str, list[Any]]:
    """One row per rollout (columns as lists, what `log_table` takes)."""
    cols: dict[str, list[Any]] = {k: [] for k in ("task_id", "task", "final_output", "expected", "reward",
                                                   "verdict", "turns", "tool_errors", "trajectory_id")}
    for g in groups:
        for r in g.rollouts_G:
            row = dict(r.task.row)
            cols["task_id"].append(r.task.id)
            cols["task"].append(_short(row.get("question") or row.get("prompt") or row))
            cols["final_output"].append(final_output(r))
            cols["expected"].append(_short(row.get(options.answer_key, "")))
            cols["reward"].append(r.trajectory.reward if r.trajectory.rewards else None)
            cols["verdict"].append(verdict(r, options.success_threshold))
            cols["turns"].append(len(r.trajectory.turns))
            cols["tool_errors"].append(tool_errors(r))
            cols["trajectory_id"].append(r.trajectory.id)
    return cols


def log_step(client: Any, experiment_id: str, run_id: str, step: int, groups: Sequence[Group],
             options: TraceOptions, traces: bool = True) -> int:
    """The step's table, and (`traces`) traces of its first `groups_per_step` groups; returns the
    number of traces logged."""
    client.log_table(run_id, rollout_table(groups, options), f"rollouts/step_{step:05d}.json")
    if not traces:
        return 0
    import mlflow

    if mlflow.get_tracking_uri() != client.tracking_uri:
        flush()  # traces still queued for the previous store must not land in this one
        before = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(client.tracking_uri)
        # set_tracking_uri also exports $MLFLOW_TRACKING_URI, which would send every later job of
        # this process (the demo's evaluations, the next test) to this run's store
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before
    sampled = groups if options.groups_per_step is None else groups[: options.groups_per_step]
    n = 0
    for g in sampled:
        for r in g.rollouts_G:
            _log_one(client, experiment_id, run_id, step, r, options)
            n += 1
    return n


def _ns(seconds: float) -> int | None:
    return int(seconds * 1e9) if seconds > 0 else None


def _log_one(client: Any, experiment_id: str, run_id: str, step: int, r: RolloutResult,
             options: TraceOptions) -> None:
    traj = r.trajectory
    turns = traj.turns
    started = turns[0].started_at if turns and turns[0].started_at else time.time() - r.seconds
    ended = max(started + r.seconds, turns[-1].ended_at if turns else 0.0)
    judged = verdict(r, options.success_threshold)
    reward = traj.reward if traj.rewards else None
    first_user = next((m.content for m in (turns[0].request_messages if turns else ()) if m.role == "user"), None)
    root = client.start_trace(  # what the Traces tab's Request and Response columns show first
        name="rollout", span_type="AGENT",
        inputs={"task_id": r.task.id, "user": first_user, "task": _jsonable(dict(r.task.row))},
        attributes={"reward": reward, "verdict": judged},
        tags={"turnwise.step": str(step), "turnwise.task_id": r.task.id, "turnwise.trajectory_id": traj.id,
              "turnwise.verdict": judged},
        experiment_id=experiment_id, run_id=run_id, start_time_ns=_ns(started))
    trace_id, root_id = root.trace_id, root.span_id
    seen = 0
    for i, turn in enumerate(turns):
        new_messages = [m.to_openai() for m in turn.request_messages[seen:]]
        seen = len(turn.request_messages) + 1
        span = client.start_span(
            f"turn {turn.index}", trace_id=trace_id, parent_id=root_id, span_type="LLM",
            inputs={"messages": new_messages}, start_time_ns=_ns(turn.started_at),
            attributes={"policy_version": turn.version, "prompt_tokens": len(turn.prompt_ids),
                        "completion_tokens": len(turn.completion_ids), "finish_reason": turn.finish_reason.value})
        client.end_span(trace_id, span.span_id, outputs=turn.message.to_openai(), end_time_ns=_ns(turn.ended_at))
        nxt = turns[i + 1] if i + 1 < len(turns) else None
        results = {m.tool_call_id: m.content for m in (nxt.request_messages if nxt else ()) if m.role == "tool"}
        tool_end = nxt.started_at if nxt else ended
        for call in turn.message.tool_calls:
            tool = client.start_span(f"tool {call.name}", trace_id=trace_id, parent_id=root_id,
                                     span_type="TOOL", inputs={"arguments": call.arguments},
                                     start_time_ns=_ns(turn.ended_at))
            client.end_span(trace_id, tool.span_id, outputs={"result": results.get(call.id)},
                            end_time_ns=_ns(tool_end))
    client.end_trace(trace_id, outputs={"verdict": judged, "reward": reward, "final_output": final_output(r),
                                        "expected": _jsonable(r.task.row.get(options.answer_key)),
                                        "error": traj.error, "metrics": dict(r.metrics)},
                     status="OK" if traj.error is None else "ERROR", end_time_ns=_ns(ended))


def _short(value: Any, limit: int = 300) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def flush() -> None:
    import mlflow

    mlflow.flush_trace_async_logging()
