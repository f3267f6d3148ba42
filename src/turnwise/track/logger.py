"""One `Logger` interface with console, JSONL and MLflow backends.

Keys are slash-namespaced (`rollout/reward/mean`). The trainer talks to a `MultiLogger` and
never to a backend directly, so adding a backend touches no training code.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol


class Logger(Protocol):
    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path, artifact_dir: str | None = None) -> None: ...
    def close(self) -> None: ...


class JsonlLogger:
    """Appends one JSON line per `log_metrics` call to `metrics.jsonl`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def log_params(self, params: Mapping[str, Any]) -> None:
        (self.path.parent / "params.json").write_text(json.dumps(dict(params), indent=1, default=str))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        clean = {k: v for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)}
        self._file.write(json.dumps({"step": step, **clean}) + "\n")
        self._file.flush()

    def log_artifact(self, path: str | Path, artifact_dir: str | None = None) -> None:
        pass  # artifacts already live in the run directory

    def close(self) -> None:
        self._file.close()


class MlflowLogger:
    """Logs to MLflow through an explicit client and run id (no global fluent state)."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str) -> None:
        import logging

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        self.experiment_id = experiment_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, int | float) and math.isfinite(v)]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def log_artifact(self, path: str | Path, artifact_dir: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_dir)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class MultiLogger:
    """Fans every call out to several backends."""

    def __init__(self, *backends: Logger) -> None:
        self.backends = backends

    def log_params(self, params: Mapping[str, Any]) -> None:
        for b in self.backends:
            b.log_params(params)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for b in self.backends:
            b.log_metrics(metrics, step)

    def log_artifact(self, path: str | Path, artifact_dir: str | None = None) -> None:
        for b in self.backends:
            b.log_artifact(path, artifact_dir)

    def close(self) -> None:
        for b in self.backends:
            b.close()

    def find(self, kind: type) -> Any:
        return next((b for b in self.backends if isinstance(b, kind)), None)


def default_tracking_uri(output_dir: str | Path, configured: str | None) -> str:
    """The configured URI, else $MLFLOW_TRACKING_URI, else a SQLite store under output_dir."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    path = Path(output_dir).resolve() / "mlflow.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"
