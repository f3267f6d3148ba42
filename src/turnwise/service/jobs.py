"""From a create request to a job directory: the job document, validated as a turnwise config.

A job document is a turnwise config (the keys `turnwise train` reads, hyperparameters under the
names we already use) plus `overrides` (`--set` lines). The service sets what it owns:
`output_dir` (the job's directory), `runtime.host` / `runtime.api_keys` (the job's runtime is
reached only through the service), `agent.endpoint` (agents of kinds http and worker call the
job endpoint `<service>/jobs/<id>/runtime`) and `tracking.tracking_uri` when the service has one.
Relative paths resolve against the service's `workdir`; `dataset:<id>` names an uploaded dataset
of the same tenant; other paths inside the service's state directory are refused.
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from turnwise.config import PATH_KEYS, ConfigError, JobConfig, load_config
from turnwise.service.db import Job, ServiceStore, new_id
from turnwise.service.lifecycle import JobCategory, JobStatus, parse_category
from turnwise.service.settings import ServiceConfig


class CreateJob(BaseModel):
    """`POST /jobs`: our names, with the managed service's accepted as aliases."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1, max_length=200, alias="JobName")
    category: str = Field("train", alias="JobCategory")
    """train | eval (or AgentRFT | AgentRFTEvaluation)."""
    config: dict[str, Any] | str = Field(default_factory=dict, alias="JobConfigDocument")
    """The turnwise config, as a mapping or as YAML / JSON text."""
    overrides: list[str] = Field(default_factory=list)
    """`key=value` lines, as `--set` takes them."""
    model: str | None = Field(None, alias="EvaluatedModel")
    """Eval jobs: `base`, `job:<train job id>` (its final checkpoint) or a checkpoint directory."""
    max_runtime_s: float | None = Field(None, gt=0, alias="MaxRuntimeInSeconds")
    """Stopping condition: past it the job is stopped with a checkpoint."""


def _document(body: CreateJob) -> dict[str, Any]:
    doc = body.config
    if isinstance(doc, str):
        try:
            doc = yaml.safe_load(doc) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config: not valid YAML or JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigError("config: the top level must be a mapping of keys to values")
    return json.loads(json.dumps(doc))  # a private deep copy


def _resolve_path(value: str, svc: ServiceConfig, store: ServiceStore, tenant_id: str, key: str) -> str:
    if value.startswith("dataset:"):
        ds = store.dataset(value[len("dataset:"):])
        if ds is None or ds.tenant_id != tenant_id:
            raise ConfigError(f"{key}: no dataset {value[len('dataset:'):]!r} in this tenant")
        return ds.path
    path = Path(value).expanduser()
    path = (path if path.is_absolute() else Path(svc.workdir).resolve() / path).resolve()
    own = (svc.state_path / "datasets" / tenant_id).resolve()
    if path.is_relative_to(svc.state_path) and not path.is_relative_to(own):
        raise ConfigError(f"{key}: {value!r} is inside the service's state directory; upload it as a dataset")
    return str(path)


def _eval_target(body: CreateJob, store: ServiceStore, tenant_id: str) -> str:
    target = body.model or "base"
    if target.startswith("job:"):
        source = store.job(target[4:])
        if source is None or source.tenant_id != tenant_id:
            raise ConfigError(f"model: no job {target[4:]!r} in this tenant")
        final = Path(source.run_dir or "") / "checkpoints" / "final"
        if source.category != JobCategory.TRAIN.value or not final.is_dir():
            raise ConfigError(f"model: job {source.id} has no final checkpoint (status {source.status})")
        return str(final)
    if target != "base" and not Path(target).is_dir():
        raise ConfigError(f"model: {target!r} is not 'base', 'job:<id>' or a checkpoint directory")
    return target


def create_job(body: CreateJob, svc: ServiceConfig, store: ServiceStore, tenant_id: str,
               base_url: str) -> tuple[Job, JobConfig]:
    """Validate the document, write the job directory, add the job (Pending); ConfigError on bad input."""
    try:
        category = parse_category(body.category)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    doc = _document(body)
    for section, key in PATH_KEYS:
        value = doc.get(section, {}).get(key) if isinstance(doc.get(section), dict) else None
        if isinstance(value, str) and value:
            doc[section][key] = _resolve_path(value, svc, store, tenant_id, f"{section}.{key}")
    dotted = {f"{section}.{key}" for section, key in PATH_KEYS}
    overrides = []
    for item in body.overrides:  # a path given as an override resolves the same way
        key, sep, value = item.partition("=")
        if sep and key.strip() in dotted and value.strip():
            item = f"{key}={_resolve_path(value.strip(), svc, store, tenant_id, key.strip())}"
        overrides.append(item)
    target = _eval_target(body, store, tenant_id) if category == JobCategory.EVAL else None
    job_id = new_id("job")
    job_dir = svc.state_path / "jobs" / job_id
    job_dir.mkdir(parents=True)
    runtime_key = secrets.token_hex(24)
    owned = [f"output_dir={job_dir / 'run'}", "runtime.host=127.0.0.1", f"runtime.api_keys=[{runtime_key}]"]
    if svc.mlflow_tracking_uri:
        owned.append(f"tracking.tracking_uri={svc.mlflow_tracking_uri}")
    (job_dir / "document.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    cfg = load_config(job_dir / "document.yaml", [*overrides, *owned])
    if cfg.agent.kind != "python":
        cfg = cfg.model_copy(update={"agent": cfg.agent.model_copy(
            update={"endpoint": f"{base_url}/jobs/{job_id}/runtime"})})
    config_path = job_dir / "config.yaml"
    config_path.touch(mode=0o600)  # it holds the runtime key
    config_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    total = _total(cfg, category)
    spec: dict[str, Any] = {"config": str(config_path), "target": target, "total": total}
    job = Job(id=job_id, tenant_id=tenant_id, name=body.name, category=category.value,
              status=JobStatus.PENDING.value, model=cfg.model.path or "tiny", spec=spec,
              max_runtime_s=body.max_runtime_s, created_at=time.time(), job_dir=str(job_dir),
              runtime_key=runtime_key, progress={"done": 0, "total": total, "fraction": 0.0}, metrics={}, artifacts={}, usage={}, resumes=0)
    store.add_job(job)
    return job, cfg


def _total(cfg: JobConfig, category: JobCategory) -> int:
    """What progress counts to: RL steps (train) or test tasks (eval)."""
    if category == JobCategory.TRAIN:
        return cfg.max_steps or 0
    from turnwise.rollout.tasks import TaskFileError, load_tasks

    try:
        return len(load_tasks(cfg.data.test_path or "")[: cfg.eval.max_tasks])
    except TaskFileError as e:
        raise ConfigError(str(e)) from None
