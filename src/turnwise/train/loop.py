"""The reference training loop: synchronous, one step at a time, readable top to bottom.

Algorithm (GRPO-style multi-turn RL with a supervised warm start):
  0. warm start: `cross_entropy` on the assistant tokens of demonstrations (the tiny model
     starts from random weights, so it first learns the format and the tools); then LoRA
     adapters when `lora_rank` > 0
  per step:
  1. sample:      `global_batch_size` tasks x `group_size` rollouts; agents call the runtime
  2. score:       each agent returns its reward; the failure policy drops failed rollouts
                  (and, with `incomplete_groups: drop`, their groups)
  3. advantages:  `advantage_method` within each group (default `group_based` = GRPO)
  4. datums:      token-exact segments from the runtime, with per-token advantages
  5. step:        `loss_fn` (default `ppo`, ratio to the sampler's logprobs), AdamW, `num_substeps` times
  6. sync:        new weights to the sampler (policy version + 1)
  7. log:         metrics, rollouts (JSONL + MLflow traces); validation at temperature 0 every
                  `val_every` steps; a checkpoint every `save_every` steps, at the end, and on
                  SIGINT/SIGTERM
Departures from GRPO as published: no KL term by default (`kl_coef` 0, as in DAPO and Dr. GRPO),
and the ratio is taken against the sampler's own logprobs rather than a recomputed old policy.
A run directory holding a checkpoint resumes from it: the next batch is the one the
uninterrupted run would have drawn (`data.batches` is a pure function of seed and step).
`async_config.max_steps_off_policy` > 0 hands steps 1-7 to `async_loop`, which reuses `learn`
and `end_step` from here.
"""

from __future__ import annotations

import itertools
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from turnwise.config import JobConfig
from turnwise.eval.metrics import mean_pass_at_k
from turnwise.policy.checkpoint import save_checkpoint
from turnwise.track import Logger
from turnwise.train.checkpoint import (
    StopSignals,
    latest_checkpoint,
    load_trainer_state,
    load_weights,
    restore_rng,
    save_trainer_checkpoint,
)
from turnwise.train.data import batches, load_tasks
from turnwise.train.datums import groups_to_datums, usable
from turnwise.train.dispatch import AgentFn, Dispatcher
from turnwise.train.embedded import EmbeddedRuntime
from turnwise.train.learner import Learner
from turnwise.train.metrics import apply_failure_policy, rollout_metrics, staleness
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
    start_step: int = 0
    """Steps already done by the checkpoint this run resumed from (0: a fresh run)."""
    interrupted: bool = False
    """Stopped by SIGINT/SIGTERM after checkpointing step `steps`."""


@dataclass
class Run:
    """What every step needs: the runtime, learner, agent dispatcher and logging."""

    cfg: JobConfig
    rt: EmbeddedRuntime
    learner: Learner
    dispatcher: Dispatcher
    logger: Logger
    run_dir: Path
    progress: Progress
    total_steps: int
    val_tasks: Sequence[Task]
    val_before: float | None = None
    mlflow: Any = field(default=None)


