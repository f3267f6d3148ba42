"""turnwise command line: `turnwise train | demo` (more subcommands join as they land)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from turnwise.config import ConfigError, JobConfig, load_config

DEMO_CONFIG = Path("examples") / "support_desk" / "config.yaml"

EXAMPLES = """examples:
  turnwise demo                                   train the default demo (support desk, tiny model, CPU)
  turnwise train                                  same job as the demo, without the demo's summary
  turnwise train my_job.yaml                      train with your config
  turnwise train my_job.yaml --set group_size=4 --set data.train_path=tasks.jsonl
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="turnwise", description="Multi-turn RL for tool-using LLM agents.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("train", "train an agent with RL (no CONFIG: the demo's config)"),
                            ("demo", "train the default demo and print what it shows")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("config", nargs="?", help="YAML config file")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key (repeatable), e.g. --set learning_rate=1e-4")
    args = parser.parse_args(argv)
    try:
        cfg = _load(args.config, args.overrides)
        from turnwise.train.data import TaskFileError
        from turnwise.train.dispatch import AgentLoadError
        from turnwise.train.sft import DemoFileError

        try:
            return _demo(cfg) if args.command == "demo" else _train(cfg)
        except (TaskFileError, AgentLoadError, DemoFileError) as e:
            raise ConfigError(str(e)) from None
    except ConfigError as e:
        print(f"turnwise: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("turnwise: interrupted", file=sys.stderr)
        return 130


def _load(config: str | None, overrides: list[str]) -> JobConfig:
    if config is None:
        if not DEMO_CONFIG.is_file():
            raise ConfigError(f"no CONFIG given and no demo config at ./{DEMO_CONFIG}; "
                              "run from the turnwise repository or pass a config file")
        config = str(DEMO_CONFIG)
    return load_config(config, overrides)


def _train(cfg: JobConfig) -> int:
    from turnwise.train.job import run_train

    result, summary = run_train(cfg)
    print(f"run: {result.run_dir}")
    print(f"val reward: after warm start {_fmt(result.val_reward_before_rl)}, "
          f"after RL {_fmt(result.val_reward_after_rl)}")
    print(f"mlflow: {summary['mlflow_tracking_uri']} (run {summary['mlflow_run_id']})")
    return 0


def _demo(cfg: JobConfig) -> int:
    from turnwise.train.job import run_train

    result, summary = run_train(cfg)
    before, after = result.val_reward_before_rl, result.val_reward_after_rl
    print()
    print(f"  validation reward after warm start : {_fmt(before)}")
    print(f"  validation reward after RL         : {_fmt(after)}")
    print(f"  RL steps: {result.steps}   wall time: {result.wall_seconds:.0f}s")
    print(f"  reward curve: {summary['reward_curve']}")
    print(f"  MLflow: {summary['mlflow_tracking_uri']}  (mlflow ui --backend-store-uri "
          f"{summary['mlflow_tracking_uri']})")
    print(f"summary: {result.run_dir / 'summary.json'}")
    return 0


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


if __name__ == "__main__":
    sys.exit(main())
