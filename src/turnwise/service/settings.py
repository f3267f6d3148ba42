"""The job service's config: one typed model, defaults here only, unknown keys fail.

    state_dir: service                # service.db, one directory per job, uploaded datasets
    max_concurrent_jobs: 2
    prices:                           # USD per million tokens, per model ("*": any other model)
      "*": {prefill: 0.10, prefill_cached: 0.01, sample: 0.30, train: 0.40}
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from turnwise.config import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Prices(_Section):
    """USD per million tokens, one price per billed dimension."""

    prefill: float = Field(0.0, ge=0)
    """Prompt tokens the sampler computed."""
    prefill_cached: float = Field(0.0, ge=0)
    """Prompt tokens served from the prefix cache."""
    sample: float = Field(0.0, ge=0)
    """Tokens sampled."""
    train: float = Field(0.0, ge=0)
    """Tokens trained on."""


class ServiceConfig(_Section):
    """Everything `turnwise service` needs."""

    host: str = "127.0.0.1"
    port: int = Field(8100, ge=0, le=65535)
    """0 picks a free port."""
    public_url: str | None = None
    """The service's URL as agents reach it (job endpoints are `<public_url>/jobs/<id>/runtime`);
    None: http://<host>:<port>."""
    state_dir: str = "service"
    """Holds `service.db` (unless `database_url`), `jobs/<id>/` and `datasets/<tenant>/`."""
    database_url: str | None = None
    """A SQLAlchemy URL (e.g. postgresql+psycopg://...); None: SQLite at `<state_dir>/service.db`."""
    workdir: str = "."
    """Working directory of job commands: relative data paths and agent modules resolve from it."""
    max_concurrent_jobs: int = Field(1, ge=0)
    """Jobs running at once; the rest wait in the queue (0 pauses starting new jobs)."""
    executor: Literal["local", "ray"] = "local"
    """local: each job a subprocess of this machine; ray: a Ray job (`ray_address`)."""
    ray_address: str | None = None
    """The Ray dashboard URL for job submission, e.g. http://127.0.0.1:8265 (executor ray)."""
    gpus_per_job: float = Field(0.0, ge=0)
    """GPUs a job reserves (Ray: `entrypoint_num_gpus`; local: CUDA_VISIBLE_DEVICES is left as is)."""
    memory_mb_per_job: int | None = Field(None, ge=1)
    """Memory a job reserves (Ray: `entrypoint_memory`); None: no reservation."""
    poll_interval_s: float = Field(1.0, gt=0)
    """How often running jobs are checked (exit, progress, usage, max_runtime_s)."""
    max_resumes: int = Field(2, ge=0)
    """A job whose process died is resumed from its last checkpoint at most this many times."""
    mlflow_tracking_uri: str | None = None
    """Where jobs log (their `tracking.tracking_uri`); None: each job's own SQLite store."""
    mlflow_ui_url: str | None = None
    """The MLflow UI the console links runs to, e.g. http://127.0.0.1:5000; None: no links."""
    prices: dict[str, Prices] = Field(default_factory=dict)
    """Per model (`model.path`, or `tiny` for the built-in model); "*" applies to any other."""

    def price_for(self, model: str) -> Prices | None:
        return self.prices.get(model) or self.prices.get("*")

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir).resolve()

    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.state_path / 'service.db'}"

    def base_url(self, port: int) -> str:
        return (self.public_url or f"http://{self.host}:{port}").rstrip("/")


def load_service_config(path: str | None, overrides: list[str]) -> ServiceConfig:
    """The config in `path` (YAML; None: defaults) with `key=value` overrides (dotted, YAML values)."""
    data: dict = {}
    if path:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"service config {path}: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"service config {path}: expected a mapping at the top")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = yaml.safe_load(value)
    try:
        return ServiceConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        raise ConfigError(f"service config: {'.'.join(str(p) for p in err['loc'])}: {err['msg']}") from None
