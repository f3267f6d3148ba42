import numpy as np
import pytest

from turnwise.algo.passk import mean_pass_at_k, mean_pass_hat_k, pass_at_k, pass_hat_k
from turnwise.eval.records import EvalRollout, Outcome, TurnView, grade_rollout
from turnwise.eval.stats import EvalTable, check_gate, compare_tables, parse_threshold, summarize
from turnwise.types import FailureKind, Message, ToolCall


def test_pass_hat_k_table_from_the_issue():
    # successes [4, 2, 0] of 4 trials
    assert mean_pass_hat_k([4, 2, 0], 4, 1) == pytest.approx(0.5)
    assert mean_pass_hat_k([4, 2, 0], 4, 2) == pytest.approx(7 / 18)
    assert mean_pass_hat_k([4, 2, 0], 4, 4) == pytest.approx(1 / 3)


def test_pass_at_k_by_hand():
    assert pass_at_k(4, 2, 1) == pytest.approx(0.5)
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)  # 1 - C(2,2)/C(4,2)
    assert pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(4, 1, 4) == 1.0
    assert mean_pass_at_k([4, 2, 0], 4, 1) == pytest.approx(0.5)
    assert pass_hat_k(5, 3, 2) == pytest.approx(3 / 10)


def test_invalid_counts():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_hat_k(2, 1, 3)


# -- the evaluation table: tasks x trials of graded rollouts ------------------------------------


def rollout(task_id, success, *, tokens=10, latency=1.0, calls=1, errors=0, stop=Outcome.ANSWERED):
    failed = stop in (Outcome.AGENT_ERROR, Outcome.TIMEOUT)
    return EvalRollout(task_id=task_id, trial=0, trajectory_id="t", stop_reason=stop,
                       error="boom" if failed else None, score=float(success), success=success,
                       exact_match=float(success), agent_reward=None if failed else 1.0, turns=2,
                       tool_calls=calls, tool_errors=errors, completion_tokens=tokens, prompt_tokens=0,
                       latency_s=latency)


def table_420():
    """successes [4, 2, 0] of 4 trials (the issue's example)."""
    return [[rollout("a", True, tokens=10 * (i + 1), latency=float(i + 1)) for i in range(4)],
            [rollout("b", i < 2, errors=1) for i in range(4)],
            [rollout("c", False, stop=Outcome.TIMEOUT if i == 0 else Outcome.LENGTH) for i in range(4)]]


def test_summarize_by_hand():
    m = summarize(EvalTable.from_rollouts(table_420()), [1, 2, 4])
    assert m["eval/pass_hat_1"] == pytest.approx(0.5)
    assert m["eval/pass_hat_2"] == pytest.approx(7 / 18)
    assert m["eval/pass_hat_4"] == pytest.approx(1 / 3)
    assert m["eval/pass_at_2"] == pytest.approx((1 + 5 / 6) / 3)
    assert m["eval/pass_at_4"] == pytest.approx(2 / 3)
    assert m["eval/exact_match"] == pytest.approx(0.5) and m["eval/reward/std"] == pytest.approx(0.5)
    # tokens: 10, 20, 30, 40 and eight 10s -> mean 180/12; p95 by linear interpolation
    assert m["eval/tokens/mean"] == pytest.approx(15)
    assert m["eval/tokens/p95"] == pytest.approx(np.percentile([10, 20, 30, 40] + [10] * 8, 95))
    assert m["eval/latency/p50"] == pytest.approx(1.0)
    assert m["eval/tool_errors/frac"] == pytest.approx(4 / 12)
    assert m["eval/stop/answered"] == pytest.approx(8 / 12) and m["eval/stop/length"] == pytest.approx(3 / 12)
    assert m["eval/stop/timeout"] == pytest.approx(1 / 12) and m["eval/failed/frac"] == pytest.approx(1 / 12)
    assert m["eval/agent_reward/mean"] == pytest.approx(11 / 12)  # the failed rollout scores 0


def test_bootstrap_intervals_are_paired_over_tasks():
    a = EvalTable.from_rollouts(table_420())
    same = compare_tables(a, a, [1], samples=200, confidence=0.9)
    assert same["eval/pass_at_1"].delta == 0 and (same["eval/pass_at_1"].low, same["eval/pass_at_1"].high) == (0, 0)
    better = EvalTable.from_rollouts([[rollout(t, True) for _ in range(4)] for t in "abc"])
    d = compare_tables(a, better, [1], samples=200, confidence=0.9)["eval/pass_at_1"]
    assert d.a == pytest.approx(0.5) and d.b == 1 and d.delta == pytest.approx(0.5)
    assert 0 < d.low <= d.delta <= d.high <= 1  # every task gains or stays: the interval excludes 0
    assert compare_tables(a, better, [1], samples=0, confidence=0.9)["eval/pass_at_1"].low is None


def test_gate_thresholds():
    assert parse_threshold(0.5) == (">=", 0.5)
    assert parse_threshold("<= 2.5") == ("<=", 2.5)
    assert parse_threshold(">1e-3") == (">", 0.001)
    with pytest.raises(ValueError):
        parse_threshold("about 3")
    checks = check_gate({"eval/exact_match": 0.5, "eval/latency/p95": "< 2"},
                        {"eval/exact_match": 0.5, "eval/latency/p95": 2.0})
    assert [c.passed for c in checks] == [True, False]
    with pytest.raises(KeyError):
        check_gate({"eval/nope": 1}, {})


def test_grading_ignores_the_training_reward():
    final = Message(role="assistant", content='<final_output>{"order_id": "1", "action": "refund"}</final_output>')
    call = Message(role="assistant", tool_calls=(ToolCall("c0", "lookup_order", "{}"),))
    tool = Message(role="tool", content='{"error": "not found"}', tool_call_id="c0")
    turns = [TurnView((), call, "tool_calls", 3, 5),
             TurnView((Message(role="user", content="q"), call, tool), final, "stop", 4, 9)]
    kw = dict(task_id="x", trial=0, trajectory_id="t", turns=turns, agent_metrics={}, latency_s=0.1,
              success_threshold=1.0)
    # the agent claims reward 1 (a gamed reward); strict exact match says no
    r = grade_rollout(error=None, failure=None, agent_reward=1.0, answer={"order_id": "1", "action": "replace"},
                      grader="exact_match", **kw)
    assert (r.score, r.success, r.exact_match, r.agent_reward) == (0.0, False, 0.0, 1.0)
    assert (r.turns, r.tool_calls, r.tool_errors, r.completion_tokens) == (2, 1, 1, 7)
    assert r.stop_reason is Outcome.ANSWERED and r.messages[-1]["content"] == final.content
    half = grade_rollout(error=None, failure=None, agent_reward=0.0, answer={"order_id": "1", "action": "replace"},
                         grader="field_accuracy", **kw)
    assert half.score == pytest.approx(0.1 + 0.9 * 0.5) and not half.success
    crashed = grade_rollout(error="rollout timed out after 3s", failure=FailureKind.AGENT_TIMEOUT, agent_reward=None, answer={"a": 1},
                            grader="exact_match", **kw)
    assert crashed.stop_reason is Outcome.TIMEOUT and crashed.failed and crashed.score == 0
    assert EvalRollout.from_json(crashed.to_json()) == crashed
