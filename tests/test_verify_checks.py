"""`turnwise verify` on a small notes environment: a clean one passes; a non-deterministic tool,
a leaking environment, leftover temp files, schema drift and a generous null reward are caught,
each naming the task, the tool and the diff."""

from __future__ import annotations

import asyncio
import copy
import re

from turnwise.config import JobConfig
from turnwise.eval.verify import CheckStatus, VerifyReport, verify_environment
from turnwise.types import Task
from verify_envs import notes
from verify_envs.policy import CHAT, scripted_policy

TASKS = [Task(id=r["id"], row=r) for r in notes.TASKS]


def verify(agent=notes.agent, **kwargs) -> VerifyReport:
    kwargs.setdefault("concurrency", 8)
    return asyncio.run(verify_environment(agent, TASKS, policy=scripted_policy(), chat=CHAT,
                                          cfg=JobConfig(sampling_max_tokens=256), **kwargs))


def check(report: VerifyReport, name: str):
    return next(c for c in report.checks if c.name == name)


def test_clean_environment_passes_every_check():
    report = verify(production_schemas=notes.TOOLBOX.schemas(), oracle_agent=notes.oracle)
    assert report.ok, report.render()
    assert [c.status for c in report.checks] == [CheckStatus.PASS] * 5
    repro = check(report, "reproducibility")
    # 4 tasks x 2 tool calls were replayed and compared, and 4 final states
    assert repro.summary == "4 tasks replayed: 8 tool responses, 4 final states identical"
    assert repro.notes == ()
    assert check(report, "isolation").summary.startswith("8 concurrent rollouts match")
    assert report.render().endswith("verify: OK")


def test_non_deterministic_tool_fails_reproducibility_naming_task_tool_and_diff():
    report = verify(notes.agent_nondeterministic)
    assert not report.ok
    repro = check(report, "reproducibility")
    assert repro.status == CheckStatus.FAIL
    by_where = {(f.task, f.tool, f.where.split(",")[0]) for f in repro.findings}
    assert ("t0", "add_note", "turn 1") in by_where
    note = next(f for f in repro.findings if f.task == "t0" and f.tool == "add_note")
    assert any(d.startswith("$.created:") for d in note.diff)
    assert any(d.startswith("$.rank:") for d in note.diff)
    # list_notes echoes the noisy note, and the final state holds it
    assert any(f.tool == "list_notes" for f in repro.findings)
    assert any(f.where == "final state" and f.task == "t0" for f in repro.findings)
    # isolation cannot blame concurrency for what is already not reproducible
    assert check(report, "isolation").status == CheckStatus.SKIP


def test_leaking_environment_fails_isolation_but_replays_alone():
    report = verify(notes.agent_leaky, concurrency=8)
    assert check(report, "reproducibility").status == CheckStatus.PASS
    iso = check(report, "isolation")
    assert iso.status == CheckStatus.FAIL and not report.ok
    leak = next(f for f in iso.findings if f.tool == "list_notes")
    assert leak.task in {"t0", "t1", "t2", "t3"} and "rollout" in leak.where
    # other rollouts' notes show up in this one's list (how many depends on the interleaving)
    seen = re.fullmatch(r"\$: (\d+) items, expected 1", leak.diff[0])
    assert seen and 1 < int(seen.group(1)) <= 8, leak.diff
    assert any(d.startswith("$: unexpected item {") for d in leak.diff)
    assert "verify: FAILED (isolation)" in report.render()


def test_files_left_in_the_temp_dir_fail_isolation():
    report = verify(notes.agent_leaves_files, concurrency=4)
    iso = check(report, "isolation")
    assert iso.status == CheckStatus.FAIL
    left = [f.diff[0] for f in iso.findings if f.where == "temp dir"]
    assert any("notes-cache-" in d and "(task t0)" in d for d in left), left
    assert len(left) == 4 + 4 + 4  # first runs, replays, concurrent rollouts


def test_schema_drift_lists_each_difference_by_tool():
    production = copy.deepcopy(notes.TOOLBOX.schemas())
    production[0]["function"]["parameters"]["properties"]["text"]["maxLength"] = 200
    production[0]["function"]["parameters"]["required"].append("tags")
    production.append({"type": "function", "function": {"name": "delete_note", "description": "",
                                                         "parameters": {"type": "object", "properties": {}}}})
    report = verify(production_schemas=production)
    schema = check(report, "schema")
    assert schema.status == CheckStatus.FAIL and not report.ok
    by_tool = {f.tool: f.diff for f in schema.findings}
    assert set(by_tool) == {"add_note", "delete_note"}
    assert "$.function.parameters.properties.text.maxLength: missing" in by_tool["add_note"]
    assert "$.function.parameters.required: 1 items, expected 2" in by_tool["add_note"]
    assert by_tool["delete_note"] == ("in production, not offered by the environment",)
    assert check(report, "reproducibility").status == CheckStatus.PASS


def test_reward_sanity_flags_a_null_agent_that_scores_and_a_failing_oracle():
    async def wrong_oracle(task, client, ctx):
        return 0.0

    report = verify(null_agent=notes.generous_null, oracle_agent=wrong_oracle)
    null, oracle = check(report, "reward/null"), check(report, "reward/oracle")
    assert null.status == oracle.status == CheckStatus.FAIL
    assert null.findings[0].task == "t0" and null.findings[0].diff == ("null agent scored 1, expected 0",)
    assert oracle.findings[0].diff == ("oracle scored 0, below success_threshold 1",)
    # the default null agent (the job's agent, silent policy) scores 0: see the clean test
