"""The Logger backends: non-finite values are recorded, not dropped; every metric name the trainer
logs is in the one table, with its reduction, and the README documents each one."""

from __future__ import annotations

import json
import math
from pathlib import Path

from turnwise.track import JsonlLogger, MlflowLogger, MultiLogger
from turnwise.track.names import METRICS, reduce_micro_batches, reduction


def test_non_finite_values_are_recorded_in_jsonl_and_mlflow(tmp_path: Path):
    jsonl = JsonlLogger(tmp_path / "metrics.jsonl")
    mlflow = MlflowLogger(f"sqlite:///{tmp_path / 'mlflow.db'}", "t", "run")
    logger = MultiLogger(jsonl, mlflow)
    logger.log_metrics({"loss/value": float("nan"), "loss/grad_norm": float("inf"), "reward/mean": 0.5,
                        "flag": True, "text": "x"}, step=3)
    logger.close()
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert math.isnan(row["loss/value"]) and row["loss/grad_norm"] == math.inf and row["reward/mean"] == 0.5
    assert "flag" not in row and "text" not in row
    metrics = mlflow.client.get_run(mlflow.run_id).data.metrics
    assert math.isnan(metrics["loss/value"]) and metrics["reward/mean"] == 0.5


def test_the_metric_table_names_each_metric_once_and_reduces_micro_batches():
    names = [name for name, _, _ in METRICS]
    assert len(names) == len(set(names))
    assert reduction("loss/ratio_max") == "max" and reduction("loss/clip_frac") == "mean"
    assert reduction("reward/val_pass_at_4") == "mean" and reduction("rollout/stop_final_answer") == "mean"
    assert reduction("rollout/failed_agent_error") == "sum" and reduction("rollout/failed_frac") == "mean"
    assert reduction("loss/my_custom_term") == "mean" and reduction("nonsense") is None
    merged = reduce_micro_batches([({"loss/value": 1.0, "loss/ratio_max": 1.5, "loss/grad_norm": 3.0}, 0.25),
                                   ({"loss/value": 3.0, "loss/ratio_max": 1.1, "loss/grad_norm": 4.0}, 0.75)])
    assert merged == {"loss/value": 2.5, "loss/ratio_max": 1.5, "loss/grad_norm": 4.0}


def test_the_readme_documents_every_metric_of_the_table():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    rows = {line.split("|")[1].strip().strip("`") for line in readme.splitlines() if line.startswith("| `")}
    assert not [name for name, _, _ in METRICS if name not in rows]
