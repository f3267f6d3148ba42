"""`turnwise eval --compare base CHECKPOINT` on the built-in tiny model, through the embedded runtime."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from turnwise.cli import main
from turnwise.config import load_config
from turnwise.policy.tiny import tiny_model_dir

ROOT = Path(__file__).parent.parent
DEMO = ROOT / "examples" / "support_desk" / "config.yaml"

CRASHING_AGENT = '''
from examples.support_desk.agent import agent as support_agent

async def agent(task, client, ctx):
    if task["id"] == "test-0001":
        raise ValueError("tool backend down")
    return await support_agent(task, client, ctx)
'''


@pytest.mark.slow
def test_compare_base_with_a_checkpoint_logs_named_mlflow_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    (tmp_path / "crashing_agent.py").write_text(CRASHING_AGENT)
    monkeypatch.syspath_prepend(str(tmp_path))
    checkpoint = tiny_model_dir(load_config(DEMO).model)  # the base model's own HF dir, as a checkpoint
    out = tmp_path / "cmp"
    rc = main(["eval", str(DEMO), "--compare", "base", str(checkpoint), "--out", str(out),
               "--set", f"output_dir={tmp_path / 'runs'}", "--set", "eval.max_tasks=3",
               "--set", "eval.group_size=2", "--set", "eval.max_tokens=8", "--set", "eval.bootstrap_samples=50",
               "--set", "agent.function=crashing_agent:agent", "--set", "eval.gate.eval/failed/frac=<= 0.5"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "base" in printed and "fine-tuned" in printed and f"summary: {out / 'comparison.json'}" in printed
    summary = json.loads((out / "comparison.json").read_text())
    for side in ("a", "b"):
        m = summary[side]["metrics"]
        assert m["eval/failed/frac"] == 1 / 3 and m["eval/stop/agent_error"] == 1 / 3
        assert m["eval/tokens/mean"] > 0 and "eval/exact_match" in m
    assert set(summary["deltas"]) >= {"eval/exact_match", "eval/pass_at_2", "eval/pass_hat_2"}
    # token-exact trajectories of the local model, and the crash with its reason
    lines = [json.loads(s) for s in (out / "b" / "tasks.jsonl").read_text().splitlines()]
    crashed = next(r for r in lines if r["task_id"] == "test-0001")["rollouts"]
    assert {r["error"] for r in crashed} == {"ValueError: tool backend down"}
    ok = next(r for r in lines if r["task_id"] == "test-0000")["rollouts"][0]
    db = sqlite3.connect(out / "b" / "trajectories.db")
    assert db.execute("select count(*) from turns where trajectory_id=?", (ok["trajectory_id"],)).fetchone()[0] >= 1
    assert (out / "report.md").read_text().count("tool backend down") >= 1
    assert (out / "pass_at_k.png").stat().st_size > 0
    # one MLflow run per model, named as the demo expects
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("turnwise").experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    assert set(by_name) == {"eval: base", "eval: fine-tuned", "compare: base vs fine-tuned"}
    assert by_name["eval: fine-tuned"].data.metrics["eval/failed/frac"] == 1 / 3
    assert by_name["eval: fine-tuned"].data.tags["turnwise.kind"] == "eval"
    cmp = by_name["compare: base vs fine-tuned"]
    assert cmp.data.metrics["delta/eval/exact_match"] == summary["deltas"]["eval/exact_match"]["delta"]
    assert cmp.data.metrics["delta_low/eval/exact_match"] <= cmp.data.metrics["delta_high/eval/exact_match"]
    assert cmp.data.tags["turnwise.eval_run_b"] == by_name["eval: fine-tuned"].info.run_id
    assert "comparison_table.json" in {a.path for a in client.list_artifacts(cmp.info.run_id)}
