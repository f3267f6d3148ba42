"""turnwise command line. Each subcommand lives in its own module with
`add_arguments(parser)` and `run(args) -> int`; this file only routes to them."""

from __future__ import annotations

import argparse
import importlib
import sys

from turnwise.config import ConfigError, RunStopped

# name -> (module, one-line help). Modules load only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("turnwise.demo", "train the default demo and show what it learned"),
    "train": ("turnwise.train.command", "train an agent with RL (no CONFIG: the demo's config)"),
    "show": ("turnwise.train.command_show", "print a training step's trajectories (roles, tool calls, rewards)"),
    "eval": ("turnwise.eval.command", "evaluate a model on held-out tasks: pass@k, pass^k, exact match, gate"),
    "serve": ("turnwise.rollout.command_serve", "run the runtime server alone (policy + OpenAI API + task queue)"),
    "worker": ("turnwise.adapter.command_worker", "lease rollouts from a runtime server and run an agent on them"),
    "verify": ("turnwise.eval.command_verify",
               "check an environment: reproducible, isolated, production schemas, oracle 1 / null 0"),
    "service": ("turnwise.service.command", "run the job service: submit train/eval jobs over an API, per-token usage"),
    "jobs": ("turnwise.client.command_jobs", "submit, list, describe, stop jobs of a job service; logs and usage"),
}

EXAMPLES = """examples:
  turnwise demo                                   the default demo (support desk, tiny model, CPU)
  turnwise train my_job.yaml --set group_size=4   train your job, with an override
  turnwise train --resume runs/<run>              continue an interrupted run exactly
  turnwise show runs/<run> --step 3               read a step's conversations
  turnwise eval my_job.yaml --compare base runs/<run>/checkpoints/final
  turnwise verify my_job.yaml                     prove an environment reproducible and isolated
  turnwise serve --port 8000                      the runtime server alone, for remote agents
  turnwise worker --agent my_agent:agent --server http://127.0.0.1:8000
  turnwise service                                the job service (API, console at /)
  turnwise jobs list --api-key KEY                its jobs
  turnwise <command> --help                       options of one command
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="turnwise", description="Multi-turn RL for tool-using LLM agents.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text)
    # parse the command name first, then let only that command's module add its options
    name = next((a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")), None)
    if name in COMMANDS:
        module = importlib.import_module(COMMANDS[name][0])
        module.add_arguments(sub.choices[name])
    args = parser.parse_args(argv)
    try:
        return int(module.run(args))
    except ConfigError as e:
        print(f"turnwise: error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:
        print(f"turnwise: stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("turnwise: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
