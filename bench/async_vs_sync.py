"""Async vs sync training under heavy-tailed agent latency, side by side in one run.

One job (tiny model, support-desk tasks, reply-length reward) whose agent sleeps between its two
model calls for a lognormal time (a slow tool), with 10% of calls 10x stragglers. The same job
runs synchronously and with `async_config.max_steps_off_policy` 1 and 2 for the same number of
steps; we report steps per hour and the validation reward (temperature 0) before and after those
steps. "Equal reward within noise": a second synchronous run with another seed gives the
seed-to-seed spread of the final validation reward; each async run's gap to the synchronous one
is printed beside it, with the paired standard error over validation tasks.
Last line: `async_speedup: <steps/hour at max_steps_off_policy 2 / steps/hour synchronous>`.

    .venv/bin/python bench/async_vs_sync.py [--steps 20] [--batch 4] [--group 4] [--val 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import tempfile
from pathlib import Path

from turnwise.config import load_config
from turnwise.track import JsonlLogger
from turnwise.train.job import select_loop

DEMO = Path(__file__).parent.parent / "examples" / "support_desk" / "config.yaml"


def make_agent(seed: int, median: float, sigma: float, straggler_frac: float, val: dict[str, float]):
    """The agent; `val` collects the latest temperature-0 (validation) reward of each task."""
    rng = random.Random(seed)

    async def agent(task, client, ctx):
        messages = [{"role": "user", "content": task["question"]}]
        r = await client.chat.completions.create(model=ctx.model, messages=messages, **ctx.inference_params)
        text = r.choices[0].message.content or ""
        latency = median * rng.lognormvariate(0.0, sigma) * (10.0 if rng.random() < straggler_frac else 1.0)
        await asyncio.sleep(latency)  # the slow tool call
        messages += [{"role": "assistant", "content": text}, {"role": "user", "content": "Anything else?"}]
        r = await client.chat.completions.create(model=ctx.model, messages=messages, **ctx.inference_params)
        reward = min(1.0, len(text + (r.choices[0].message.content or "")) / 80)
        if ctx.inference_params["temperature"] == 0:
            val[task["id"]] = reward
        return reward

    return agent


def run_one(off_policy: int, seed: int, args: argparse.Namespace, work: Path) -> dict:
    run_dir = work / f"off{off_policy}-seed{seed}"
    run_dir.mkdir(parents=True)
    cfg = load_config(DEMO, [
        f"data.train_path={DEMO.parent / 'data' / 'train.jsonl'}", f"data.val_path={work / 'val.jsonl'}",
        "data.test_path=null", "warm_start.demos_path=null", f"global_batch_size={args.batch}",
        f"group_size={args.group}", f"max_steps={args.steps}", "val_every=0", "sampling_max_tokens=24",
        "tracking.progress=false", "tracking.mlflow=false", "learning_rate=1e-3", "micro_batch_size=16",
        f"async_config.max_steps_off_policy={off_policy}", "agent.concurrency=256", "max_epochs=100",
        f"seed={seed}",
    ])
    logger = JsonlLogger(run_dir / "metrics.jsonl")
    val: dict[str, float] = {}
    agent = make_agent(seed, args.median, args.sigma, args.stragglers, val)
    try:
        result = select_loop(cfg)(cfg, agent, run_dir, logger)
    finally:
        logger.close()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "speed/step_s" in r]
    rl_seconds = sum(r["speed/step_s"] for r in steps)
    return {"steps_per_hour": 3600 * len(steps) / rl_seconds, "val_reward": result.val_reward_after_rl or 0.0,
            "val_before": result.val_reward_before_rl or 0.0, "val_by_task": val,
            "dropped_stale": sum(r["train/dropped_stale"] for r in steps),
            "staleness_mean": sum(r["train/staleness"] for r in steps) / len(steps)}


def paired_gap(a: dict[str, float], b: dict[str, float]) -> tuple[float, float]:
    """Mean of a - b over the tasks both validated, and its standard error."""
    diffs = [a[t] - b[t] for t in a.keys() & b.keys()]
    if len(diffs) < 2:
        return (diffs[0] if diffs else 0.0), 0.0
    return statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--val", type=int, default=32, help="validation tasks")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--median", type=float, default=0.3, help="median tool latency, seconds")
    p.add_argument("--sigma", type=float, default=0.75, help="lognormal sigma")
    p.add_argument("--stragglers", type=float, default=0.1, help="fraction of 10x slow calls")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        val_rows = (DEMO.parent / "data" / "val.jsonl").read_text().splitlines()[:args.val]
        (work / "val.jsonl").write_text("\n".join(val_rows))
        runs = {(k, args.seed): run_one(k, args.seed, args, work) for k in (0, 1, 2)}
        runs[0, args.seed + 1] = run_one(0, args.seed + 1, args, work)
    sync = runs[0, args.seed]
    print(f"{'max_steps_off_policy':>22} {'seed':>5} {'steps/hour':>11} {'val before':>11} {'val after':>10} "
          f"{'gap to sync':>17} {'dropped':>8} {'staleness':>10}")
    for (k, seed), r in runs.items():
        gap = "" if r is sync else "{:+.3f} ± {:.3f}".format(*paired_gap(r["val_by_task"], sync["val_by_task"]))
        print(f"{k:>22} {seed:>5} {r['steps_per_hour']:>11.0f} {r['val_before']:>11.3f} {r['val_reward']:>10.3f} "
              f"{gap:>17} {r['dropped_stale']:>8.0f} {r['staleness_mean']:>10.2f}")
    spread = abs(runs[0, args.seed + 1]["val_reward"] - sync["val_reward"])
    print(f"seed-to-seed spread of the synchronous val reward: {spread:.3f}; gap ± paired standard error")
    print(f"speedup off_policy=1: {runs[1, args.seed]['steps_per_hour'] / sync['steps_per_hour']:.2f}x")
    print(f"async_speedup: {runs[2, args.seed]['steps_per_hour'] / sync['steps_per_hour']:.2f}")


if __name__ == "__main__":
    main()
