"""Every training rollout as an MLflow trace: a root span for the rollout, a span per turn (the
new messages the agent sent, the assistant message, tokens, policy version) and a child span
per tool call the model made (its arguments, and the tool result the agent sent back next turn).

MLflow exports traces in a background queue to the global tracking URI, so `log_traces` points
it at the run's store; `flush` waits for the queue (about 80 ms per trace on a SQLite store).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from turnwise.types import Group, RolloutResult


def log_traces(client: Any, experiment_id: str, run_id: str, step: int, groups: Sequence[Group]) -> int:
    """Log one trace per rollout of `groups`; returns how many were logged."""
    import mlflow

    if mlflow.get_tracking_uri() != client.tracking_uri:
        mlflow.set_tracking_uri(client.tracking_uri)
    n = 0
    for g in groups:
        for r in g.rollouts_G:
            _log_one(client, experiment_id, run_id, step, r)
            n += 1
    return n


def _log_one(client: Any, experiment_id: str, run_id: str, step: int, r: RolloutResult) -> None:
    traj = r.trajectory
    root = client.start_trace(
        name="rollout", span_type="AGENT", inputs={"task": _jsonable(dict(r.task.row))},
        tags={"turnwise.step": str(step), "turnwise.task_id": r.task.id, "turnwise.trajectory_id": traj.id},
        experiment_id=experiment_id, run_id=run_id)
    trace_id, root_id = root.trace_id, root.span_id
    seen = 0
    turns = traj.turns
    for i, turn in enumerate(turns):
        new_messages = [m.to_openai() for m in turn.request_messages[seen:]]
        seen = len(turn.request_messages) + 1
        span = client.start_span(
            f"turn {turn.index}", trace_id=trace_id, parent_id=root_id, span_type="LLM",
            inputs={"messages": new_messages},
            attributes={"policy_version": turn.version, "prompt_tokens": len(turn.prompt_ids),
                        "completion_tokens": len(turn.completion_ids), "finish_reason": turn.finish_reason.value})
        results = {m.tool_call_id: m.content for m in (turns[i + 1].request_messages if i + 1 < len(turns) else ())
                   if m.role == "tool"}
        for call in turn.message.tool_calls:
            tool = client.start_span(f"tool {call.name}", trace_id=trace_id, parent_id=span.span_id,
                                     span_type="TOOL", inputs={"arguments": call.arguments})
            client.end_span(trace_id, tool.span_id, outputs={"result": results.get(call.id)})
        client.end_span(trace_id, span.span_id, outputs=turn.message.to_openai())
    client.end_trace(trace_id, outputs={"rewards": list(traj.rewards), "status": traj.status.value,
                                        "error": traj.error, "metrics": dict(r.metrics)},
                     status="OK" if traj.error is None else "ERROR")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def flush() -> None:
    import mlflow

    mlflow.flush_trace_async_logging()
