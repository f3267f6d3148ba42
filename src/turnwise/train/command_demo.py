"""`turnwise demo`: train the support-desk demo and print what it shows."""

from __future__ import annotations

import argparse

from turnwise.train.command import add_config_arguments, fmt, load_job_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from turnwise.train.job import run_train_checked

    result, summary = run_train_checked(load_job_config(args))
    print()
    print(f"  validation reward after warm start : {fmt(result.val_reward_before_rl)}")
    print(f"  validation reward after RL         : {fmt(result.val_reward_after_rl)}")
    print(f"  RL steps: {result.steps}   wall time: {result.wall_seconds:.0f}s")
    print(f"  reward curve: {summary['reward_curve']}")
    print(f"  MLflow: mlflow ui --backend-store-uri {summary['mlflow_tracking_uri']}")
    print(f"summary: {result.run_dir / 'summary.json'}")
    return 0
