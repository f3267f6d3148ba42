"""`turnwise eval` against an OpenAI-compatible endpoint: a scripted support-desk model served on
loopback, a one-tool lookup agent (`lookup_agent.py`) and the real OpenAI SDK. The script makes the outcome
exact: order 1000 is always answered right, 2000 right on every other answer, 3000 looked up
with a wrong id and answered wrong, so successes are [4, 2, 0] of 4 trials."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
from fastapi import FastAPI, Request

from turnwise.cli import main
from turnwise.config import ConfigError, load_config
from turnwise.eval import compare, evaluate, render_table
from turnwise.rollout.agent import load_agent
from turnwise.runtime.server import RuntimeServer

ROOT = Path(__file__).parent.parent
SOP = {"delivered": "close", "in_transit": "wait", "damaged": "refund", "lost": "replace"}
TASKS = [
    {"id": "t0", "question": "Please check order 1000.", "order": {"order_id": "1000", "status": "lost"},
     "answer": {"order_id": "1000", "action": "replace"}},
    {"id": "t1", "question": "Please check order 2000.", "order": {"order_id": "2000", "status": "damaged"},
     "answer": {"order_id": "2000", "action": "refund"}},
    {"id": "t2", "question": "Please check order 3000.", "order": {"order_id": "3000", "status": "delivered"},
     "answer": {"order_id": "3000", "action": "close"}},
]


def scripted_app() -> FastAPI:
    app = FastAPI()
    answers: Counter[str] = Counter()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "scripted", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict:
        messages = (await request.json())["messages"]
        order = re.search(r"\d{4}", next(m["content"] for m in messages if m["role"] == "user")).group()
        if messages[-1]["role"] != "tool":
            arg = "9999" if order == "3000" else order
            message = {"role": "assistant", "content": None, "tool_calls": [{
                "id": "call_0", "type": "function",
                "function": {"name": "lookup_order", "arguments": json.dumps({"order_id": arg})}}]}
            finish = "tool_calls"
        else:
            result = json.loads(messages[-1]["content"])
            n = answers[order]
            answers[order] += 1
            right = order == "1000" or (order == "2000" and n % 2 == 0)
            action = SOP[result["status"]] if right and "status" in result else "escalate"
            message = {"role": "assistant",
                       "content": f'<final_output>{{"order_id": "{order}", "action": "{action}"}}</final_output>'}
            finish = "stop"
        return {"id": "x", "object": "chat.completion", "created": 0, "model": "scripted",
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25}}

    return app


@pytest.fixture()
def endpoint():
    with RuntimeServer(scripted_app()) as server:
        yield server.base_url + "/v1"


@pytest.fixture()
def config(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(ROOT)
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(t) + "\n" for t in TASKS))
    path = tmp_path / "job.yaml"
    path.write_text(f"output_dir: {tmp_path / 'runs'}\ndata: {{test_path: test.jsonl}}\n"
                    "agent: {function: 'lookup_agent:agent', rollout_timeout: 5}\n"
                    "tracking: {mlflow: false}\neval: {group_size: 4, bootstrap_samples: 200}\n")
    return path


def test_metrics_match_the_hand_computed_table(config, endpoint, tmp_path):
    result = evaluate(load_config(config), endpoint, tmp_path / "ev")
    m = result.metrics
    assert m["eval/exact_match"] == pytest.approx(0.5)
    assert m["eval/pass_hat_1"] == pytest.approx(0.5)
    assert m["eval/pass_hat_2"] == pytest.approx(7 / 18)
    assert m["eval/pass_hat_4"] == pytest.approx(1 / 3)
    assert m["eval/pass_at_2"] == pytest.approx((1 + 5 / 6 + 0) / 3)
    assert m["eval/pass_at_4"] == pytest.approx(2 / 3)
    assert m["eval/reward/mean"] == pytest.approx(0.5)
    assert m["eval/reward/std"] == pytest.approx(0.5)
    assert m["eval/agent_reward/mean"] == pytest.approx(0.5)
    assert m["eval/turns/mean"] == 2 and m["eval/tool_calls/mean"] == 1
    assert m["eval/tool_errors/frac"] == pytest.approx(1 / 3)  # order 3000 looked up as 9999
    assert m["eval/tokens/mean"] == 10 and m["eval/tokens/p95"] == 10
    assert m["eval/stop/answered"] == 1 and m["eval/failed/frac"] == 0
    assert 0 < m["eval/latency/p50"] <= m["eval/latency/p95"]
    # a line per task, with every trajectory's conversation
    lines = [json.loads(s) for s in result.tasks_path.read_text().splitlines()]
    assert sorted((r["task_id"], r["successes"]) for r in lines) == [("t0", 4), ("t1", 2), ("t2", 0)]
    conv = lines[0]["rollouts"][0]["messages"]
    assert [c["role"] for c in conv] == ["system", "user", "assistant", "tool", "assistant"]
    summary = json.loads(result.summary_path.read_text())
    assert summary["metrics"]["eval/exact_match"] == pytest.approx(0.5)
    assert "eval/pass_hat_2" in render_table(result)
    report = result.report_path.read_text()
    assert "![pass@k" in report and (result.out_dir / "pass_at_k.png").stat().st_size > 0


def test_gate_sets_the_exit_code(config, endpoint, tmp_path, capsys):
    base = ["eval", str(config), "--endpoint", endpoint]
    assert main([*base, "--out", str(tmp_path / "a"), "--set", "eval.gate.eval/exact_match=0.5",
                 "--set", "eval.gate.eval/tool_errors/frac=<= 0.5"]) == 0
    out = capsys.readouterr().out
    assert "gate: PASSED" in out and f"summary: {tmp_path / 'a' / 'summary.json'}" in out
    assert main([*base, "--out", str(tmp_path / "b"), "--set", "eval.gate.eval/pass_hat_4=0.34"]) == 1
    assert "eval/pass_hat_4 >= 0.34: 0.333  FAIL" in capsys.readouterr().out
    # an unknown metric fails before anything runs
    assert main([*base, "--out", str(tmp_path / "c"), "--set", "eval.gate.eval/accuracy=0.5"]) == 2
    assert not (tmp_path / "c").exists()


def test_compare_deltas_intervals_and_delta_gate(config, endpoint, tmp_path):
    cfg = load_config(config, ["eval.gate.delta/eval/exact_match=0", "eval.gate.eval/pass_at_4=>= 0.6"])
    result = compare(cfg, endpoint, endpoint, tmp_path / "cmp")
    d = result.deltas["eval/exact_match"]
    assert d.a == d.b == pytest.approx(0.5) and d.delta == pytest.approx(0) and (d.low, d.high) == (0, 0)
    assert result.passed and [c.metric for c in result.gate] == ["delta/eval/exact_match", "eval/pass_at_4"]
    table = render_table(result)
    assert "A (endpoint)" in table and "95% CI" in table
    saved = json.loads(result.summary_path.read_text())
    assert saved["b"]["metrics"]["eval/exact_match"] == pytest.approx(0.5) and saved["passed"]
    failing = compare(load_config(config, ["eval.gate.delta/eval/exact_match=0.1"]), endpoint, endpoint,
                      tmp_path / "cmp2")
    assert not failing.passed


def test_crashing_and_hanging_agents_are_failures_with_reasons(config, endpoint, tmp_path):
    cfg = load_config(config, ["agent.rollout_timeout=2"])
    support_agent = load_agent(cfg.agent.function)

    async def flaky(task, client, ctx):
        if task["id"] == "t1":
            raise RuntimeError("boom")
        if task["id"] == "t2":
            await asyncio.sleep(60)
        return await support_agent(task, client, ctx)

    result = evaluate(cfg, endpoint, tmp_path / "ev", agent=flaky)
    m = result.metrics
    assert m["eval/failed/frac"] == pytest.approx(2 / 3)
    assert m["eval/stop/agent_error"] == pytest.approx(1 / 3) and m["eval/stop/timeout"] == pytest.approx(1 / 3)
    assert m["eval/exact_match"] == pytest.approx(1 / 3) and m["eval/pass_at_1"] == pytest.approx(1 / 3)
    errors = {json.loads(s)["task_id"]: json.loads(s)["rollouts"][0]["error"]
              for s in result.tasks_path.read_text().splitlines()}
    assert errors == {"t0": None, "t1": "RuntimeError: boom", "t2": "rollout timed out after 2s"}


def test_resume_after_an_interruption_runs_only_the_missing_tasks(config, endpoint, tmp_path):
    cfg = load_config(config, ["agent.concurrency=4"])  # one task at a time: t0, t1, t2 in order
    support_agent = load_agent(cfg.agent.function)
    seen: list[str] = []

    async def interrupted(task, client, ctx):
        if task["id"] == "t2":
            raise KeyboardInterrupt  # Ctrl-C while the third task runs
        return await support_agent(task, client, ctx)

    with pytest.raises(KeyboardInterrupt):
        evaluate(cfg, endpoint, tmp_path / "ev", agent=interrupted)
    saved = [json.loads(s)["task_id"] for s in (tmp_path / "ev" / "tasks.jsonl").read_text().splitlines()]
    assert saved == ["t0", "t1"]
    with pytest.raises(ConfigError, match="--resume"):
        evaluate(cfg, endpoint, tmp_path / "ev", agent=support_agent)
    with pytest.raises(ConfigError, match="group_size"):
        evaluate(load_config(config, ["eval.group_size=2"]), endpoint, tmp_path / "ev", resume=True)

    async def counting(task, client, ctx):
        seen.append(task["id"])
        return await support_agent(task, client, ctx)

    result = evaluate(cfg, endpoint, tmp_path / "ev", agent=counting, resume=True)
    assert seen == ["t2"] * 4
    assert result.n_tasks == 3 and result.metrics["eval/pass_hat_2"] == pytest.approx(7 / 18)


def test_resume_drops_a_line_cut_short(config, endpoint, tmp_path):
    cfg = load_config(config)
    full = evaluate(cfg, endpoint, tmp_path / "ev")
    shutil.copytree(tmp_path / "ev", tmp_path / "cut")
    lines = (tmp_path / "cut" / "tasks.jsonl").read_text().splitlines()
    (tmp_path / "cut" / "tasks.jsonl").write_text(lines[0] + "\n" + lines[1][:40])
    assert main(["eval", str(config), "--endpoint", endpoint, "--resume", str(tmp_path / "cut")]) == 0
    resumed = json.loads((tmp_path / "cut" / "summary.json").read_text())["metrics"]
    for name in ("eval/exact_match", "eval/pass_at_2", "eval/pass_hat_4", "eval/tool_errors/frac"):
        assert resumed[name] == pytest.approx(full.metrics[name])
    assert len((tmp_path / "cut" / "tasks.jsonl").read_text().splitlines()) == 3
