"""A step's rollouts in MLflow: a table of every rollout, and traces of the first groups with the
real durations of each turn and tool call, the final output, expected answer, reward and verdict."""

from __future__ import annotations

import json
import os
from pathlib import Path

from turnwise.track import MlflowLogger, TraceOptions
from turnwise.track.traces import rollout_table
from turnwise.types import (
    FailureKind,
    FinishReason,
    Group,
    Message,
    RolloutResult,
    Task,
    ToolCall,
    Trajectory,
    TrajectoryStatus,
    Turn,
)

T0 = 1_700_000_000.0


def _rollout(task: Task, n: int, reward: float | None, failed: bool = False) -> RolloutResult:
    user = Message("user", task.row["question"])
    call = ToolCall("c1", "lookup_order", '{"id": "A1"}')
    first = Turn(0, (1, 2), (3,), (-0.1,), 0, FinishReason.STOP, Message("assistant", "", (call,)),
                 request_messages=(user,), started_at=T0 + n, ended_at=T0 + n + 0.25)
    second = Turn(1, (1, 2, 3), (4,), (-0.2,), 0, FinishReason.STOP, Message("assistant", "refund"),
                  request_messages=(user, first.message, Message("tool", "delivered", tool_call_id="c1")),
                  started_at=T0 + n + 1.0, ended_at=T0 + n + 1.5)
    status = TrajectoryStatus.FAILED if failed else TrajectoryStatus.REWARDED
    traj = Trajectory(f"traj-{task.id}-{n}", "job", status, (first, second),
                      rewards=() if reward is None else (reward,), failure=FailureKind.AGENT_ERROR if failed else None,
                      error="boom" if failed else None)
    return RolloutResult(task, traj, seconds=1.6, metrics={"tool_errors": 0.0})


def _groups() -> list[Group]:
    a = Task("t-a", {"question": "where is A1?", "answer": "refund"})
    b = Task("t-b", {"question": "and B2?", "answer": "close"})
    return [Group(a, (_rollout(a, 0, 1.0), _rollout(a, 1, 0.0))), Group(b, (_rollout(b, 2, None, failed=True),))]


def test_the_table_has_a_row_per_rollout_with_output_expected_and_verdict():
    table = rollout_table(_groups(), TraceOptions(success_threshold=1.0))
    assert table["task_id"] == ["t-a", "t-a", "t-b"]
    assert table["final_output"][0] == "refund" and table["expected"][0] == "refund"
    assert table["reward"] == [1.0, 0.0, None]
    assert table["verdict"] == ["pass", "fail", "failed: agent_error"]
    assert table["turns"] == [2, 2, 2] and table["task"][0] == "where is A1?"


def test_traces_of_the_first_groups_with_real_durations_and_a_table(tmp_path: Path):
    import mlflow

    logger = MlflowLogger(f"sqlite:///{tmp_path / 'mlflow.db'}", "t", "run",
                          trace_options=TraceOptions(groups_per_step=1), artifact_location=(tmp_path / "art").as_uri())
    logger.log_rollouts(3, _groups())
    logger.close()
    assert "MLFLOW_TRACKING_URI" not in os.environ  # later jobs of this process keep their own store
    traces = mlflow.search_traces(locations=[logger.experiment_id], return_type="list")
    assert len(traces) == 2  # the first group only
    trace = min(traces, key=lambda t: t.info.request_time)
    spans = {s.name: s for s in trace.data.spans}
    assert set(spans) == {"rollout", "turn 0", "tool lookup_order", "turn 1"}
    seconds = {name: (s.end_time_ns - s.start_time_ns) / 1e9 for name, s in spans.items()}
    assert abs(seconds["turn 0"] - 0.25) < 1e-3 and abs(seconds["turn 1"] - 0.5) < 1e-3
    assert abs(seconds["tool lookup_order"] - 0.75) < 1e-3  # from turn 0's reply to turn 1's request
    assert spans["tool lookup_order"].outputs == {"result": "delivered"}
    out = spans["rollout"].outputs
    assert out["verdict"] == "pass" and out["reward"] == 1.0 and out["expected"] == "refund"
    assert trace.info.tags["turnwise.step"] == "3"
    table = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=logger.run_id, artifact_path="rollouts/step_00003.json", tracking_uri=logger.tracking_uri)).read_text())
    assert len(table["data"]) == 3 and "verdict" in table["columns"]
