"""Exact resume and SIGTERM: a run stopped by SIGTERM checkpoints, and resuming it draws the
same next batch and reaches the same weights as the uninterrupted run (fixed seed, CPU): bit for
bit when rollouts are sampled one at a time, to float noise when they are batched concurrently."""

import json
import os
import signal
from pathlib import Path

import pytest
from safetensors.torch import load_file

from turnwise.config import load_config
from turnwise.track import JsonlLogger
from turnwise.train.checkpoint import latest_checkpoint
from turnwise.train.loop import train

DEMO = Path(__file__).parent.parent / "examples" / "support_desk" / "config.yaml"


def seeded_agent(sigterm_at_call: int | None = None):
    """Two model calls per rollout, each seeded by (task, member), so rollouts are reproducible."""
    seen: dict[str, int] = {}
    calls = [0]

    async def agent(task, client, ctx):
        member = seen.get(task["id"], 0)
        seen[task["id"]] = member + 1
        seed = 1000 * member + sum(map(ord, str(task["id"])))
        calls[0] += 1
        if calls[0] == sigterm_at_call:
            os.kill(os.getpid(), signal.SIGTERM)
        messages = [{"role": "user", "content": task["question"]}]
        r = await client.chat.completions.create(model=ctx.model, messages=messages, seed=seed,
                                                 **ctx.inference_params)
        text = r.choices[0].message.content or ""
        messages += [{"role": "assistant", "content": text}, {"role": "user", "content": "More?"}]
        r = await client.chat.completions.create(model=ctx.model, messages=messages, seed=seed + 1,
                                                 **ctx.inference_params)
        return min(1.0, len(text + (r.choices[0].message.content or "")) / 60)

    return agent


def small_config(tmp_path: Path, **extra: object):
    rows = (DEMO.parent / "data" / "train.jsonl").read_text().splitlines()
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("\n".join(json.dumps({**json.loads(r), "id": f"t{i}"}) for i, r in enumerate(rows[:4])))
    overrides = [f"data.train_path={train_file}", "data.val_path=null", "data.test_path=null",
                 "warm_start.demos_path=null", "global_batch_size=2", "group_size=2", "max_steps=2",
                 "sampling_max_tokens=8", "tracking.progress=false", "tracking.mlflow=false",
                 "learning_rate=1e-3", "micro_batch_size=8"]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return load_config(DEMO, overrides)


def run(cfg, agent, run_dir: Path):
    run_dir.mkdir(parents=True, exist_ok=True)
    logger = JsonlLogger(run_dir / "metrics.jsonl")
    try:
        return train(cfg, agent, run_dir, logger)
    finally:
        logger.close()


def task_ids(run_dir: Path, step: int) -> list[str]:
    lines = (run_dir / "rollouts" / f"step_{step:05d}.jsonl").read_text().splitlines()
    return [json.loads(line)["task_id"] for line in lines]


@pytest.mark.parametrize("concurrency", [1, 8])
def test_sigterm_checkpoints_and_resume_matches_uninterrupted_run(tmp_path: Path, concurrency: int):
    cfg = small_config(tmp_path, **{"agent.concurrency": concurrency})
    full = run(cfg, seeded_agent(), tmp_path / "full")
    assert full.steps == 2 and not full.interrupted

    # SIGTERM during step 1's rollouts: step 1 finishes, a checkpoint is written, the run stops
    cut = run(cfg, seeded_agent(sigterm_at_call=1), tmp_path / "cut")
    assert cut.interrupted and cut.steps == 1
    ckpt = latest_checkpoint(tmp_path / "cut")
    assert ckpt is not None and ckpt.name == "step_00001"
    assert (ckpt / "trainer_state.pt").is_file() and (ckpt / "model" / "model.safetensors").is_file()
    assert not (tmp_path / "cut" / "checkpoints" / "final").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored

    resumed = run(cfg, seeded_agent(), tmp_path / "cut")
    assert resumed.start_step == 1 and resumed.steps == 2 and not resumed.interrupted
    assert task_ids(tmp_path / "cut", 2) == task_ids(tmp_path / "full", 2)
    a = load_file(tmp_path / "full" / "checkpoints" / "step_00002" / "model" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "checkpoints" / "step_00002" / "model" / "model.safetensors")
    start = load_file(ckpt / "model" / "model.safetensors")
    moved = max(float((b[k] - start[k]).abs().max()) for k in b)
    apart = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert moved > 5e-4, moved
    if concurrency == 1:  # one rollout at a time: the sampler batches identically, bit-exact weights
        assert apart == 0, apart
    else:  # concurrent rollouts are batched by arrival time, which moves logprobs by ~1e-7 and,
        # through Adam's normalization, a few weights by ~1e-5
        assert apart < 1e-4 and apart < moved / 20, (moved, apart)


