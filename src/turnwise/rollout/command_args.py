"""CONFIG and `--set` for the commands that run a job (`turnwise train`, `eval`, `verify`, `demo`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from turnwise.config import ConfigError, JobConfig, load_config

DEMO_CONFIG = Path("examples") / "support_desk" / "config.yaml"


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """CONFIG and `--set` for a command that runs a job."""
    parser.add_argument("config", nargs="?", help=f"YAML config file (default: ./{DEMO_CONFIG})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable), e.g. --set learning_rate=1e-4")


def load_job_config(args: argparse.Namespace) -> JobConfig:
    """The config `add_config_arguments` parsed (no CONFIG: the demo's)."""
    config = args.config
    if config is None:
        if not DEMO_CONFIG.is_file():
            raise ConfigError(f"no CONFIG given and no demo config at ./{DEMO_CONFIG}; "
                              "run from the turnwise repository or pass a config file")
        config = str(DEMO_CONFIG)
    return load_config(config, args.overrides)
