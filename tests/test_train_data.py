import json
from pathlib import Path

import pytest

from turnwise.rollout.agent import AgentLoadError, BadReward, as_agent_result, load_agent
from turnwise.rollout.tasks import TaskFileError, batches, load_tasks
from turnwise.types import AgentResult


def test_load_jsonl_and_csv(tmp_path: Path):
    (tmp_path / "t.jsonl").write_text('{"id": "a", "q": 1}\n\n{"q": 2}\n')
    tasks = load_tasks(tmp_path / "t.jsonl")
    assert [t.id for t in tasks] == ["a", "1"]
    assert tasks[0].row["q"] == 1
    (tmp_path / "t.csv").write_text("id,q\nx,hello\n")
    assert load_tasks(tmp_path / "t.csv")[0].row == {"id": "x", "q": "hello"}


@pytest.mark.parametrize(("text", "message"), [
    ('{"id": 1}\n{bad\n', "t.jsonl:2: not valid JSON"),
    ('[1, 2]\n', "t.jsonl:1: each line must be a JSON object"),
    ('{"id": 1}\n{"id": 1}\n', "duplicate task id '1'"),
    ("", "no tasks"),
])
def test_bad_task_files(tmp_path: Path, text: str, message: str):
    (tmp_path / "t.jsonl").write_text(text)
    with pytest.raises(TaskFileError, match=message):
        load_tasks(tmp_path / "t.jsonl")


def test_batches_are_a_function_of_seed_and_step(tmp_path: Path):
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"id": i}) + "\n" for i in range(10)))
    tasks = load_tasks(tmp_path / "t.jsonl")
    full = [[t.id for t in b] for _, b in batches(tasks, 3, seed=1, shuffle=True, max_epochs=2)]
    assert len(full) == 6 and all(len(b) == 3 for b in full)
    resumed = [[t.id for t in b] for _, b in batches(tasks, 3, seed=1, shuffle=True, max_epochs=2, start_step=4)]
    assert resumed == full[4:]
    assert full[:3] != full[3:]  # epochs are reshuffled


def test_as_agent_result():
    assert as_agent_result(1) == AgentResult((1.0,), {})
    assert as_agent_result([0.5, 1.0]) == AgentResult((0.5, 1.0), {})
    assert as_agent_result({"reward": 0.0, "metrics": {"tool_calls": 2}}) == AgentResult((0.0,), {"tool_calls": 2.0})
    assert as_agent_result({"reward": 1, "state": {"k": 1}}).state == {"k": 1}
    for bad in (None, True, "1", [], [float("nan")], {"metrics": {}}):
        with pytest.raises(BadReward):
            as_agent_result(bad)


def test_load_agent_errors():
    with pytest.raises(AgentLoadError, match="must look like"):
        load_agent("no_colon")
    with pytest.raises(AgentLoadError, match="cannot import"):
        load_agent("not_a_module_xyz:agent")
    with pytest.raises(AgentLoadError, match="has no function"):
        load_agent("json:nope")
    with pytest.raises(AgentLoadError, match="must be an async function"):
        load_agent("json:dumps")
    assert load_agent("examples.support_desk.agent:agent").__name__ == "agent"
