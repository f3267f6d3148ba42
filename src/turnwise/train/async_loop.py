"""The asynchronous loop: sampling continues while the trainer updates, within a staleness bound.

Same steps as `loop.py` (it runs `step.learn` and `step.end_step`), scheduled differently:
- groups are launched one task at a time from the same seeded task stream, as long as at most
  (k + 1) x `global_batch_size` groups are in flight or waiting (k = `max_steps_off_policy`);
- a step takes the first `global_batch_size` groups to complete, in completion order, so one
  straggler no longer holds the step: it lands in a later batch;
- a group's staleness is the current policy version minus the version of its oldest token
  (every token records the version that sampled it); a group staler than k is dropped and
  counted (`train/dropped_stale`), its slot refilled from the stream;
- while the learner steps (in a worker thread), the event loop keeps running agents with the
  previous weights; the new weights reach the sampler between two decode steps.
The loss's importance ratio is taken against the sampler's logprobs, so off-policy tokens are
corrected (and clipped) by the chosen loss. Departure from the synchronous loop: the batch of a
step depends on completion order, so resuming restores weights, optimizer and position in the
task stream, but not the exact batch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

from turnwise.config import JobConfig
from turnwise.rollout.agent import AgentFn
from turnwise.rollout.tasks import batches
from turnwise.track import Logger
from turnwise.train.metrics import staleness
from turnwise.train.step import Run, TrainResult, end_step, finish, interrupted_before_rl, learn, open_run
from turnwise.types import Group, Task

_EPOCHS_FOREVER = 1_000_000  # dropped groups consume tasks, so the stream may run past max_epochs


def train(cfg: JobConfig, agent: AgentFn | None, run_dir: Path, logger: Logger) -> TrainResult:
    """Train with the asynchronous loop (`async_config.max_steps_off_policy` > 0)."""
    started = time.perf_counter()
    with open_run(cfg, agent, run_dir, logger) as run:
        if run is None:
            return interrupted_before_rl(run_dir, started)
        return finish(run, run.rt.run(_steps(run)))


async def _steps(run: Run) -> int:
    """Steps `start_step + 1 ..` until `total_steps` or a stop signal; returns the last step done."""
    cfg = run.cfg
    bound, size = cfg.async_config.max_steps_off_policy, cfg.global_batch_size
    stream: Iterator[tuple[int, Task]] = (
        (epoch, task) for epoch, tasks in batches(run.train_tasks, size, cfg.seed, cfg.data.shuffle,
                                                  _EPOCHS_FOREVER, start_step=run.start_step) for task in tasks)
    done: asyncio.Queue[tuple[int, Group]] = asyncio.Queue()
    in_flight: set[asyncio.Task] = set()
    params = cfg.inference_params()

    async def one_group(epoch: int, task: Task) -> None:
        [group] = await run.dispatcher.run_groups([task], cfg.group_size, params)
        done.put_nowait((epoch, group))

    def launch() -> None:
        while len(in_flight) + done.qsize() < (bound + 1) * size:
            epoch, task = next(stream)
            t = asyncio.ensure_future(one_group(epoch, task))
            in_flight.add(t)
            t.add_done_callback(in_flight.discard)

    step = run.start_step
    try:
        while step < run.total_steps and run.stop.received is None:
            t0 = time.perf_counter()
            batch: list[Group] = []
            epochs: list[int] = []
            dropped: list[int] = []
            while len(batch) < size:
                launch()
                epoch, group = await done.get()
                s = staleness(group, run.backend.version)
                if s > bound:
                    dropped.append(s)
                    continue
                batch.append(group)
                epochs.append(epoch)
            launch()  # refill now: these rollouts run while the learner steps
            t_sample = time.perf_counter() - t0
            step += 1
            metrics = await asyncio.to_thread(learn, run, batch, step)
            metrics |= {"speed/sample_s": t_sample, "train/epoch": max(epochs),
                        "train/dropped_stale": float(len(dropped)), "train/in_flight": float(len(in_flight))}
            await asyncio.to_thread(end_step, run, step, batch, metrics, t0)
    finally:
        for t in list(in_flight):
            t.cancel()
        await asyncio.gather(*in_flight, return_exceptions=True)
    return step
