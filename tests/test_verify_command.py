"""`turnwise verify CONFIG`: config, task file, production schema file, report, --json, exit codes.

The policy is the scripted one of `verify_envs.policy` (a real model is the slow test's job)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import yaml

from turnwise import cli
from turnwise.config import load_config
from turnwise.eval import command_verify
from verify_envs import notes
from verify_envs.policy import CHAT, scripted_policy


@pytest.fixture
def job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    @contextlib.contextmanager
    def policy(cfg):
        yield scripted_policy(), CHAT

    monkeypatch.setattr(command_verify, "job_policy", policy)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in notes.TASKS))
    (tmp_path / "production_tools.json").write_text(json.dumps(notes.TOOLBOX.schemas()))
    config = {"seed": 0, "data": {"train_path": "train.jsonl"}, "agent": {"function": "verify_envs.notes:agent"},
              "verify": {"tasks": 3, "concurrency": 6, "production_schemas": "production_tools.json",
                         "oracle_agent": "verify_envs.notes:oracle"}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "job.yaml"


def test_clean_environment_exits_0_with_a_readable_report(job: Path, capsys):
    assert cli.main(["verify", str(job)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("turnwise verify: 3 tasks, 6 concurrent rollouts\n")
    for line in ("PASS  reproducibility  3 tasks replayed: 6 tool responses, 3 final states identical",
                 "PASS  isolation        6 concurrent rollouts match their solo runs; no temp files left",
                 "PASS  schema           2 tools match production",
                 "PASS  reward/oracle    oracle reaches 1 on all 3 tasks"):
        assert line in out, out
    assert out.rstrip().endswith("verify: OK")


def test_a_failing_check_exits_1_and_json_names_task_tool_and_diff(job: Path, capsys):
    args = ["verify", str(job), "--json", "--set", "agent.function=verify_envs.notes:agent_nondeterministic"]
    assert cli.main(args) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and len(report["tasks"]) == 3
    repro = next(c for c in report["checks"] if c["name"] == "reproducibility")
    assert repro["status"] == "fail"
    first = repro["findings"][0]
    assert first["task"] == report["tasks"][0] and first["tool"] == "add_note"
    assert first["where"].startswith("turn 1, call 0")
    assert any(d.startswith("$.created: ") for d in first["diff"])


def test_production_schema_path_is_relative_to_the_config_and_config_errors_exit_2(job: Path, capsys):
    cfg = load_config(job)
    assert cfg.verify.production_schemas == str(job.parent / "production_tools.json")
    assert cfg.verify.concurrency == 6 and cfg.verify.null_agent is None
    assert cli.main(["verify", str(job), "--set", "verify.oracle_agent=verify_envs.notes:nope"]) == 2
    assert "verify.oracle_agent" in capsys.readouterr().err
    assert cli.main(["verify", str(job), "--set", "verify.production_schemas=/nonexistent.json"]) == 2
    assert "file not found" in capsys.readouterr().err
