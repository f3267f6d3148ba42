"""`turnwise verify [CONFIG] [--set k=v ...] [--json]`: is the environment fit for training?

Runs the job's agent (any `agent.kind`) on `verify.tasks` tasks from `data.train_path` with the
job's policy (`model`), then the checks of `turnwise.eval.verify`. Exit code 0 when every check passes or
is skipped, 1 when one fails, 2 on a config error.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from turnwise.config import AgentConfig, ConfigError, JobConfig
from turnwise.eval.verify import VerifyReport, load_tool_entries, verify_environment
from turnwise.rollout.agent import AgentFn, AgentLoadError, load_agent
from turnwise.rollout.command_args import add_config_arguments, load_job_config
from turnwise.rollout.tasks import TaskFileError, epoch_order, load_tasks
from turnwise.runtime.protocols import Chat, Sampler
from turnwise.types import Task


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of text")


def run(args: argparse.Namespace) -> int:
    cfg = load_job_config(args)
    report = verify_job(cfg)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.render())
    return 0 if report.ok else 1


@contextmanager
def job_policy(cfg: JobConfig) -> Iterator[tuple[Sampler, Chat]]:
    """The job's policy (`model`) as a started sampler engine and its chat format."""
    from turnwise.rollout.runtime import load_engine

    _, _, chat, engine = load_engine(cfg)
    with engine:
        yield engine, chat


def verify_job(cfg: JobConfig, policy: Callable[[JobConfig], Any] | None = None) -> VerifyReport:
    """Resolve the config's agents, tasks and schemas, then verify against `policy(cfg)`
    (default `job_policy`: the configured model)."""
    v = cfg.verify
    agent: AgentFn | AgentConfig = (_agent(cfg.agent.function, "agent.function") if cfg.agent.kind == "python"
                                    else cfg.agent)
    oracle = _agent(v.oracle_agent, "verify.oracle_agent") if v.oracle_agent else None
    null = _agent(v.null_agent, "verify.null_agent") if v.null_agent else None
    tools = load_tool_entries(_import(v.tools, "verify.tools"), v.tools) if v.tools else None
    production = _production_schemas(v.production_schemas) if v.production_schemas else None
    tasks = sample_tasks(cfg)
    with (policy or job_policy)(cfg) as (sampler, chat):
        return asyncio.run(verify_environment(
            agent, tasks, policy=sampler, chat=chat, cfg=cfg, concurrency=v.concurrency,
            production_schemas=production, tools=tools, oracle_agent=oracle, null_agent=null))


def sample_tasks(cfg: JobConfig) -> list[Task]:
    """`verify.tasks` tasks of `data.train_path`, in the seeded order of the first epoch."""
    if cfg.data.train_path is None:
        raise ConfigError("verify needs data.train_path (the tasks to run)")
    try:
        tasks = load_tasks(cfg.data.train_path)
    except TaskFileError as e:
        raise ConfigError(str(e)) from None
    return [tasks[i] for i in epoch_order(len(tasks), cfg.seed, 0, cfg.data.shuffle)[:cfg.verify.tasks]]


def _agent(spec: str | None, key: str) -> AgentFn:
    try:
        return load_agent(spec)
    except AgentLoadError as e:
        raise ConfigError(f"{key}: {e}") from None


def _import(spec: str, key: str) -> Any:
    module_name, sep, attr = spec.partition(":")
    if not sep:
        raise ConfigError(f"{key} must look like 'package.module:attribute', got {spec!r}")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{key}: cannot load {spec!r}: {e}") from None


def _production_schemas(path: str) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"verify.production_schemas: file not found: {p}")
    try:
        return load_tool_entries(yaml.safe_load(p.read_text()), str(p))
    except (yaml.YAMLError, ValueError) as e:
        raise ConfigError(f"verify.production_schemas: {e}") from None
