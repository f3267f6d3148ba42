"""Failure policy, staleness, metric aggregation and the learning-rate schedule, on hand-built rollouts."""

import math

import pytest

from turnwise.train.backend import lr_lambda
from turnwise.train.metrics import apply_failure_policy, rollout_metrics, staleness
from turnwise.types import (
    FailureKind,
    FinishReason,
    Group,
    Message,
    RolloutResult,
    Task,
    Trajectory,
    TrajectoryStatus,
    Turn,
)


def rollout(task: Task, ok: bool = True, error: str | None = None, version: int = 3,
            failure: FailureKind | None = None, **metrics: float):
    turn = Turn(index=0, prompt_ids=(1, 2), completion_ids=(3, 4), logprobs=(-0.1, -0.2), version=version,
                finish_reason=FinishReason.STOP, message=Message(role="assistant", content="hi"))
    status = TrajectoryStatus.REWARDED if ok else TrajectoryStatus.FAILED
    traj = Trajectory(id=f"{task.id}-{id(turn)}", job_id="j", status=status, turns=(turn,),
                      rewards=(1.0,) if ok else (), error=error,
                      failure=None if ok else failure or FailureKind.AGENT_ERROR)
    return RolloutResult(task=task, trajectory=traj, seconds=0.1, metrics=metrics)


def groups():
    a, b, c = Task("a", {}), Task("b", {}), Task("c", {})
    return [Group(a, (rollout(a), rollout(a))),
            Group(b, (rollout(b), rollout(b, ok=False, error="rollout timed out after 5s",
                                                      failure=FailureKind.AGENT_TIMEOUT))),
            Group(c, (rollout(c, ok=False, error="ValueError: x"), rollout(c, ok=False, error="boom")))]


@pytest.mark.parametrize("policy,kept", [("keep", ["a", "b"]), ("drop", ["a"])])
def test_failure_policy_counts_every_decision(policy, kept):
    out, m = apply_failure_policy(groups(), policy)
    assert [g.task.id for g in out] == kept
    assert m["rollout/failed"] == 3 and m["rollout/timeouts"] == 1 and m["rollout/failed_frac"] == 0.5
    assert m["rollout/failed_timeout"] == 1 and m["rollout/failed_agent_error"] == 2
    assert m["train/groups_incomplete"] == 1 and m["train/groups_dropped_empty"] == 1
    assert m["train/groups_dropped_incomplete"] == (1 if policy == "drop" else 0)


def test_staleness_is_versions_behind_the_oldest_token():
    t = Task("a", {})
    g = Group(t, (rollout(t, version=5), rollout(t, version=3)))
    assert staleness(g, 6) == 3 and staleness(g, 3) == 0


def test_agent_metrics_aggregate_under_documented_names():
    t = Task("a", {})
    g = Group(t, (rollout(t, **{"rollout/tool_calls": 4, "rollout/tool_errors": 1, "rollout/stop/final_answer": 1}),
                  rollout(t, tool_calls=0, tool_errors=0, **{"stop/max_turns": 1}), rollout(t, ok=False)))
    m = rollout_metrics([g], success_threshold=1.0)
    assert m["rollout/tool_calls"] == pytest.approx(4 / 3)
    assert m["rollout/tool_error_frac"] == 0.25
    assert m["rollout/stop_final_answer"] == pytest.approx(1 / 3) and m["rollout/stop_failed"] == pytest.approx(1 / 3)
    assert m["reward/mean"] == pytest.approx(2 / 3) and m["reward/pass_rate"] == pytest.approx(2 / 3)


def test_learning_rate_schedules_warm_up_then_decay():
    for name in ("constant", "linear", "cosine"):
        f = lr_lambda(name, warmup_steps=4, total_steps=14)
        assert [f(n) for n in range(4)] == [0.2, 0.4, 0.6, 0.8]
        assert f(4) == 1.0
    assert lr_lambda("constant", 4, 14)(13) == 1.0
    assert lr_lambda("linear", 4, 14)(9) == pytest.approx(0.5) and lr_lambda("linear", 4, 14)(14) == 0.0
    assert lr_lambda("cosine", 4, 14)(9) == pytest.approx(0.5) and lr_lambda("cosine", 0, 10)(10) == pytest.approx(
        0.5 * (1 + math.cos(math.pi)))
