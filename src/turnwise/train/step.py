"""The pieces of a training step, shared by the synchronous loop (`loop.py`) and the asynchronous
one (`async_loop.py`): opening a run (warm start or resume), scoring, optimizing, logging,
validating, checkpointing. The loops only schedule these.

Learning rate at RL optimizer step n (0-based over all substeps; W = `lr_warmup_steps`,
N = all RL optimizer steps) is `learning_rate * lr_lambda(lr_schedule, W, N)(n)`, passed to
`optim_step` each time (Tinker's contract: the caller owns the schedule).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from turnwise.algo.passk import mean_pass_at_k
from turnwise.backends import TrainingBackend
from turnwise.config import JobConfig, RunStopped
from turnwise.policy.checkpoint import save_checkpoint
from turnwise.policy.load import resolve_dtype
from turnwise.rollout.agent import AgentFn
from turnwise.rollout.dispatch import RolloutDispatcher
from turnwise.rollout.push import AgentUnavailable
from turnwise.rollout.runtime import EmbeddedRuntime
from turnwise.rollout.tasks import load_tasks
from turnwise.track import Logger
from turnwise.track.traces import final_output, verdict
from turnwise.train.backend import LocalBackend, lr_lambda
from turnwise.train.checkpoint import (
    StopSignals,
    latest_checkpoint,
    load_trainer_state,
    restore_rng,
    save_trainer_checkpoint,
)
from turnwise.train.datums import usable
from turnwise.train.learner import open_backend
from turnwise.train.metrics import apply_failure_policy, rollout_metrics, staleness
from turnwise.train.progress import Progress
from turnwise.train.sft import demo_to_datum, load_demos
from turnwise.types import AdamParams, Datum, Group, Task


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
    """What every step needs: the runtime, training backend, dispatcher, logging, progress."""

    cfg: JobConfig
    rt: EmbeddedRuntime
    backend: TrainingBackend
    dispatcher: RolloutDispatcher
    logger: Logger
    run_dir: Path
    progress: Progress
    stop: StopSignals
    train_tasks: Sequence[Task]
    val_tasks: Sequence[Task]
    total_steps: int
    start_step: int = 0
    val_before: float | None = None
    started: float = 0.0
    last_step: int = 0
    """The last step that ended (logged)."""
    saved_step: int = 0
    """The step of the newest checkpoint."""
    saved_at: float = 0.0
    """`time.monotonic()` when it was written."""
    checkpoint_seconds: float = 0.0
    """How long that checkpoint took (for `save_every: auto`)."""


@contextlib.contextmanager
def open_run(cfg: JobConfig, agent: AgentFn | None, run_dir: Path, logger: Logger) -> Iterator[Run | None]:
    """The runtime and backend of a run, after step 0 (warm start) of a fresh run, or restored from
    the latest checkpoint of `run_dir`. Yields None when a stop signal ended the warm start."""
    started = time.perf_counter()
    seed_everything(cfg.seed)
    train_tasks = load_tasks(cfg.data.train_path) if cfg.data.train_path else []
    val_tasks = load_tasks(cfg.data.val_path) if cfg.data.val_path else []
    if not train_tasks:
        raise ValueError("data.train_path is required for training")
    per_epoch = max(1, len(train_tasks) // cfg.global_batch_size)
    total_steps = min(cfg.max_steps if cfg.max_steps is not None else per_epoch * cfg.max_epochs,
                      per_epoch * cfg.max_epochs)
    resume = latest_checkpoint(run_dir)
    warm_dir = run_dir / "checkpoints" / "warm_start"
    base = str(warm_dir) if resume is not None and warm_dir.is_dir() else None
    with EmbeddedRuntime(cfg, run_dir, job_id=run_dir.name, model_path=base) as rt, StopSignals() as stop, \
            contextlib.ExitStack() as stack:
        progress = make_progress(cfg, total_steps)
        try:
            remote = cfg.trainer.backend == "tinker"  # the service's adapters take the warm start too
            backend = stack.enter_context(open_backend(cfg, rt)) if remote else None
            # 0. warm start (fresh runs only), then LoRA adapters
            if resume is None and cfg.warm_start.demos_path and cfg.warm_start.epochs > 0:
                if not warm_start(cfg, rt, logger, progress, stop, backend):  # a signal: nothing to resume yet
                    yield None
                    return
                if backend is not None:
                    backend.save_state(warm_dir)
                else:
                    save_checkpoint(rt.model, rt.tokenizer, warm_dir)
                logger.log_checkpoint(warm_dir, "warm_start")
            # LoRA adapters or fp32 masters; one process or FSDP2 ranks (`train/learner.py`)
            if backend is None:
                backend = stack.enter_context(open_backend(cfg, rt, warm_dir if warm_dir.is_dir() else None))
            run = Run(cfg, rt, backend, rt.dispatcher(agent), logger, run_dir, progress, stop, train_tasks,
                      val_tasks, total_steps, started=started)
            if resume is not None:
                backend.load_state(resume)
                state = load_trainer_state(resume)
                run.start_step, run.val_before = state["step"], state["val_before"]
                run.last_step = run.saved_step = run.start_step
                # the step that was cut short samples again: its trajectories must not count twice
                abandoned = rt.store.abandon_after(state["saved_at"])
                logger.log_metrics({"rollout/abandoned": float(abandoned)}, run.start_step)
            run.saved_at = time.monotonic()
            backend.save_weights_for_sampler()
            if resume is None:
                run.val_before = validate(run, step=0)
                progress.validated(0, run.val_before)
            else:
                restore_rng(state["rng"])
            progress.start_rl(run.start_step)
            try:
                yield run
            except AgentUnavailable as e:
                path = checkpoint_on_exit(run)
                raise RunStopped(f"{e}; stopped after step {run.last_step}" + (
                    f", checkpoint {path}: resume with `turnwise train --resume {run_dir}`" if path else "")) from None
            except BaseException:
                checkpoint_on_exit(run)
                raise
        finally:
            progress.close()


def checkpoint_on_exit(run: Run) -> Path | None:
    """On any exit path: a checkpoint of the last step that ended, unless it has one; its path."""
    if run.last_step > run.saved_step:
        return save_state(run, run.last_step)
    return latest_checkpoint(run.run_dir)


def interrupted_before_rl(run_dir: Path, started: float) -> TrainResult:
    return TrainResult(run_dir=run_dir, steps=0, val_reward_before_rl=None, val_reward_after_rl=None,
                       wall_seconds=time.perf_counter() - started, interrupted=True)


def score(run: Run, groups: Sequence[Group]) -> tuple[list[Group], dict[str, float]]:
    """Step 2: the failure policy decides which groups train; rollout and staleness metrics."""
    kept, metrics = apply_failure_policy(groups, run.cfg.incomplete_groups)
    stale = [staleness(g, run.backend.version) for g in kept]  # versions behind the weights that train
    return kept, metrics | rollout_metrics(groups, run.cfg.success_threshold) | {
        "train/staleness": float(np.mean(stale)) if stale else 0.0,
        "train/staleness_max": float(max(stale, default=0))}


def optimize(run: Run, datums_D: Sequence[Datum], step: int) -> dict[str, float]:
    """Step 5: `num_substeps` x (`forward_backward`, `optim_step`) on the step's datums."""
    cfg = run.cfg
    metrics: dict[str, float] = {}
    schedule = lr_lambda(cfg.lr_schedule, cfg.lr_warmup_steps, run.total_steps * cfg.num_substeps)
    datums_D = list(datums_D)
    if cfg.tis_cap is not None and cfg.num_substeps > 1:  # TIS compares with the pre-update trainer
        datums_D = [dataclasses.replace(d, trainer_logprobs_T=lp)
                    for d, lp in zip(datums_D, run.backend.forward(datums_D), strict=True)]
    for k in range(cfg.num_substeps):
        n = (step - 1) * cfg.num_substeps + k
        metrics = run.backend.forward_backward(datums_D, cfg.loss_fn, cfg.loss_options())
        metrics |= run.backend.optim_step(adam_params(cfg, cfg.learning_rate * schedule(n)))
    tokens = sum(len(d.segment.tokens_T) for d in datums_D) * cfg.num_substeps
    return metrics | {"train/tokens": float(tokens)}