def train(cfg: JobConfig, agent: AgentFn | None, run_dir: Path, logger: Logger) -> TrainResult:
    started = time.perf_counter()
    seed_everything(cfg.seed)
    train_tasks = load_tasks(cfg.data.train_path) if cfg.data.train_path else []
    val_tasks = load_tasks(cfg.data.val_path) if cfg.data.val_path else []
    if not train_tasks:
        raise ValueError("data.train_path is required for training")
    per_epoch = max(1, len(train_tasks) // cfg.global_batch_size)
    total_steps = per_epoch * cfg.max_epochs if cfg.max_steps is None else min(cfg.max_steps,
                                                                               per_epoch * cfg.max_epochs)
    resume = latest_checkpoint(run_dir)
    warm_dir = run_dir / "checkpoints" / "warm_start"
    base = str(warm_dir) if resume is not None and warm_dir.is_dir() else None
    with EmbeddedRuntime(cfg, run_dir, job_id=run_dir.name, model_path=base) as rt, StopSignals() as stop:
        progress = Progress(total_steps, enabled=cfg.tracking.progress)
        # 0. warm start (fresh runs only), then LoRA adapters
        if resume is None and cfg.warm_start.demos_path and cfg.warm_start.epochs > 0:
            if not warm_start(cfg, rt, logger, progress, stop):  # a signal: nothing to resume yet
                progress.close()
                return TrainResult(run_dir=run_dir, steps=0, val_reward_before_rl=None, val_reward_after_rl=None,
                                   wall_seconds=time.perf_counter() - started, interrupted=True)
            save_checkpoint(rt.model, rt.tokenizer, warm_dir)
        if cfg.lora_rank > 0:
            rt.apply_lora(warm_dir if warm_dir.is_dir() else None)
        run = Run(cfg, rt, Learner(rt.model, cfg, total_steps=total_steps * cfg.num_substeps),
                  rt.dispatcher(agent), logger, run_dir, progress, total_steps, val_tasks,
                  mlflow=_find_mlflow(logger))
        start_step = 0
        if resume is not None:
            state = load_trainer_state(resume)
            load_weights(rt.model, resume)
            run.learner.load_state_dict(state["learner"])
            rt.engine.version = state["policy_version"] - 1
            start_step, run.val_before = state["step"], state["val_before"]
        rt.push_weights()
        if resume is None:
            run.val_before = validate(run, step=0)
        else:
            restore_rng(state["rng"])
        progress.start_rl(start_step)
        if cfg.async_config.max_steps_off_policy > 0:
            from turnwise.train.async_loop import run_async

            step = run_async(run, train_tasks, start_step, stop)
        else:
            step = start_step
            schedule = batches(train_tasks, cfg.global_batch_size, cfg.seed, cfg.data.shuffle, cfg.max_epochs,
                               start_step=start_step)
            for step, (epoch, tasks) in enumerate(itertools.islice(schedule, total_steps - start_step),
                                                  start=start_step + 1):
                t0 = time.perf_counter()
                # 1-2. sample and score
                groups = rt.run(run.dispatcher.run_groups(tasks, cfg.group_size, inference_params(cfg)))
                t_sample = time.perf_counter() - t0
                # 3-6. failure policy, advantages, datums, optimizer steps, new weights to the sampler
                metrics = learn(run, groups)
                metrics |= {"time/sample": t_sample, "training/epoch": epoch}
                # 7. log, validate, checkpoint
                end_step(run, step, groups, metrics, t0, stop_signal=stop.received)
                if stop.received:
                    break
        interrupted = stop.received is not None and step < total_steps
        val_after = None
        if not interrupted:
            val_after = validate(run, step) if step > start_step else run.val_before
            if step > start_step and not (cfg.save_every and step % cfg.save_every == 0):
                save_state(run, step)
            save_checkpoint(rt.model, rt.tokenizer, run_dir / "checkpoints" / "final", merged=True)
        progress.close()
        if run.mlflow is not None and cfg.tracking.traces:
            from turnwise.train.traces import flush

            flush()
    return TrainResult(run_dir=run_dir, steps=step, val_reward_before_rl=run.val_before,
                       val_reward_after_rl=val_after, wall_seconds=time.perf_counter() - started,
                       start_step=start_step, interrupted=interrupted)


def learn(run: Run, groups: Sequence[Group]) -> dict[str, float]:
    """Steps 2-6 on sampled groups: failure policy, advantages, datums, optimizer steps, weight sync."""
    cfg, t1 = run.cfg, time.perf_counter()
    kept, metrics = apply_failure_policy(groups, cfg.incomplete_groups)
    stale = [staleness(g, run.rt.engine.version) for g in kept]  # versions behind the weights that train
    metrics |= {"async/staleness/mean": float(np.mean(stale)) if stale else 0.0,
                "async/staleness/max": float(max(stale, default=0))}
    datums, adv_metrics = groups_to_datums(kept, cfg.advantage_method, cfg.advantage_options())
    metrics |= adv_metrics | rollout_metrics(groups, cfg.success_threshold)
    if datums:
        metrics |= run.learner.train_batch(datums, cfg.loss_fn, cfg.loss_options(), cfg.temperature,
                                           cfg.num_substeps)
        metrics["training/policy_version"] = run.rt.push_weights()
    train_tokens = sum(len(d.segment.tokens_T) for d in datums) * cfg.num_substeps
    return metrics | {"time/train": time.perf_counter() - t1, "training/total_tokens": train_tokens,
                      "usage/train_tokens": train_tokens,
                      "training/num_trajectories": sum(usable(r) for g in kept for r in g.rollouts_G)}


def end_step(run: Run, step: int, groups: Sequence[Group], metrics: dict[str, float], t0: float,
             stop_signal: int | None = None) -> None:
    """Step 7: metrics, rollouts (JSONL, traces), progress, validation, checkpoint."""
    cfg = run.cfg
    metrics.setdefault("async/dropped_stale", 0.0)
    metrics["time/step"] = time.perf_counter() - t0
    metrics["throughput/tokens_per_s"] = (metrics.get("usage/sample_tokens", 0.0)
                                          + metrics.get("usage/train_tokens", 0.0)) / max(metrics["time/step"], 1e-9)
    run.logger.log_metrics(metrics, step)
    path = write_rollouts(run.run_dir / "rollouts" / f"step_{step:05d}.jsonl", groups)
    run.logger.log_artifact(path, "rollouts")
    if run.mlflow is not None and cfg.tracking.traces:
        from turnwise.train.traces import log_traces

        log_traces(run.mlflow.client, run.mlflow.experiment_id, run.mlflow.run_id, step, groups)
    run.progress.update(step, metrics.get("rollout/reward/mean", 0.0), metrics.get("rollout/pass_rate", 0.0))
    if cfg.val_every and step % cfg.val_every == 0 and step < run.total_steps:
        validate(run, step)
    if (cfg.save_every and step % cfg.save_every == 0) or stop_signal is not None:
        save_state(run, step)


def save_state(run: Run, step: int) -> Path:
    state = {"learner": run.learner.state_dict(), "policy_version": run.rt.engine.version,
             "val_before": run.val_before, "next_data_step": step}
    path = save_trainer_checkpoint(run.run_dir, step, run.rt.model, run.rt.tokenizer, state)
    if run.mlflow is not None and run.cfg.tracking.log_checkpoints:
        for f in sorted((path / "model").iterdir()):
            run.logger.log_artifact(f, f"checkpoints/{path.name}")
    return path


def warm_start(cfg: JobConfig, rt: EmbeddedRuntime, logger: Logger, progress: Progress,
               stop: StopSignals) -> bool:
    """Step 0: supervised fine-tuning on demonstrations (cross_entropy on assistant tokens).
    False when a stop signal ended it early (after the batch in progress)."""
    demos = load_demos(cfg.warm_start.demos_path)  # type: ignore[arg-type]
    datums = [demo_to_datum(rt.chat, msgs, tools, f"demo-{i}") for i, (msgs, tools) in enumerate(demos)]
    rng = random.Random(cfg.seed)
    size = cfg.warm_start.batch_size
    n_batches = cfg.warm_start.epochs * max(1, len(datums) // size)
    learner = Learner(rt.model, cfg, learning_rate=cfg.warm_start.learning_rate, total_steps=n_batches,
                      schedule=cfg.warm_start.lr_schedule, warmup_steps=cfg.warm_start.warmup_steps)
    progress.start_warm_start(n_batches)
    k = 0
    for _ in range(cfg.warm_start.epochs):
        rng.shuffle(datums)
        for start in range(0, max(1, len(datums) - size + 1), size):
            metrics = learner.step(datums[start:start + size], "cross_entropy", LossOptions())
            k += 1
            logger.log_metrics({f"warm_start/{k_.split('/')[-1]}": v for k_, v in metrics.items()}, k)
            progress.update_warm_start(k, metrics.get("loss/value", 0.0))
            if stop.received:
                return False
    return True


def validate(run: Run, step: int) -> float | None:
    """Temperature-0 rollouts on the validation set: `val/reward/mean` and `val/reward/pass_at_{k}`."""
    cfg, tasks = run.cfg, run.val_tasks
    if not tasks:
        return None
    groups = run.rt.run(run.dispatcher.run_groups(tasks, cfg.val_group_size, inference_params(cfg, greedy=True)))
    metrics = validation_metrics(cfg, groups)
    run.logger.log_metrics(metrics, step)
    return metrics["val/reward/mean"]


def validation_metrics(cfg: JobConfig, groups: Sequence[Group]) -> dict[str, float]:
    rewards = [r.trajectory.reward if usable(r) else 0.0 for g in groups for r in g.rollouts_G]
    metrics = {"val/reward/mean": float(np.mean(rewards))}
    successes = [sum(usable(r) and r.trajectory.reward >= cfg.success_threshold for r in g.rollouts_G)
                 for g in groups]
    for k in cfg.pass_k_values:
        if k <= cfg.val_group_size:
            metrics[f"val/reward/pass_at_{k}"] = mean_pass_at_k(successes, cfg.val_group_size, k)
    return metrics


def inference_params(cfg: JobConfig, greedy: bool = False) -> dict[str, float | int]:
    p = cfg.sampling_params(greedy=greedy)
    return {"temperature": p.temperature, "top_p": p.top_p, "max_tokens": p.max_tokens}


def write_rollouts(path: Path, groups: Sequence[Group]) -> Path:
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
                                    "turns": len(traj.turns), "versions": [t.version for t in traj.turns],
                                    "metrics": dict(r.metrics), "messages": messages}) + "\n")
    return path


def _find_mlflow(logger: Logger) -> Any:
    from turnwise.track import MlflowLogger

    if isinstance(logger, MlflowLogger):
        return logger
    return logger.find(MlflowLogger) if hasattr(logger, "find") else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
