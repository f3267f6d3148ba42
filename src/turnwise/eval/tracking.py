"""Evaluations in MLflow: a run per evaluated model and a run per comparison, each named by what
it evaluates (`eval: warm start`, `eval: RL step 30`, `compare: warm start vs RL step 30`),
tagged `turnwise.kind` (eval | compare) and, when a training run produced the models, with its
id (`turnwise.train_run_id`), so the runs page links them. A comparison logs, per metric, B − A
as `delta/<metric>` and its bootstrap interval as `delta_low/<metric>` and `delta_high/<metric>`,
and the whole table (`comparison_table.json`, shown as a table by the MLflow UI).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from turnwise.config import JobConfig
from turnwise.eval.stats import Delta


def _logger(cfg: JobConfig, run_name: str, tags: Mapping[str, str], description: str) -> Any:
    from turnwise.track import MlflowLogger, default_artifact_location, default_tracking_uri

    t = cfg.tracking
    return MlflowLogger(default_tracking_uri(cfg.output_dir, t.tracking_uri), t.experiment, run_name,
                        artifact_location=default_artifact_location(cfg.output_dir, t.tracking_uri),
                        tags=dict(tags), description=description)


def log_evaluation(cfg: JobConfig, label: str, model: str, metrics: Mapping[str, float], meta: Mapping[str, Any],
                   artifacts: Sequence[Path], tags: Mapping[str, str] | None = None) -> str | None:
    """The run of one evaluated model; its id (None when MLflow is off)."""
    if not cfg.tracking.mlflow:
        return None
    from turnwise.track import flatten_params

    description = (f"**Evaluation** of {label} (`{model}`) on {cfg.data.test_path}: {meta['group_size']} trials "
                   f"per task, grader `{meta['grader']}`. Report: `report.md`; every trial: `tasks.jsonl`.")
    logger = _logger(cfg, f"eval: {label}", {"turnwise.kind": "eval", "turnwise.model": model,
                                            "turnwise.label": label, **(tags or {})}, description)
    try:
        logger.log_params(flatten_params({"eval": dict(meta)}))
        logger.log_metrics(metrics, 0)
        for path in artifacts:
            logger.log_artifact(path)
    finally:
        logger.close()
    return logger.run_id


def comparison_table(label_a: str, label_b: str, deltas: Mapping[str, Delta]) -> dict[str, list[Any]]:
    """Columns of the comparison: metric, A, B, B − A, interval bounds."""
    names = list(deltas)
    return {"metric": names, label_a: [deltas[m].a for m in names], label_b: [deltas[m].b for m in names],
            "delta": [deltas[m].delta for m in names], "low": [deltas[m].low for m in names],
            "high": [deltas[m].high for m in names]}


def log_comparison(cfg: JobConfig, label_a: str, label_b: str, deltas: Mapping[str, Delta], confidence: float,
                   run_ids: tuple[str | None, str | None], artifacts: Sequence[Path],
                   tags: Mapping[str, str] | None = None) -> str | None:
    """The run of a comparison (B − A with intervals, as metrics and a table); its id."""
    if not cfg.tracking.mlflow:
        return None
    metrics: dict[str, float] = {}
    for name, d in deltas.items():
        metrics[f"delta/{name}"] = d.delta
        if d.low is not None and d.high is not None:
            metrics[f"delta_low/{name}"], metrics[f"delta_high/{name}"] = d.low, d.high
    description = (f"**Comparison** of {label_b} (B) with {label_a} (A) on the same tasks: `delta/<metric>` = B − A, "
                   f"`delta_low/` and `delta_high/` its paired-bootstrap {confidence:.0%} interval; the table is "
                   f"`comparison_table.json`. Eval runs: A `{run_ids[0]}`, B `{run_ids[1]}`.")
    logger = _logger(cfg, f"compare: {label_a} vs {label_b}",
                     {"turnwise.kind": "compare", "turnwise.eval_run_a": str(run_ids[0]),
                      "turnwise.eval_run_b": str(run_ids[1]), **(tags or {})}, description)
    try:
        logger.log_params({"a": label_a, "b": label_b, "confidence": confidence})
        logger.log_metrics(metrics, 0)
        logger.client.log_table(logger.run_id, comparison_table(label_a, label_b, deltas), "comparison_table.json")
        for path in artifacts:
            logger.log_artifact(path)
    finally:
        logger.close()
    return logger.run_id
