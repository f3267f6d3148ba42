"""The reference training loop: synchronous, one step at a time, readable top to bottom.

Algorithm (GRPO-style multi-turn RL with a supervised warm start):
  0. warm start: `cross_entropy` on the assistant tokens of demonstrations (the tiny model
     starts from random weights, so it first learns the format and the tools)
  per step:
  1. sample:      `global_batch_size` tasks x `group_size` rollouts; agents call the runtime
  2. score:       each agent returns its reward; failed rollouts are left out
  3. advantages:  `advantage_method` within each group (default `group_based` = GRPO)
  4. datums:      token-exact segments from the runtime, with per-token advantages
  5. step:        `loss_fn` (default `ppo`, ratio to the sampler's logprobs), AdamW, `num_substeps` times
  6. sync:        new weights to the sampler (policy version + 1)
  7. log:         metrics, rollouts; validation at temperature 0 every `val_every` steps
Departures from GRPO as published: no KL term by default (`kl_coef` 0, as in DAPO and Dr. GRPO),
and the ratio is taken against the sampler's own logprobs rather than a recomputed old policy.
"""

from __future__ import annotations

import itertools
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from turnwise.config import JobConfig
from turnwise.eval.metrics import mean_pass_at_k
from turnwise.track import Logger
from turnwise.train.data import batches, load_tasks
from turnwise.train.datums import groups_to_datums, usable
from turnwise.train.dispatch import AgentFn
from turnwise.train.embedded import EmbeddedRuntime
from turnwise.train.learner import Learner
from turnwise.train.progress import Progress
from turnwise.train.sft import demo_to_datum, load_demos
from turnwise.types import Group, LossOptions, Task


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    steps: int
    val_reward_before_rl: float | None
    val_reward_after_rl: float | None
    wall_seconds: float


