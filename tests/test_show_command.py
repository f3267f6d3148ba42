"""`turnwise show`: a summary of the step, one representative rollout per task by default, filters,
and the expected answer beside the final output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from turnwise.cli import main


def _row(task: str, n: int, reward: float | None, status: str = "rewarded", failure: str | None = None) -> dict:
    verdict = f"failed: {failure}" if status != "rewarded" else ("pass" if reward == 1.0 else "fail")
    return {"task_id": task, "trajectory_id": f"traj-{n}", "status": status,
            "rewards": [] if reward is None else [reward], "error": "boom" if failure else None, "failure": failure,
            "verdict": verdict, "final_output": f"answer {n}", "expected": {"action": "refund"}, "turns": 1,
            "versions": [0], "metrics": {"tool_calls": 2, "tool_errors": 1},
            "messages": [{"role": "user", "content": f"question {task}"},
                         {"role": "assistant", "content": f"answer {n}"}]}


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    rows = [_row("t1", 0, 1.0), _row("t1", 1, 1.0), _row("t1", 2, 0.0),
            _row("t2", 3, 0.0), _row("t2", 4, None, "failed", "agent_timeout")]
    (tmp_path / "rollouts").mkdir()
    (tmp_path / "rollouts" / "step_00002.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_summary_then_one_rollout_per_task(run_dir: Path, capsys):
    assert main(["show", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "5 rollouts of 2 tasks: 2 pass, 2 fail, 1 failed: agent_timeout" in out
    assert "reward: mean 0.500   distribution 0: 2  1: 2" in out
    assert "failed by kind: agent_timeout 1" in out and "tool calls 10, tool errors 5" in out
    heads = [line for line in out.splitlines() if line.startswith("=== rollout")]
    assert len(heads) == 2 and "task t1  pass" in heads[0]  # t1's most common verdict
    assert 'expected:     {"action": "refund"}' in out and "final output: answer 0" in out


def test_filters(run_dir: Path, capsys):
    main(["show", str(run_dir), "--failed", "--all"])
    heads = [line for line in capsys.readouterr().out.splitlines() if line.startswith("=== rollout")]
    assert [h.split()[2] for h in heads] == ["2", "3", "4"]
    main(["show", str(run_dir), "--reward", "0", "--task", "t2", "--all"])
    heads = [line for line in capsys.readouterr().out.splitlines() if line.startswith("=== rollout")]
    assert len(heads) == 1 and "task t2  fail  reward [0]" in heads[0]
    assert main(["show", str(run_dir), "--task", "nope"]) != 0
    assert "no task 'nope'" in capsys.readouterr().err