def test_lora_with_kl_to_base_tis_and_schedule(tmp_path: Path):
    cfg = small_config(tmp_path, lora_rank=4, lora_alpha=8, kl_coef=0.1, tis_cap=2.0, num_substeps=2,
                       lr_schedule="cosine", lr_warmup_steps=1, max_steps=1)
    result = run(cfg, seeded_agent(), tmp_path / "lora")
    assert result.steps == 1
    ckpt = tmp_path / "lora" / "checkpoints"
    assert (ckpt / "step_00001" / "model" / "adapter_config.json").is_file()  # adapters only
    assert (ckpt / "final" / "config.json").is_file()  # merged into a full HF model
    rows = [json.loads(line) for line in (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in rows if "loss/kl_ref" in r)
    assert step["loss/kl_ref"] >= 0 and "loss/tis_weight_mean" in step and step["train/learning_rate"] > 0


class SigtermAtWarmStartBatch(JsonlLogger):
    """Sends SIGTERM once the warm start has logged batch `at`."""

    def __init__(self, path: Path, at: int) -> None:
        super().__init__(path)
        self.at = at

    def log_metrics(self, metrics, step):
        super().log_metrics(metrics, step)
        if step == self.at and any(k.startswith("warm_start/") for k in metrics):
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_during_the_warm_start_stops_after_the_batch_in_progress(tmp_path: Path):
    demos = (DEMO.parent / "data" / "demos.jsonl").read_text().splitlines()[:8]
    (tmp_path / "demos.jsonl").write_text("\n".join(demos))
    cfg = small_config(tmp_path, **{"warm_start.demos_path": tmp_path / "demos.jsonl", "warm_start.epochs": 500,
                                    "warm_start.batch_size": 4})  # 1,000 batches unless stopped
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    logger = SigtermAtWarmStartBatch(run_dir / "metrics.jsonl", at=3)
    try:
        result = train(cfg, seeded_agent(), run_dir, logger)
    finally:
        logger.close()
    assert result.interrupted and result.steps == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows if "warm_start/loss" in r) == 3
    assert latest_checkpoint(run_dir) is None and not (run_dir / "checkpoints" / "warm_start").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_two_runs_with_the_same_seed_sample_the_same_rollouts(tmp_path):
    """No request seeds: the runtime derives them from the job seed, the trajectory id (counted,
    not random) and the turn, so sequential dispatch reproduces the run; another seed does not."""
    async def agent(task, client, ctx):
        r = await client.chat.completions.create(model=ctx.model, messages=[{"role": "user", "content": task["question"]}],
                                                 **ctx.inference_params)
        return min(1.0, len(r.choices[0].message.content or "") / 60)

    def rollouts(name: str, seed: int) -> list[tuple[str, str, list[float]]]:
        cfg = small_config(tmp_path, max_steps=1, seed=seed, **{"agent.concurrency": 1})
        run(cfg, agent, tmp_path / name)
        lines = (tmp_path / name / "rollouts" / "step_00001.jsonl").read_text().splitlines()
        return [(r["task_id"], r["messages"][-1]["content"], r["rewards"]) for r in map(json.loads, lines)]

    first, again, other = rollouts("a", 0), rollouts("b", 0), rollouts("c", 1)
    assert first == again
    assert [m for _, m, _ in first] != [m for _, m, _ in other]