def publish(run: Run) -> dict[str, float]:
    """Step 6: the new weights to the sampler, timed."""
    t0 = time.perf_counter()
    version = run.backend.save_weights_for_sampler()
    return {"train/policy_version": float(version), "weights/bytes_sent": float(run.backend.sync_bytes),
            "speed/weight_sync_s": time.perf_counter() - t0}


def learn(run: Run, groups: Sequence[Group], step: int) -> dict[str, float]:
    """Steps 2-6 on sampled groups (what the async loop runs in a worker thread)."""
    from turnwise.train.datums import groups_to_datums

    t1 = time.perf_counter()
    kept, metrics = score(run, groups)
    datums, adv_metrics = groups_to_datums(kept, run.cfg.advantage_method, run.cfg.advantage_options())
    metrics |= adv_metrics | train_counts(kept) | {"train/tokens": 0.0}
    if datums:
        metrics |= optimize(run, datums, step) | publish(run)
    return metrics | {"speed/train_s": time.perf_counter() - t1}


def train_counts(kept: Sequence[Group]) -> dict[str, float]:
    return {"train/trajectories": float(sum(usable(r) for g in kept for r in g.rollouts_G))}


def adam_params(cfg: JobConfig, learning_rate: float) -> AdamParams:
    return AdamParams(learning_rate=learning_rate, beta1=cfg.adam_beta1, beta2=cfg.adam_beta2, eps=cfg.adam_eps,
                      weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm)


