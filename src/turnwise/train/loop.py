"""The reference training loop: synchronous, one step at a time, readable top to bottom.

Algorithm (GRPO-style multi-turn RL with a supervised warm start):
  0. warm start: `cross_entropy` on the assistant tokens of demonstrations (the tiny model
     starts from random weights, so it first learns the format and the tools); then LoRA
     adapters when `lora_rank` > 0 (`step.open_run`, which also resumes from a checkpoint)
  per step:
  1. sample:      `global_batch_size` tasks x `group_size` rollouts; agents call the runtime
  2. score:       each agent returns its reward; the failure policy drops failed rollouts
                  (and, with `incomplete_groups: drop`, their groups)
  3. advantages:  `advantage_method` within each group (default `group_based` = GRPO)
  4. datums:      token-exact segments from the runtime, with per-token advantages
  5. optimize:    `forward_backward` with `loss_fn` (default `ppo`, ratio to the sampler's
                  logprobs), then `optim_step` (AdamW), `num_substeps` times
  6. publish:     `save_weights_for_sampler`: new weights to the sampler, policy version + 1
  7. log:         metrics, rollouts (JSONL + MLflow traces); validation at temperature 0 every
                  `val_every` steps; a checkpoint every `save_every` steps, at the end, and on
                  SIGINT/SIGTERM
Steps 5-6 are the calls of `turnwise.backends.TrainingBackend` (Tinker's contract), so the
same loop drives any training backend. Departures from GRPO as published: no KL term by default
(`kl_coef` 0, as in DAPO and Dr. GRPO), and the ratio is taken against the sampler's own
logprobs rather than a recomputed old policy. A run directory holding a checkpoint resumes from
it: the next batch is the one the uninterrupted run would have drawn (`rollout.tasks.batches` is
a pure function of seed and step). The asynchronous loop (`async_loop.py`) runs the same steps
with another schedule; `train.job` picks one.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

from turnwise.config import JobConfig
from turnwise.rollout.agent import AgentFn
from turnwise.rollout.tasks import batches
from turnwise.track import Logger
from turnwise.train.datums import groups_to_datums
from turnwise.train.step import (
    TrainResult,
    end_step,
    finish,
    interrupted_before_rl,
    open_run,
    optimize,
    publish,
    score,
    train_counts,
)


def train(cfg: JobConfig, agent: AgentFn | None, run_dir: Path, logger: Logger) -> TrainResult:
    """Train with the synchronous loop; returns the validation reward before and after RL."""
    started = time.perf_counter()
    with open_run(cfg, agent, run_dir, logger) as run:  # 0. warm start, or resume
        if run is None:
            return interrupted_before_rl(run_dir, started)
        step = run.start_step
        schedule = batches(run.train_tasks, cfg.global_batch_size, cfg.seed, cfg.data.shuffle, cfg.max_epochs,
                           start_step=run.start_step)
        for step, (epoch, tasks) in enumerate(itertools.islice(schedule, run.total_steps - run.start_step),
                                              start=run.start_step + 1):
            t0 = time.perf_counter()
            # 1. sample: group_size rollouts of each task, the agents calling the runtime
            groups = run.rt.run(run.dispatcher.run_groups(tasks, cfg.group_size, cfg.inference_params()))
            t1 = time.perf_counter()
            # 2. score: which groups train under the failure policy
            kept, metrics = score(run, groups)
            # 3-4. advantages within each group, token-exact datums
            datums, adv_metrics = groups_to_datums(kept, cfg.advantage_method, cfg.advantage_options())
            metrics |= adv_metrics | train_counts(kept) | {"train/tokens": 0.0}
            if datums:
                # 5. forward_backward + optim_step, num_substeps times
                metrics |= optimize(run, datums, step)
                # 6. the new weights to the sampler
                metrics |= publish(run)
            metrics |= {"speed/sample_s": t1 - t0, "speed/train_s": time.perf_counter() - t1, "train/epoch": epoch}
            # 7. log, validate, checkpoint
            end_step(run, step, groups, metrics, t0)
            if run.stop.received:
                break
        return finish(run, step)
