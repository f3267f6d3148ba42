"""One GRPO step, turnwise vs TRL's `GRPOTrainer`, on CPU, side by side in one run.

Same tiny model (the built-in one, from its HF directory), same prompts (support-desk questions,
one user turn), same batch (`--batch` prompts x `--group` completions), same completion limit,
same reward (reply length / 80), same optimizer (AdamW, lr 1e-5, fp32), same torch thread count
(`--threads`), no checkpoints and no tracking on either side.

Each side runs in its own process and the two take turns, one step at a time, so machine noise
hits both alike: a side finishes a step, reports it and waits; then the other runs one. A step is
the wall time of a whole cycle of the training loop (turnwise: sampling through the runtime
server with the real `openai` client, training, weight sync, logging; TRL: from one
step's log to the next, generation included). Each side warms up until its step time settles
(at least `--warmup` steps, then until two consecutive steps differ by less than 15%, at most 8),
then runs `--steps` measured steps. Prints every step time, the medians, sampled tokens per
second, and last `step_speedup_vs_trl: <TRL median / turnwise median>`.

Needs the bench extra: `pip install -e '.[bench]'` (TRL pinned, installed without upgrading torch).

    .venv/bin/python bench/vs_trl.py [--batch 4] [--group 8] [--max-tokens 32] [--steps 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEMO = Path(__file__).parent.parent / "examples" / "support_desk" / "config.yaml"
MAX_WARMUP = 8
_MARK = "vs_trl step: "  # trainers print to stdout too


def reward_of(text: str) -> float:
    return min(1.0, len(text) / 80)


async def agent(task, client, ctx):
    messages = [{"role": "user", "content": task["question"]}]
    r = await client.chat.completions.create(model=ctx.model, messages=messages, **ctx.inference_params)
    return reward_of(r.choices[0].message.content or "")


def questions(n: int) -> list[dict]:
    rows = [json.loads(line) for line in (DEMO.parent / "data" / "train.jsonl").read_text().splitlines()]
    return [rows[i % len(rows)] for i in range(n)]


class Gate:
    """A side's end of the turn-taking protocol: report a step, wait for the parent's next word."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def step_done(self, tokens: float) -> None:
        print(_MARK + json.dumps({"seconds": time.perf_counter() - self.started, "tokens": tokens}), flush=True)
        if sys.stdin.readline().strip() != "go":
            os._exit(0)  # the parent has what it needs; skip both trainers' teardown
        self.started = time.perf_counter()


def run_turnwise(args: argparse.Namespace, work: Path, gate: Gate) -> None:
    from turnwise.config import load_config
    from turnwise.track import JsonlLogger
    from turnwise.train.loop import train

    class GatedLogger(JsonlLogger):
        def log_metrics(self, metrics, step):
            super().log_metrics(metrics, step)
            if "speed/step_s" in metrics:
                gate.step_done(metrics.get("rollout/sample_tokens", 0.0))

    steps = MAX_WARMUP + args.steps + 1
    tasks = work / "tasks.jsonl"
    tasks.write_text("\n".join(json.dumps(r) for r in questions(args.batch * steps)))
    cfg = load_config(DEMO, [
        f"data.train_path={tasks}", "data.val_path=null", "data.test_path=null", "warm_start.demos_path=null",
        f"global_batch_size={args.batch}", f"group_size={args.group}", f"max_steps={steps}",
        f"sampling_max_tokens={args.max_tokens}", "learning_rate=1e-5", f"micro_batch_size={args.batch * args.group}",
        "tracking.progress=false", "tracking.mlflow=false", "val_every=0", "save_every=0",
    ])
    run_dir = work / "turnwise"
    run_dir.mkdir()
    gate.started = time.perf_counter()
    train(cfg, agent, run_dir, GatedLogger(run_dir / "metrics.jsonl"))