def end_step(run: Run, step: int, groups: Sequence[Group], metrics: dict[str, float], t0: float) -> None:
    """Step 7: metrics, rollouts (JSONL, traces), progress, validation, checkpoint."""
    cfg = run.cfg
    metrics.setdefault("train/dropped_stale", 0.0)
    metrics |= getattr(run.rt.engine, "step_metrics", dict)()  # an engine's own counters (vLLM: sampler/retries)
    metrics["speed/step_s"] = time.perf_counter() - t0
    metrics["speed/tokens_per_s"] = (metrics.get("rollout/sample_tokens", 0.0)
                                          + metrics.get("train/tokens", 0.0)) / max(metrics["speed/step_s"], 1e-9)
    write_rollouts(run.run_dir / "rollouts" / f"step_{step:05d}.jsonl", groups, cfg.eval.answer_key,
                   cfg.success_threshold)
    t_log = time.perf_counter()
    run.logger.log_rollouts(step, groups)  # MLflow: a table of all, traces of a sample
    metrics["speed/log_rollouts_s"] = time.perf_counter() - t_log
    run.logger.log_metrics(metrics, step)
    val = None
    if cfg.val_every and step % cfg.val_every == 0 and step < run.total_steps:
        val = validate(run, step)
    run.progress.update(step, metrics, val)
    run.last_step = step
    if should_save(run, step) or run.stop.received is not None:
        save_state(run, step)


def should_save(run: Run, step: int) -> bool:
    """`save_every` N: every N steps; auto: after the first step, then whenever the time since the
    last checkpoint is at least 20x what that checkpoint took (at most ~5% of the run)."""
    every = run.cfg.save_every
    if every == "auto":
        return run.saved_step == run.start_step or time.monotonic() - run.saved_at >= 20 * run.checkpoint_seconds
    return bool(every) and step % every == 0


def finish(run: Run, step: int) -> TrainResult:
    """After the last step: final validation, checkpoint and exported model (unless interrupted)."""
    interrupted = run.stop.received is not None and step < run.total_steps
    val_after = None
    if not interrupted:
        val_after = validate(run, step) if step > run.start_step else run.val_before
        run.progress.validated(step, val_after)
        if step > run.saved_step:
            save_state(run, step)
        final = run.run_dir / "checkpoints" / "final"
        run.backend.export(final)
        run.logger.log_checkpoint(final, "final")
    return TrainResult(run_dir=run.run_dir, steps=step, val_reward_before_rl=run.val_before,
                       val_reward_after_rl=val_after, wall_seconds=time.perf_counter() - run.started,
                       start_step=run.start_step, interrupted=interrupted)


def save_state(run: Run, step: int) -> Path:
    t0 = time.monotonic()
    path = save_trainer_checkpoint(run.run_dir, step, run.backend,
                                   {"val_before": run.val_before, "next_data_step": step, "saved_at": time.time()})
    run.logger.log_checkpoint(path / "model", path.name)
    run.progress.note(f"checkpoint {path.name}: {path}")
    run.saved_step, run.saved_at, run.checkpoint_seconds = step, time.monotonic(), time.monotonic() - t0
    return path


