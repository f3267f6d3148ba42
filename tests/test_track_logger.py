"""The Logger backends: non-finite values are recorded, not dropped; the console prints a plain
line per step; every metric name the trainer logs is in the one table, with its reduction."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from turnwise.track import ConsoleLogger, JsonlLogger, MlflowLogger, MultiLogger
from turnwise.track.names import METRICS, reduce_micro_batches, reduction


def test_non_finite_values_are_recorded_in_jsonl_and_mlflow(tmp_path: Path):
    jsonl = JsonlLogger(tmp_path / "metrics.jsonl")
    mlflow = MlflowLogger(f"sqlite:///{tmp_path / 'mlflow.db'}", "t", "run")
    logger = MultiLogger(jsonl, mlflow)
    logger.log_metrics({"loss/value": float("nan"), "loss/grad_norm": float("inf"), "rollout/reward/mean": 0.5,
                        "flag": True, "text": "x"}, step=3)
    logger.close()
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert math.isnan(row["loss/value"]) and row["loss/grad_norm"] == math.inf and row["rollout/reward/mean"] == 0.5
    assert "flag" not in row and "text" not in row
    metrics = mlflow.client.get_run(mlflow.run_id).data.metrics
    assert math.isnan(metrics["loss/value"]) and metrics["rollout/reward/mean"] == 0.5


def test_console_prints_one_plain_line_per_step():
    out = io.StringIO()
    console = ConsoleLogger(out)
    console.log_metrics({"rollout/reward/mean": 0.25, "rollout/pass_rate": 0.125, "loss/value": 1.5,
                         "time/step": 2.0, "analysis/num_groups": 4}, step=7)
    console.log_metrics({"analysis/num_groups": 4}, step=8)  # nothing worth a line
    console.log_checkpoint(Path("/runs/x/checkpoints/final"), "final")
    lines = out.getvalue().splitlines()
    assert lines == ["step 7: reward/mean 0.25, pass_rate 0.125, loss/value 1.5, time/step 2",
                     "checkpoint final: /runs/x/checkpoints/final"]


def test_the_metric_table_names_each_metric_once_and_reduces_micro_batches():
    names = [name for name, _, _ in METRICS]
    assert len(names) == len(set(names))
    assert reduction("loss/ratio_max") == "max" and reduction("loss/clip_frac") == "mean"
    assert reduction("val/reward/pass_at_4") == "mean" and reduction("rollout/stop/final_answer") == "mean"
    assert reduction("loss/my_custom_term") == "mean" and reduction("nonsense") is None
    merged = reduce_micro_batches([({"loss/value": 1.0, "loss/ratio_max": 1.5, "loss/grad_norm": 3.0}, 0.25),
                                   ({"loss/value": 3.0, "loss/ratio_max": 1.1, "loss/grad_norm": 4.0}, 0.75)])
    assert merged == {"loss/value": 2.5, "loss/ratio_max": 1.5, "loss/grad_norm": 4.0}
