"""End to end: two tiny RL steps of the demo job on CPU, through the real runtime server."""

import json
import sqlite3
from pathlib import Path

import torch
from safetensors.torch import load_file

from turnwise.config import load_config
from turnwise.train.job import run_train

DEMO = Path(__file__).parent.parent / "examples" / "support_desk" / "config.yaml"


def test_two_steps_record_trajectories_and_change_weights(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(Path(__file__).parent.parent)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    train = tmp_path / "train.jsonl"
    val = tmp_path / "val.jsonl"
    rows = (DEMO.parent / "data" / "train.jsonl").read_text().splitlines()
    train.write_text("\n".join(rows[:4]) + "\n")
    val.write_text("\n".join(rows[4:6]) + "\n")
    demos = tmp_path / "demos.jsonl"
    demos.write_text("\n".join((DEMO.parent / "data" / "demos.jsonl").read_text().splitlines()[:8]) + "\n")
    cfg = load_config(DEMO, [
        f"output_dir={tmp_path / 'runs'}", f"data.train_path={train}", f"data.val_path={val}",
        f"warm_start.demos_path={demos}", "warm_start.epochs=1", "warm_start.batch_size=4",
        "global_batch_size=2", "group_size=2", "max_steps=2", "val_every=1", "sampling_max_tokens=16",
        "tracking.progress=false", "agent.function=e2e_agent:agent",
        'runtime.api_keys=["key-of-this-run-0123"]',
    ])
    result, summary = run_train(cfg)

    assert result.steps == 2
    run_dir = result.run_dir
    # every rollout of both steps was recorded token-exactly, and rewarded
    db = sqlite3.connect(run_dir / "trajectories.db")
    statuses = [s for (s,) in db.execute("select status from trajectories")]
    assert len(statuses) >= 2 * 2 * 2  # 2 steps x 2 tasks x 2 rollouts (+ validation)
    assert statuses.count("rewarded") + statuses.count("failed") == len(statuses)
    assert statuses.count("rewarded") >= 1
    steps = [json.loads(line) for line in (run_dir / "rollouts" / "step_00001.jsonl").read_text().splitlines()]
    assert len(steps) == 4 and all(s["status"] in ("rewarded", "failed") for s in steps)
    # the weights moved: warm start and RL
    start = load_file(run_dir / "checkpoints" / "warm_start" / "model.safetensors")
    final = load_file(run_dir / "checkpoints" / "final" / "model.safetensors")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(not torch.equal(start[k], final[k]) for k in start)

    # metrics under the documented names, in JSONL and in MLflow
    keys = set().union(*metrics)
    for name in ("reward/mean", "rollout/turns", "reward/val", "train/tokens",
                 "loss/clip_frac", "train/logprob_mismatch_max", "rollout/sample_tokens", "speed/step_s"):
        assert name in keys, name
    # every logged name is in the one table of metric names, and no alias is logged
    from turnwise.track.names import reduction

    assert not [k for k in keys - {"step"} if reduction(k) is None]
    assert not keys & {"loss/kl", "loss/policy", "loss/kl_ref", "rollout/reward/mean", "time/step", "warm_start/nll"}
    from mlflow.tracking import MlflowClient

    run = MlflowClient(summary["mlflow_tracking_uri"]).get_run(summary["mlflow_run_id"])
    assert "reward/mean" in run.data.metrics and run.data.params["group_size"] == "2"
    # the run's config keeps its key for resume, readable by its owner only; MLflow gets it masked
    assert (run_dir / "config.yaml").stat().st_mode & 0o777 == 0o600
    assert "key-of-this-run-0123" in (run_dir / "config.yaml").read_text()
    assert run.data.params["runtime.api_keys"] == "['***']"
    assert (run_dir / "reward_curve.png").stat().st_size > 0
