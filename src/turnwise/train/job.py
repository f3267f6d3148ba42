"""A training job: run directory, loggers, agent, summary, plots; and the choice of loop
(`loop.train`, synchronous, or `async_loop.train` when `async_config.max_steps_off_policy` > 0)."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import yaml

from turnwise.config import ConfigError, JobConfig
from turnwise.rollout.agent import load_agent
from turnwise.rollout.usage import run_usage
from turnwise.track import (
    JsonlLogger,
    MlflowLogger,
    MultiLogger,
    TraceOptions,
    default_artifact_location,
    default_tracking_uri,
    flatten_params,
    silence_third_party_bars,
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
        t = cfg.tracking
        backends.append(MlflowLogger(
            default_tracking_uri(cfg.output_dir, t.tracking_uri), t.experiment, f"train: {run_name}", traces=t.traces,
            trace_options=TraceOptions(t.traces_per_step, cfg.success_threshold, cfg.eval.answer_key),
            log_checkpoints=t.log_checkpoints, artifact_location=default_artifact_location(cfg.output_dir, t.tracking_uri),
            tags={"turnwise.kind": "train", "turnwise.run_dir": str(run_dir), "turnwise.config": cfg.name},
            description=describe(cfg, run_dir)))
    return MultiLogger(*backends)


def describe(cfg: JobConfig, run_dir: Path) -> str:
    """The training run's note in MLflow: what trained on what, and where its files are."""
    model = cfg.model.path or "the built-in tiny model"
    warm = (f"a supervised warm start on {cfg.warm_start.demos_path} ({cfg.warm_start.epochs} epochs), then "
            if cfg.warm_start.demos_path and cfg.warm_start.epochs else "")
    return (f"**RL training** of {model}: {warm}{cfg.advantage_method} advantages with the `{cfg.loss_fn}` loss, "
            f"{cfg.global_batch_size} tasks x {cfg.group_size} rollouts per step, on {cfg.data.train_path}.\n\n"
            f"Charts: `rollout/` (reward, pass rate), `val/` (temperature 0), `loss/`, `perf/`, `debug/`. "
            f"Traces: {cfg.tracking.traces_per_step if cfg.tracking.traces else 0} groups of rollouts per step; "
            f"artifacts `rollouts/step_N.json`: every rollout of a step as a table. "
            f"Run directory: `{run_dir}` (inspect with `turnwise show {run_dir}`).")


def select_loop(cfg: JobConfig) -> Callable[..., TrainResult]:
    """The loop's `train(cfg, agent, run_dir, logger)`: async when `max_steps_off_policy` > 0."""
    return async_loop.train if cfg.async_config.max_steps_off_policy > 0 else loop.train


def run_train(cfg: JobConfig, resume_dir: Path | None = None) -> tuple[TrainResult, dict]:
    """Train (or resume the run in `resume_dir` from its latest checkpoint), then write
    `summary.json` and `reward_curve.png` into the run directory."""
    silence_third_party_bars()  # before the model loads
    agent = load_agent(cfg.agent.function) if cfg.agent.kind == "python" else None
    run_dir = new_run_dir(cfg) if resume_dir is None else Path(resume_dir)
    config_path = run_dir / "config.yaml"
    config_path.touch(mode=0o600)  # it holds the API keys, which resume needs
    config_path.chmod(0o600)
    config_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    logger = make_logger(cfg, run_dir, run_dir.name if resume_dir is None else f"{run_dir.name}-resumed")
    logger.log_params(flatten_params(cfg.public_dump()) | ({"resumed_from": str(run_dir)} if resume_dir else {}))
    train = select_loop(cfg)
    mlflow_logger = logger.find(MlflowLogger)
    registered = None
    try:
        result = train(cfg, agent, run_dir, logger)
        curve = plot_reward_curve(run_dir)
        if curve:
            logger.log_artifact(curve)
        logger.log_artifact(run_dir / "metrics.jsonl")
        with tempfile.TemporaryDirectory() as tmp:  # MLflow's copy, with the secrets masked
            (Path(tmp) / "config.yaml").write_text(yaml.safe_dump(cfg.public_dump(), sort_keys=False))
            logger.log_artifact(Path(tmp) / "config.yaml")
        if mlflow_logger and not result.interrupted and (run_dir / "checkpoints" / "final").is_dir():
            name = cfg.tracking.register_model or f"turnwise-{cfg.name}"
            version = mlflow_logger.register_model(name, "final")
            registered = None if version is None else f"models:/{name}/{version}"
        summary = {**{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(result).items()},
                   "reward_curve": str(run_dir / "reward_curve.png"),
                   "mlflow_tracking_uri": mlflow_logger.tracking_uri if mlflow_logger else None,
                   "mlflow_run_id": mlflow_logger.run_id if mlflow_logger else None,
                   "registered_model": registered, "usage": run_usage(run_dir)}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        logger.log_artifact(run_dir / "summary.json")
    finally:
        logger.close()
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
    """`reward_curve.png`: the warm start's loss (left, when there was one) and the RL reward per
    step with validation at temperature 0 (right; step 0 is the model after the warm start)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    warm_pts = [(r["step"], r["warm_start/loss"]) for r in rows if "warm_start/loss" in r]
    train_pts = [(r["step"], r["reward/mean"]) for r in rows if "reward/mean" in r]
    val_pts = [(r["step"], r["reward/val"]) for r in rows if "reward/val" in r]
    if not train_pts and not val_pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if warm_pts else 1, figsize=(10 if warm_pts else 6, 3.8), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 2]} if warm_pts else None)
    if warm_pts:
        ax = axes[0][0]
        ax.plot(*zip(*warm_pts, strict=True), color="C2")
        ax.set_title("warm start (supervised)")
        ax.set_xlabel("warm-start step")
        ax.set_ylabel("cross-entropy loss")
        ax.grid(alpha=0.3)
    ax = axes[0][-1]
    if train_pts:
        ax.plot(*zip(*train_pts, strict=True), label="training rollouts (reward/mean)")
    if val_pts:
        ax.plot(*zip(*val_pts, strict=True), marker="o", label="validation, temperature 0 (reward/val)")
        if val_pts[0][0] == 0:
            ax.annotate("after warm start", val_pts[0], textcoords="offset points", xytext=(6, -14), fontsize=8)
    ax.set_title(f"RL: reward per step ({run_dir.name})", fontsize=10)
    ax.set_xlabel("RL step")
    ax.set_ylabel("reward")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = run_dir / "reward_curve.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
