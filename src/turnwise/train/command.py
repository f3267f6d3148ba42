"""`turnwise train [CONFIG] [--set k=v ...]`."""

from __future__ import annotations

import argparse
from pathlib import Path

from turnwise.config import ConfigError, JobConfig, load_config

DEMO_CONFIG = Path("examples") / "support_desk" / "config.yaml"


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help=f"YAML config file (default: ./{DEMO_CONFIG})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable), e.g. --set learning_rate=1e-4")


def load_job_config(args: argparse.Namespace) -> JobConfig:
    config = args.config
    if config is None:
        if not DEMO_CONFIG.is_file():
            raise ConfigError(f"no CONFIG given and no demo config at ./{DEMO_CONFIG}; "
                              "run from the turnwise repository or pass a config file")
        config = str(DEMO_CONFIG)
    return load_config(config, args.overrides)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from turnwise.train.job import run_train_checked

    result, summary = run_train_checked(load_job_config(args))
    print(f"run: {result.run_dir}")
    print(f"val reward: after warm start {fmt(result.val_reward_before_rl)}, "
          f"after RL {fmt(result.val_reward_after_rl)}")
    print(f"mlflow: {summary['mlflow_tracking_uri']} (run {summary['mlflow_run_id']})")
    return 0


def fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