def warm_start(cfg: JobConfig, rt: EmbeddedRuntime, logger: Logger, progress: Progress,
               stop: StopSignals, backend: TrainingBackend | None = None) -> bool:
    """Step 0: supervised fine-tuning on demonstrations (cross_entropy on assistant tokens), with
    its own optimizer (`backend` given, a Tinker service's: on it, whose Adam state RL continues).
    False when a stop signal ended it early (after the batch in progress)."""
    demos = load_demos(cfg.warm_start.demos_path)  # type: ignore[arg-type]
    datums = [demo_to_datum(rt.chat, msgs, tools, f"demo-{i}") for i, (msgs, tools) in enumerate(demos)]
    rng = random.Random(cfg.seed)
    ws = cfg.warm_start
    n_batches = ws.epochs * max(1, len(datums) // ws.batch_size)
    if backend is None:
        rt.model.requires_grad_(True)  # the sampler may share this model and froze it
        backend = LocalBackend(rt.model, None, tokenizer=rt.tokenizer, micro_batch_size=cfg.micro_batch_size,
                               temperature=1.0, compute_dtype=resolve_dtype(cfg.model))
    options = dataclasses.replace(cfg.loss_options(), loss_agg_mode="token-mean", kl_coef=0.0, tis_cap=None)
    schedule = lr_lambda(ws.lr_schedule, ws.warmup_steps, n_batches)
    progress.start_warm_start(n_batches)
    k = 0
    for _ in range(ws.epochs):
        rng.shuffle(datums)
        for start in range(0, max(1, len(datums) - ws.batch_size + 1), ws.batch_size):
            batch = datums[start:start + ws.batch_size]
            metrics = backend.forward_backward(batch, "cross_entropy", options)
            metrics |= backend.optim_step(adam_params(cfg, ws.learning_rate * schedule(k)))
            k += 1
            logger.log_metrics({"warm_start/loss": metrics["loss/value"],
                                "warm_start/tokens": float(sum(len(d.segment.tokens_T) for d in batch))} | (
                {"warm_start/grad_norm": metrics["loss/grad_norm"]} if "loss/grad_norm" in metrics else {}), k)  # a service may not report the norm
            progress.update_warm_start(k, metrics.get("loss/value", 0.0))
            if stop.received:
                return False
    return True


def make_progress(cfg: JobConfig, total_steps: int) -> Progress:
    """Rich bars on a terminal (`tracking.progress`), plain lines elsewhere (`tracking.console`)."""
    tty = sys.stdout.isatty()
    console = cfg.tracking.console
    return Progress(total_steps, bars=cfg.tracking.progress and tty,
                    lines=console == "on" or (console == "auto" and not tty))


def validate(run: Run, step: int) -> float | None:
    """Temperature-0 rollouts on the validation set: `reward/val` and `reward/val_pass_at_{k}`."""
    cfg, tasks = run.cfg, run.val_tasks
    if not tasks:
        return None
    groups = run.rt.run(run.dispatcher.run_groups(tasks, cfg.val_group_size, cfg.inference_params(greedy=True)))
    metrics = validation_metrics(cfg, groups)
    run.logger.log_metrics(metrics, step)
    return metrics["reward/val"]


def validation_metrics(cfg: JobConfig, groups: Sequence[Group]) -> dict[str, float]:
    rewards = [r.trajectory.reward if usable(r) else 0.0 for g in groups for r in g.rollouts_G]
    metrics = {"reward/val": float(np.mean(rewards))}
    successes = [sum(usable(r) and r.trajectory.reward >= cfg.success_threshold for r in g.rollouts_G)
                 for g in groups]
    for k in cfg.pass_k_values:
        if k <= cfg.val_group_size:
            metrics[f"reward/val_pass_at_{k}"] = mean_pass_at_k(successes, cfg.val_group_size, k)
    return metrics


def write_rollouts(path: Path, groups: Sequence[Group], answer_key: str = "answer",
                   success_threshold: float = 1.0) -> Path:
    """One JSON line per rollout (what `turnwise show` reads): outcome, verdict, final output beside
    the task's expected answer (`answer_key`), and the last turn's whole conversation."""
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
                                    "failure": traj.failure.value if traj.failure else None,
                                    "verdict": verdict(r, success_threshold), "final_output": final_output(r),
                                    "expected": g.task.row.get(answer_key),
                                    "turns": len(traj.turns), "versions": [t.version for t in traj.turns],
                                    "metrics": dict(r.metrics), "messages": messages}) + "\n")
    return path


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
