"""Async mode on a real run: the staleness bound holds, stale groups are dropped and counted;
the documented metric names, rollout traces and checkpoint artifacts land in a local MLflow
store; `turnwise show` prints the step's trajectories."""

import asyncio
import json
from pathlib import Path

from test_train_resume import small_config
from turnwise.cli import main as cli_main
from turnwise.track import flatten_params
from turnwise.train.async_loop import train
from turnwise.train.job import make_logger

METRICS = [
    "reward/mean", "reward/zero_frac", "rollout/turns",
    "rollout/response_tokens_max", "train/zero_adv_groups", "train/tokens",
    "train/trajectories", "loss/clip_frac", "loss/approx_kl", "loss/entropy", "rollout/tool_calls",
    "rollout/tool_error_frac", "rollout/stop_final", "speed/sample_s", "speed/train_s", "speed/step_s",
    "speed/tokens_per_s", "train/logprob_mismatch", "rollout/prefill_tokens", "rollout/sample_tokens",
    "train/dropped_stale", "train/staleness", "train/staleness_max",
    "reward/val", "reward/val_pass_at_1", "reward/val_pass_at_2",
]


async def straggling_agent(task, client, ctx):
    """One model call, then a tool call that is 10x slow for one task on its first run."""
    messages = [{"role": "user", "content": task["question"]}]
    r = await client.chat.completions.create(model=ctx.model, messages=messages, **ctx.inference_params)
    slow = task["id"] == "t1" and not straggling_agent.done.get(task["id"])
    straggling_agent.done[task["id"]] = True
    await asyncio.sleep(8.0 if slow else 0.05)  # far longer than a tiny step, even on a loaded machine
    text = r.choices[0].message.content or ""
    return {"reward": min(1.0, len(text) / 30),
            "metrics": {"rollout/tool_calls": 2, "rollout/tool_errors": 1, "rollout/stop/final": 1}}


straggling_agent.done = {}


def test_async_staleness_bound_metrics_traces_and_show(tmp_path: Path, capsys):
    rows = (tmp_path / "train.jsonl")
    cfg = small_config(tmp_path, **{"async_config.max_steps_off_policy": 1, "max_steps": 5, "val_every": 0,
                                    "tracking.mlflow": True, "tracking.traces": True, "output_dir": tmp_path / "runs",
                                    "val_group_size": 2, "save_every": 5, "max_epochs": 3})
    val = tmp_path / "val.jsonl"
    val.write_text("\n".join(rows.read_text().splitlines()[:2]) + "\n")
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"val_path": str(val)})})
    run_dir = tmp_path / "runs" / "async"
    run_dir.mkdir(parents=True)
    logger = make_logger(cfg, run_dir, "async")
    logger.log_params(flatten_params(cfg.model_dump(mode="json")))
    try:
        result = train(cfg, straggling_agent, run_dir, logger)
    finally:
        logger.close()
    assert result.steps == 5
    rows_ = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows_ if "train/staleness_max" in r]
    assert len(steps) == 5
    assert all(r["train/staleness_max"] <= 1 for r in steps)  # the bound holds on what trained
    assert any(r["train/staleness_max"] == 1 for r in steps)  # sampling overlapped training
    assert sum(r["train/dropped_stale"] for r in steps) >= 1  # the straggler came back too stale
    # every trained token is at most one version behind the weights that trained on it
    for r in steps:
        version_after = r["train/policy_version"]
        for line in (run_dir / "rollouts" / f"step_{r['step']:05d}.jsonl").read_text().splitlines():
            assert all(version_after - 1 - v <= 1 for v in json.loads(line)["versions"])
    assert steps[0]["rollout/tool_error_frac"] == 0.5 and steps[0]["rollout/tool_calls"] == 2

    from mlflow.tracking import MlflowClient

    from turnwise.track import MlflowLogger

    backend = logger.find(MlflowLogger)
    client = MlflowClient(backend.tracking_uri)
    mlflow_run = client.get_run(backend.run_id)
    missing = [m for m in METRICS if m not in mlflow_run.data.metrics]
    assert not missing, missing
    assert mlflow_run.data.params["async_config.max_steps_off_policy"] == "1"
    traces = client.search_traces(locations=[mlflow_run.info.experiment_id], max_results=500)
    assert len(traces) == 5 * 2 * 2  # every training rollout (2 groups a step: all of them)
    assert any(s.name.startswith("turn") for s in traces[0].data.spans)
    artifacts = {a.path for a in client.list_artifacts(mlflow_run.info.run_id, "checkpoints/step_00005")}
    assert "checkpoints/step_00005/model.safetensors" in artifacts
    assert (run_dir / "checkpoints" / "final" / "config.json").is_file()

    assert cli_main(["show", str(run_dir), "--step", "2", "--limit", "1"]) == 0
    out = capsys.readouterr().out
    assert "=== rollout 0" in out and "[user]" in out and "[assistant]" in out and "reward [" in out
