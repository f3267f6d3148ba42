"""One GRPO step, turnwise vs TRL's `GRPOTrainer`, on CPU, side by side in one run.

Same tiny model (the built-in one, from its HF directory), same prompts (support-desk questions,
one user turn), same batch (`--batch` prompts x `--group` completions), same completion limit,
same reward (reply length / 80), same optimizer (AdamW, lr 1e-5, fp32). We time
`--steps` steps after one warm-up step (TRL: from `on_step_begin` to `on_step_end`, generation
included; turnwise: `speed/step_s`, sampling through the runtime server included) and count
sampled tokens per second. Last line: `step_speedup_vs_trl: <TRL seconds per step / turnwise>`.

Needs the bench extra: `pip install -e '.[bench]'` (TRL pinned, installed without upgrading torch).

    .venv/bin/python bench/vs_trl.py [--batch 4] [--group 8] [--max-tokens 32] [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from turnwise.config import load_config
from turnwise.policy.load import resolve_model_dir
from turnwise.track import JsonlLogger
from turnwise.train.loop import train

DEMO = Path(__file__).parent.parent / "examples" / "support_desk" / "config.yaml"


def reward_of(text: str) -> float:
    return min(1.0, len(text) / 80)


async def agent(task, client, ctx):
    messages = [{"role": "user", "content": task["question"]}]
    r = await client.chat.completions.create(model=ctx.model, messages=messages, **ctx.inference_params)
    return reward_of(r.choices[0].message.content or "")


def questions(n: int) -> list[dict]:
    rows = [json.loads(line) for line in (DEMO.parent / "data" / "train.jsonl").read_text().splitlines()]
    return rows[:n]


def bench_turnwise(args: argparse.Namespace, work: Path) -> tuple[float, float]:
    tasks = work / "tasks.jsonl"
    tasks.write_text("\n".join(json.dumps(r) for r in questions(args.batch * (args.steps + 1))))
    cfg = load_config(DEMO, [
        f"data.train_path={tasks}", "data.val_path=null", "data.test_path=null", "warm_start.demos_path=null",
        f"global_batch_size={args.batch}", f"group_size={args.group}", f"max_steps={args.steps + 1}",
        f"sampling_max_tokens={args.max_tokens}", "learning_rate=1e-5", f"micro_batch_size={args.batch * args.group}",
        "tracking.progress=false", "tracking.mlflow=false", "val_every=0",
    ])
    run_dir = work / "turnwise"
    run_dir.mkdir()
    logger = JsonlLogger(run_dir / "metrics.jsonl")
    try:
        train(cfg, agent, run_dir, logger)
    finally:
        logger.close()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "speed/step_s" in r][1:]  # the first step warms up
    seconds = sum(r["speed/step_s"] for r in steps) / len(steps)
    tokens = sum(r["rollout/sample_tokens"] for r in steps) / len(steps)
    return seconds, tokens / seconds


def bench_trl(args: argparse.Namespace, work: Path) -> tuple[float, float]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    cfg = load_config(DEMO, [])
    model_dir = str(resolve_model_dir(cfg.model))
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": q["question"]}]}
                              for q in questions(args.batch * (args.steps + 1))])
    tokens_per_step: list[int] = []

    def reward(completions, **_):
        tokens_per_step.append(0)
        return [reward_of(c[0]["content"] if isinstance(c, list) else c) for c in completions]

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    config = GRPOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=args.batch * args.group,
        num_generations=args.group, max_completion_length=args.max_tokens, learning_rate=1e-5,
        max_steps=args.steps + 1, use_cpu=True, bf16=False, fp16=False, report_to=[], logging_steps=1,
        save_strategy="no", temperature=1.0, beta=0.0, seed=0, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model_dir, reward_funcs=reward, args=config, train_dataset=data,
                          callbacks=[Timer()])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h][1:]
    seconds = sum(times[1:]) / len(times[1:])
    mean_len = sum(h["completions/mean_length"] for h in logs) / max(1, len(logs))
    return seconds, mean_len * args.batch * args.group / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tw = bench_turnwise(args, Path(tmp))
        trl = bench_trl(args, Path(tmp))
    print(f"{'':10} {'s/step':>8} {'sampled tokens/s':>17}")
    print(f"{'turnwise':10} {tw[0]:>8.2f} {tw[1]:>17.0f}")
    print(f"{'trl':10} {trl[0]:>8.2f} {trl[1]:>17.0f}")
    print(f"step_speedup_vs_trl: {trl[0] / tw[0]:.2f}")


if __name__ == "__main__":
    main()
