"""A training job: run directory, loggers, agent, summary, plots; and the choice of loop
(`loop.train`, synchronous, or `async_loop.train` when `async_config.max_steps_off_policy` > 0)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import yaml

from turnwise.config import ConfigError, JobConfig
from turnwise.rollout.agent import load_agent
from turnwise.track import (
    ConsoleLogger,
    JsonlLogger,
    MlflowLogger,
    MultiLogger,
    default_tracking_uri,
    flatten_params,
)
from turnwise.train import async_loop, loop
from turnwise.train.step import TrainResult


def new_run_dir(cfg: JobConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(cfg.output_dir) / f"{cfg.name}-{stamp}"
    run_dir, n = base, 1
    while run_dir.exists():
        n += 1
        run_dir = base.with_name(f"{base.name}-{n}")
    try:
        run_dir.mkdir(parents=True)
        (run_dir / ".write-check").touch()
        (run_dir / ".write-check").unlink()
    except OSError as e:
        raise ConfigError(f"output_dir {cfg.output_dir!r}: cannot create the run directory {run_dir}: "
                          f"{e.strerror or e}") from None
    return run_dir


def make_logger(cfg: JobConfig, run_dir: Path, run_name: str) -> MultiLogger:
    backends: list = [JsonlLogger(run_dir / "metrics.jsonl")]
    if cfg.tracking.mlflow:
        uri = default_tracking_uri(cfg.output_dir, cfg.tracking.tracking_uri)
        backends.append(MlflowLogger(uri, cfg.tracking.experiment, run_name, traces=cfg.tracking.traces,
                                     log_checkpoints=cfg.tracking.log_checkpoints))
    console = cfg.tracking.console
    if console == "on" or (console == "auto" and not sys.stderr.isatty()):
        backends.append(ConsoleLogger())
    return MultiLogger(*backends)


def select_loop(cfg: JobConfig) -> Callable[..., TrainResult]:
    """The loop's `train(cfg, agent, run_dir, logger)`: async when `max_steps_off_policy` > 0."""
    return async_loop.train if cfg.async_config.max_steps_off_policy > 0 else loop.train


def run_train(cfg: JobConfig, resume_dir: Path | None = None) -> tuple[TrainResult, dict]:
    """Train (or resume the run in `resume_dir` from its latest checkpoint), then write
    `summary.json` and `reward_curve.png` into the run directory."""
    agent = load_agent(cfg.agent.function) if cfg.agent.kind == "python" else None
    run_dir = new_run_dir(cfg) if resume_dir is None else Path(resume_dir)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    logger = make_logger(cfg, run_dir, run_dir.name if resume_dir is None else f"{run_dir.name}-resumed")
    logger.log_params(flatten_params(cfg.model_dump(mode="json")) | ({"resumed_from": str(run_dir)} if resume_dir else {}))
    train = select_loop(cfg)
    try:
        result = train(cfg, agent, run_dir, logger)
        curve = plot_reward_curve(run_dir)
        if curve:
            logger.log_artifact(curve)
        logger.log_artifact(run_dir / "metrics.jsonl")
    finally:
        logger.close()
    mlflow_logger = logger.find(MlflowLogger)
    summary = {**{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(result).items()},
               "reward_curve": str(run_dir / "reward_curve.png"),
               "mlflow_tracking_uri": mlflow_logger.tracking_uri if mlflow_logger else None,
               "mlflow_run_id": mlflow_logger.run_id if mlflow_logger else None}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return result, summary


def run_train_checked(cfg: JobConfig, resume_dir: Path | None = None) -> tuple[TrainResult, dict]:
    """`run_train`, with bad input files reported as ConfigError (a message, not a traceback)."""
    from turnwise.policy.load import ModelLoadError
    from turnwise.rollout.agent import AgentLoadError
    from turnwise.rollout.tasks import TaskFileError
    from turnwise.train.sft import DemoFileError

    try:
        return run_train(cfg, resume_dir)
    except (TaskFileError, AgentLoadError, DemoFileError, ModelLoadError) as e:
        raise ConfigError(str(e)) from None


def plot_reward_curve(run_dir: Path) -> Path | None:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    train_pts = [(r["step"], r["rollout/reward/mean"]) for r in rows if "rollout/reward/mean" in r]
    val_pts = [(r["step"], r["val/reward/mean"]) for r in rows if "val/reward/mean" in r]
    if not train_pts and not val_pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train_pts:
        ax.plot(*zip(*train_pts, strict=True), label="rollout/reward/mean")
    if val_pts:
        ax.plot(*zip(*val_pts, strict=True), marker="o", label="val/reward/mean (temperature 0)")
    ax.set_xlabel("RL step")
    ax.set_ylabel("reward")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = run_dir / "reward_curve.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