def train(cfg: JobConfig, agent: AgentFn, run_dir: Path, logger: Logger) -> TrainResult:
    started = time.perf_counter()
    seed_everything(cfg.seed)
    train_tasks = load_tasks(cfg.data.train_path) if cfg.data.train_path else []
    val_tasks = load_tasks(cfg.data.val_path) if cfg.data.val_path else []
    if not train_tasks:
        raise ValueError("data.train_path is required for training")
    per_epoch = max(1, len(train_tasks) // cfg.global_batch_size)
    total_steps = per_epoch * cfg.max_epochs if cfg.max_steps is None else min(cfg.max_steps,
                                                                               per_epoch * cfg.max_epochs)
    with EmbeddedRuntime(cfg, run_dir, job_id=run_dir.name) as rt:
        learner = Learner(rt.model, cfg)
        progress = Progress(total_steps, enabled=cfg.tracking.progress)
        if cfg.warm_start.demos_path and cfg.warm_start.epochs > 0:
            warm_start(cfg, rt, logger, progress)
            rt.model.save_pretrained(run_dir / "checkpoints" / "warm_start")
            rt.tokenizer.save_pretrained(run_dir / "checkpoints" / "warm_start")
        rt.push_weights()
        dispatcher = rt.dispatcher(agent)
        val_before = validate(cfg, rt, dispatcher, val_tasks, logger, step=0)
        val_after = val_before
        progress.start_rl()
        step = 0
        schedule = batches(train_tasks, cfg.global_batch_size, cfg.seed, cfg.data.shuffle, cfg.max_epochs)
        for step, (epoch, tasks) in enumerate(itertools.islice(schedule, total_steps), start=1):
            t0 = time.perf_counter()
            # 1-2. sample and score
            groups = rt.run(dispatcher.run_groups(tasks, cfg.group_size, inference_params(cfg)))
            t_sample = time.perf_counter() - t0
            # 3-4. advantages and datums
            datums, metrics = groups_to_datums(groups, cfg.advantage_method, cfg.advantage_options())
            metrics |= rollout_metrics(groups, cfg.success_threshold)
            # 5. optimizer steps
            t1 = time.perf_counter()
            if datums:
                for _ in range(cfg.num_substeps):
                    metrics |= learner.step(datums, cfg.loss_fn, cfg.loss_options(), temperature=cfg.temperature)
                # 6. new weights to the sampler
                metrics["training/policy_version"] = rt.push_weights()
            train_tokens = sum(len(d.segment.tokens_T) for d in datums)
            metrics |= {"time/sample": t_sample, "time/train": time.perf_counter() - t1,
                        "time/step": time.perf_counter() - t0, "training/epoch": epoch,
                        "training/total_tokens": train_tokens * cfg.num_substeps,
                        "usage/train_tokens": train_tokens * cfg.num_substeps,
                        "training/num_trajectories": sum(usable(r) for g in groups for r in g.rollouts_G)}
            # 7. log
            logger.log_metrics(metrics, step)
            write_rollouts(run_dir / "rollouts" / f"step_{step:05d}.jsonl", groups)
            progress.update(step, metrics.get("rollout/reward/mean", 0.0), metrics.get("rollout/pass_rate", 0.0))
            if cfg.val_every and step % cfg.val_every == 0 and step < total_steps:
                validate(cfg, rt, dispatcher, val_tasks, logger, step)
        val_after = validate(cfg, rt, dispatcher, val_tasks, logger, step) if step else val_before
        progress.close()
        final = run_dir / "checkpoints" / "final"
        rt.model.save_pretrained(final)
        rt.tokenizer.save_pretrained(final)
    return TrainResult(run_dir=run_dir, steps=step, val_reward_before_rl=val_before,
                       val_reward_after_rl=val_after, wall_seconds=time.perf_counter() - started)


def warm_start(cfg: JobConfig, rt: EmbeddedRuntime, logger: Logger, progress: Progress) -> None:
    """Step 0: supervised fine-tuning on demonstrations (cross_entropy on assistant tokens)."""
    demos = load_demos(cfg.warm_start.demos_path)  # type: ignore[arg-type]
    datums = [demo_to_datum(rt.chat, msgs, tools, f"demo-{i}") for i, (msgs, tools) in enumerate(demos)]
    learner = Learner(rt.model, cfg, learning_rate=cfg.warm_start.learning_rate)
    rng = random.Random(cfg.seed)
    size = cfg.warm_start.batch_size
    n_batches = cfg.warm_start.epochs * max(1, len(datums) // size)
    progress.start_warm_start(n_batches)
    k = 0
    for _ in range(cfg.warm_start.epochs):
        rng.shuffle(datums)
        for start in range(0, max(1, len(datums) - size + 1), size):
            metrics = learner.step(datums[start:start + size], "cross_entropy", LossOptions())
            k += 1
            logger.log_metrics({f"warm_start/{k_.split('/')[-1]}": v for k_, v in metrics.items()}, k)
            progress.update_warm_start(k, metrics.get("loss/value", 0.0))


def validate(cfg: JobConfig, rt: EmbeddedRuntime, dispatcher, tasks: Sequence[Task], logger: Logger,
             step: int) -> float | None:
    """Temperature-0 rollouts on the validation set: `val/reward/mean` and `val/reward/pass_at_{k}`."""
    if not tasks:
        return None
    groups = rt.run(dispatcher.run_groups(tasks, cfg.val_group_size, inference_params(cfg, greedy=True)))
    rewards = [r.trajectory.reward if usable(r) else 0.0 for g in groups for r in g.rollouts_G]
    metrics = {"val/reward/mean": float(np.mean(rewards))}
    successes = [sum(usable(r) and r.trajectory.reward >= cfg.success_threshold for r in g.rollouts_G)
                 for g in groups]
    for k in cfg.pass_k_values:
        if k <= cfg.val_group_size:
            metrics[f"val/reward/pass_at_{k}"] = mean_pass_at_k(successes, cfg.val_group_size, k)
    logger.log_metrics(metrics, step)
    return metrics["val/reward/mean"]


def inference_params(cfg: JobConfig, greedy: bool = False) -> dict[str, float | int]:
    p = cfg.sampling_params(greedy=greedy)
    return {"temperature": p.temperature, "top_p": p.top_p, "max_tokens": p.max_tokens}


def rollout_metrics(groups: Sequence[Group], success_threshold: float) -> dict[str, float]:
    rollouts = [r for g in groups for r in g.rollouts_G]
    ok = [r for r in rollouts if usable(r)]
    rewards = [r.trajectory.reward if usable(r) else 0.0 for r in rollouts]
    valid = [r.trajectory.reward for r in ok]
    turns = [t for r in ok for t in r.trajectory.turns]
    out = {
        "rollout/reward/mean": float(np.mean(rewards)) if rewards else 0.0,
        "rollout/reward/valid_mean": float(np.mean(valid)) if valid else 0.0,
        "rollout/reward/zero_frac": float(np.mean([v == 0 for v in valid])) if valid else 0.0,
        "rollout/pass_rate": float(np.mean([v >= success_threshold for v in rewards])) if rewards else 0.0,
        "rollout/failed_frac": 1 - len(ok) / max(1, len(rollouts)),
        "rollout/turns/mean": float(np.mean([len(r.trajectory.turns) for r in ok])) if ok else 0.0,
        "rollout/tokens/response_max": float(max((len(t.completion_ids) for t in turns), default=0)),
        "rollout/tokens/response_mean": float(np.mean([len(t.completion_ids) for t in turns])) if turns else 0.0,
        "rollout/tool_parse_errors": float(sum(t.tool_parse_error for t in turns)),
        "usage/sample_tokens": float(sum(len(t.completion_ids) for t in turns)),
        "usage/prefill_tokens": float(sum(len(t.prompt_ids) - t.reused_prompt_tokens for t in turns)),
        "time/rollout/mean": float(np.mean([r.seconds for r in rollouts])) if rollouts else 0.0,
    }
    for key in sorted({k for r in ok for k in r.metrics}):
        out[f"rollout/{key}/mean"] = float(np.mean([r.metrics.get(key, 0.0) for r in ok]))
    return out


def write_rollouts(path: Path, groups: Sequence[Group]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for g in groups:
            for r in g.rollouts_G:
                traj = r.trajectory
                last = traj.turns[-1] if traj.turns else None
                messages = ([m.to_openai() for m in last.request_messages] + [last.message.to_openai()]
                            if last else [])
                f.write(json.dumps({"task_id": g.task.id, "trajectory_id": traj.id, "status": traj.status.value,
                                    "rewards": list(traj.rewards), "error": traj.error,
                                    "turns": len(traj.turns), "metrics": dict(r.metrics),
                                    "messages": messages}) + "\n")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
