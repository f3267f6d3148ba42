"""`turnwise train [CONFIG] [--set k=v ...]` and `turnwise train --resume RUN_DIR [--set k=v ...]`.

Under `torchrun` (RANK and WORLD_SIZE set, e.g. several machines) rank 0 runs the job and every
other rank serves it as a learner rank (`train.distributed`); `trainer.nproc` must equal WORLD_SIZE.
"""

from __future__ import annotations

import argparse
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from turnwise.config import ConfigError, load_config
from turnwise.rollout.command_args import add_config_arguments, load_job_config

if TYPE_CHECKING:
    from turnwise.train.step import TrainResult


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue the run in RUN_DIR from its latest checkpoint (its config.yaml, "
                             "plus any --set overrides, e.g. --set max_steps=60)")


def run(args: argparse.Namespace) -> int:
    from turnwise.train.checkpoint import latest_checkpoint
    from turnwise.train.distributed import launched_rank, serve_launched_rank
    from turnwise.train.job import run_train_checked

    if launched_rank() > 0:
        serve_launched_rank()
        return 0

    resume_dir = None
    if args.resume:
        resume_dir = Path(args.resume)
        if args.config:
            raise ConfigError("give either CONFIG or --resume RUN_DIR, not both")
        if not (resume_dir / "config.yaml").is_file() or latest_checkpoint(resume_dir) is None:
            raise ConfigError(f"{resume_dir} is not a run directory with a checkpoint to resume from")
        cfg = load_config(resume_dir / "config.yaml", args.overrides)
    else:
        cfg = load_job_config(args)
    result, summary = run_train_checked(cfg, resume_dir)
    print(f"run: {result.run_dir}")
    if result.interrupted:
        return report_interrupted(result)
    print(f"val reward: after warm start {fmt(result.val_reward_before_rl)}, "
          f"after RL {fmt(result.val_reward_after_rl)}")
    print(f"mlflow: {summary['mlflow_tracking_uri']} (run {summary['mlflow_run_id']})")
    return 0


def report_interrupted(result: TrainResult) -> int:
    """Say where an interrupted run stands and how to go on; the exit code (130)."""
    from turnwise.train.checkpoint import latest_checkpoint

    if latest_checkpoint(result.run_dir) is None:
        print("interrupted during the warm start, before any checkpoint: nothing to resume; run it again")
    else:
        print(f"interrupted after step {result.steps} (checkpoint saved); "
              f"continue with: turnwise train --resume {result.run_dir}")
    return 128 + signal.SIGINT


def fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
