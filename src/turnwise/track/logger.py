"""One `Logger` interface with JSONL and MLflow backends (what a run prints is `train.progress`).

Keys are slash-namespaced (`reward/mean`; the table is `turnwise.track.names`). The
trainer talks to a `MultiLogger` and never to a backend directly, so adding a backend touches no
training code: metrics, params, artifacts, checkpoints and rollout traces all go through it.
Non-finite values are recorded as they are (JSON `NaN` / `Infinity`, MLflow's NaN), never dropped:
a NaN loss is the first thing to see.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from turnwise.track.traces import TraceOptions

if TYPE_CHECKING:
    from turnwise.types import Group

EXPERIMENT_KIND = "mlflow.experimentKind"


class Logger(Protocol):
    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path, artifact_dir: str | None = None) -> None: ...
    def log_checkpoint(self, path: Path, name: str) -> None:
        """A checkpoint directory (`path`), filed under `checkpoints/<name>`."""
        ...
    def log_rollouts(self, step: int, groups: Sequence[Group]) -> None:
        """A step's rollouts, for browsing (MLflow: a table of all, traces of a sample)."""
        ...
    def close(self) -> None: ...


def _numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric values (bools and strings left out), NaN and infinities kept."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


class JsonlLogger:
    """Appends one JSON line per `log_metrics` call to `metrics.jsonl`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def log_params(self, params: Mapping[str, Any]) -> None:
        (self.path.parent / "params.json").write_text(json.dumps(dict(params), indent=1, default=str))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self._file.write(json.dumps({"step": step, **_numbers(metrics)}) + "\n")
        self._file.flush()

    def log_artifact(self, path: str | Path, artifact_dir: str | None = None) -> None:
        pass  # artifacts already live in the run directory

    def log_checkpoint(self, path: Path, name: str) -> None:
        pass

    def log_rollouts(self, step: int, groups: Sequence[Group]) -> None:
        pass  # the trainer writes rollouts/step_N.jsonl itself

    def close(self) -> None:
        self._file.close()


class MlflowLogger:
    """Logs to MLflow through an explicit client and run id (no global fluent state).

    `tags` and `description` (the run page's note) say what the run is; `artifact_location`
    is where a new experiment keeps its artifacts (None: the tracking server's default)."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, *, traces: bool = True,
                 trace_options: TraceOptions | None = None, log_checkpoints: bool = True,
                 tags: Mapping[str, str] | None = None, description: str | None = None,
                 artifact_location: str | None = None) -> None:
        import logging

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(
            experiment, artifact_location=artifact_location,
            tags={EXPERIMENT_KIND: "custom_model_development"})  # a training experiment, not a GenAI app's
        run_tags = dict(tags or {}) | ({"mlflow.note.content": description} if description else {})
        self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags=run_tags).info.run_id
        self.experiment_id = experiment_id
        self.traces = traces
        self.trace_options = trace_options or TraceOptions()
        self.log_checkpoints = log_checkpoints
        self._traced = False

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in _numbers(metrics).items()]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def log_artifact(self, path: str | Path, artifact_dir: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_dir)

    def log_checkpoint(self, path: Path, name: str) -> None:
        if self.log_checkpoints:
            self.client.log_artifacts(self.run_id, str(path), f"checkpoints/{name}")

    def register_model(self, name: str, checkpoint: str) -> int | None:
        """A new version of registered model `name` from the logged `checkpoints/<checkpoint>`
        (a Hugging Face directory); its number. Load it back with `load_registered_model`."""
        if not self.log_checkpoints:
            return None
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name, description="turnwise policies (Hugging Face directories)")
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = self.client.create_model_version(name, f"runs:/{self.run_id}/checkpoints/{checkpoint}",
                                                   run_id=self.run_id)
        self.client.set_tag(self.run_id, "turnwise.registered_model", f"models:/{name}/{version.version}")
        return int(version.version)

    def log_rollouts(self, step: int, groups: Sequence[Group]) -> None:
        from turnwise.track.traces import log_step

        if log_step(self.client, self.experiment_id, self.run_id, step, groups, self.trace_options, self.traces):
            self._traced = True

    def close(self) -> None:
        if self._traced:
            from turnwise.track.traces import flush

            flush()
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

    def log_checkpoint(self, path: Path, name: str) -> None:
        for b in self.backends:
            b.log_checkpoint(path, name)

    def log_rollouts(self, step: int, groups: Sequence[Group]) -> None:
        for b in self.backends:
            b.log_rollouts(step, groups)

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


def default_artifact_location(output_dir: str | Path, configured: str | None) -> str | None:
    """Where a new experiment of the default store keeps artifacts: `output_dir/mlartifacts`
    (MLflow's own default is `./mlruns` in the working directory); None with another store."""
    if configured or os.environ.get("MLFLOW_TRACKING_URI"):
        return None
    return (Path(output_dir).resolve() / "mlartifacts").as_uri()


def load_registered_model(uri: str, tracking_uri: str | None = None) -> tuple[Any, Any]:
    """`(model, tokenizer)` of a registered version (`models:/NAME/VERSION` or `models:/NAME/latest`)."""
    import mlflow
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=tracking_uri)
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def silence_third_party_bars() -> None:
    """No tqdm bars from transformers, huggingface_hub or MLflow in this process: a training or
    evaluation job prints its own progress, and theirs would add lines that say nothing."""
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    disable_progress_bars()
    hf_logging.disable_progress_bar()


def flatten_params(d: Mapping[str, Any], prefix: str = "") -> dict[str, object]:
    """Nested config -> `{"a.b.c": value}` for `log_params`."""
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out |= flatten_params(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out