def run_trl(args: argparse.Namespace, work: Path, gate: Gate) -> None:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from turnwise.config import load_config
    from turnwise.policy.load import resolve_model_dir

    steps = MAX_WARMUP + args.steps + 1
    model_dir = str(resolve_model_dir(load_config(DEMO, []).model))
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": q["question"]}]}
                              for q in questions(args.batch * steps)])

    def reward(completions, **_):
        return [reward_of(c[0]["content"] if isinstance(c, list) else c) for c in completions]

    class Gated(TrainerCallback):  # a step's log comes after its on_step_end: the cycle is log to log
        def on_log(self, a, state, control, logs=None, **k):
            if logs and "completions/mean_length" in logs:
                gate.step_done(logs["completions/mean_length"] * args.batch * args.group)

    config = GRPOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=args.batch * args.group,
        num_generations=args.group, max_completion_length=args.max_tokens, learning_rate=1e-5,
        max_steps=steps, use_cpu=True, bf16=False, fp16=False, report_to=[], logging_steps=1,
        save_strategy="no", temperature=1.0, beta=0.0, seed=0, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model_dir, reward_funcs=reward, args=config, train_dataset=data, callbacks=[Gated()])
    gate.started = time.perf_counter()
    trainer.train()


class Side:
    """A child process running one trainer, one step per `go`."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name = name
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
               "TOKENIZERS_PARALLELISM": "false"}
        argv = [sys.executable, __file__, "--side", name, *sys.argv[1:]]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.seconds: list[float] = []
        self.tokens: list[float] = []

    def step(self) -> float:
        """Let the side run one step (its first: start up and run one); its seconds."""
        if self.seconds or self.tokens:
            self.proc.stdin.write("go\n")  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
        while True:
            line = self.proc.stdout.readline()  # type: ignore[union-attr]
            if not line:
                raise SystemExit(f"vs_trl: the {self.name} side exited early (exit {self.proc.wait()})")
            if line.startswith(_MARK):
                row = json.loads(line[len(_MARK):])
                self.seconds.append(row["seconds"])
                self.tokens.append(row["tokens"])
                return row["seconds"]

    def settled(self, warmup: int) -> bool:
        s = self.seconds
        return len(s) >= warmup + 1 and (abs(s[-1] - s[-2]) < 0.15 * min(s[-1], s[-2]) or len(s) > MAX_WARMUP)

    def stop(self) -> None:
        self.proc.stdin.write("stop\n")  # type: ignore[union-attr]
        self.proc.stdin.close()  # type: ignore[union-attr]
        self.proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=5, help="measured steps per side, after warm-up")
    p.add_argument("--warmup", type=int, default=2, help="at least this many warm-up steps per side")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads, both sides")
    p.add_argument("--side", choices=["turnwise", "trl"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:  # a child: one trainer, gated step by step
        import torch

        torch.set_num_threads(args.threads)
        with tempfile.TemporaryDirectory() as tmp:
            (run_turnwise if args.side == "turnwise" else run_trl)(args, Path(tmp), Gate())
        return
    sides: list[Side] = []
    warm: dict[str, int] = {}
    for name in ("turnwise", "trl"):  # start and warm up one side at a time, until its step time settles
        s = Side(name, args)
        s.step()
        while not s.settled(args.warmup):
            s.step()
        warm[s.name] = len(s.seconds)
        sides.append(s)
    for _ in range(args.steps):  # measured steps, alternating
        for s in sides:
            s.step()
    for s in sides:
        s.stop()
    result: dict[str, Any] = {}
    print(f"threads: {args.threads}; batch {args.batch} x group {args.group}, max_tokens {args.max_tokens}")
    for s in sides:
        measured, tokens = s.seconds[warm[s.name]:], s.tokens[warm[s.name]:]
        result[s.name] = statistics.median(measured)
        print(f"{s.name:9} warm-up s/step: {' '.join(f'{x:.2f}' for x in s.seconds[:warm[s.name]])}")
        print(f"{s.name:9} measured s/step: {' '.join(f'{x:.2f}' for x in measured)}")
        print(f"{s.name:9} median {result[s.name]:.2f} s/step, {sum(tokens) / sum(measured):.0f} sampled tokens/s")
    print(f"step_speedup_vs_trl: {result['trl'] / result['turnwise']:.2f}")


if __name__ == "__main__":
    main()
