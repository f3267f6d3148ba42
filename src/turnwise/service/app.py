"""The service's HTTP API: the control plane (tenants, keys, datasets, jobs, usage), the per-job
data plane (`turnwise.service.proxy`) and the console (`turnwise.service.console`).

Every request but `/health` and the console page sends `Authorization: Bearer <key>`. The admin
key manages tenants and their keys and reads everything; a tenant key reads and writes only its
tenant's jobs, datasets, keys and usage (another tenant's job is 404, as if it did not exist); a
job key reaches only its job's runtime endpoint. Errors are `{"error": {"message", "type", "code"}}`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from turnwise.config import ConfigError
from turnwise.runtime.deps import ApiError
from turnwise.service import console, proxy
from turnwise.service.billing import add_usage, cost_of, zero_usage
from turnwise.service.db import Dataset, Job, Principal, ServiceStore, new_id
from turnwise.service.jobs import CreateJob, create_job
from turnwise.service.lifecycle import TERMINAL, JobStatus
from turnwise.service.scheduler import Scheduler
from turnwise.service.settings import ServiceConfig


class CreateTenant(BaseModel):
    name: str = Field(min_length=1, max_length=200)


class CreateKey(BaseModel):
    tenant_id: str | None = None
    """Admin only: the tenant the key is for (a tenant key makes keys for its own tenant)."""


class Service:
    """What the routes share, kept on `app.state.service`."""

    def __init__(self, svc: ServiceConfig, store: ServiceStore, scheduler: Scheduler) -> None:
        self.svc, self.store, self.scheduler = svc, store, scheduler
        self.base_url = svc.base_url(svc.port)
        """Set by the server once its port is known."""

    def principal(self, authorization: str | None) -> Principal:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "missing API key: send Authorization: Bearer <key>")
        who = self.store.authenticate(token.strip())
        if who is None:
            raise ApiError(401, "invalid or revoked API key")
        return who

    def visible_job(self, who: Principal, job_id: str) -> Job:
        """A job the caller may manage: any for the admin, its tenant's for a tenant key; else 404."""
        job = self.store.job(job_id)
        if job is None or who.role == "job" or (who.role == "tenant" and job.tenant_id != who.tenant_id):
            raise ApiError(404, f"no job {job_id!r}")
        return job

    def view(self, job: Job) -> dict[str, Any]:
        usage = {**zero_usage(), **(job.usage or {})}
        mlflow_run = (job.artifacts or {}).get("mlflow_run_id")
        return {"id": job.id, "name": job.name, "category": job.category, "status": job.status,
                "reason": job.reason, "tenant_id": job.tenant_id, "model": job.model,
                "created_at": job.created_at, "started_at": job.started_at, "ended_at": job.ended_at,
                "max_runtime_s": job.max_runtime_s, "progress": job.progress or {}, "metrics": job.metrics or {},
                "artifacts": job.artifacts or {}, "usage": usage,
                "cost": cost_of(usage, self.svc.price_for(job.model)), "resumes": job.resumes,
                "endpoint": f"{self.base_url}/jobs/{job.id}/runtime",
                "mlflow_url": (f"{self.svc.mlflow_ui_url.rstrip('/')}/#/runs/{mlflow_run}"
                               if self.svc.mlflow_ui_url and mlflow_run else None)}


def _service(request: Request) -> Service:
    return request.app.state.service


def _who(request: Request, authorization: Annotated[str | None, Header()] = None) -> Principal:
    return _service(request).principal(authorization)


ServiceDep = Annotated[Service, Depends(_service)]
WhoDep = Annotated[Principal, Depends(_who)]


def _require(who: Principal, *roles: str) -> None:
    if who.role not in roles:
        raise ApiError(403, f"this needs a{'n' if roles[0] == 'admin' else ''} {' or '.join(roles)} key")


def _tenant_of(who: Principal, asked: str | None, s: Service) -> str | None:
    """The tenant a request acts on: a tenant key's own; the admin's choice (None: all)."""
    if who.role == "tenant":
        if asked not in (None, who.tenant_id):
            raise ApiError(404, f"no tenant {asked!r}")
        return who.tenant_id
    if asked is not None and s.store.tenant(asked) is None:
        raise ApiError(404, f"no tenant {asked!r}")
    return asked


def _when(text: str | None, name: str) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ApiError(400, f"{name}: {text!r} is neither epoch seconds nor an ISO 8601 time") from None
    return (when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)).timestamp()


def create_service_app(svc: ServiceConfig, store: ServiceStore, scheduler: Scheduler) -> FastAPI:
    """The service app over `store`, starting jobs through `scheduler` (started by the caller)."""
    app = FastAPI(title="turnwise service", version="1",
                  description="Submit training and evaluation jobs; per-job runtime endpoints; usage and cost.")
    app.state.service = Service(svc, store, scheduler)
    app.include_router(proxy.router)
    app.include_router(console.router)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "executor": svc.executor, "max_concurrent_jobs": svc.max_concurrent_jobs}

    # -- tenants and keys -------------------------------------------------------------------

    @app.post("/tenants", status_code=201)
    def add_tenant(body: CreateTenant, s: ServiceDep, who: WhoDep) -> dict[str, Any]:
        _require(who, "admin")
        try:
            tenant = s.store.create_tenant(body.name)
        except ValueError as e:
            raise ApiError(409, str(e)) from None
        key_id, key = s.store.create_key("tenant", tenant_id=tenant.id)
        return {"id": tenant.id, "name": tenant.name, "key_id": key_id, "key": key}

    @app.get("/tenants")
    def list_tenants(s: ServiceDep, who: WhoDep) -> list[dict[str, Any]]:
        _require(who, "admin")
        return [{"id": t.id, "name": t.name, "created_at": t.created_at} for t in s.store.tenants()]

    @app.post("/keys", status_code=201)
    def add_key(body: CreateKey, s: ServiceDep, who: WhoDep) -> dict[str, Any]:
        _require(who, "admin", "tenant")
        tenant_id = _tenant_of(who, body.tenant_id, s)
        if tenant_id is None:
            raise ApiError(400, "tenant_id is required (the tenant the key is for)")
        key_id, key = s.store.create_key("tenant", tenant_id=tenant_id)
        return {"key_id": key_id, "key": key, "tenant_id": tenant_id}

    @app.get("/keys")
    def list_keys(s: ServiceDep, who: WhoDep, tenant_id: str | None = None) -> list[dict[str, Any]]:
        _require(who, "admin", "tenant")
        rows = s.store.keys(_tenant_of(who, tenant_id, s))
        return [{"key_id": k.id, "role": k.role, "tenant_id": k.tenant_id, "job_id": k.job_id,
                 "created_at": k.created_at, "revoked": k.revoked_at is not None} for k in rows]

    @app.delete("/keys/{key_id}")
    def revoke_key(key_id: str, s: ServiceDep, who: WhoDep) -> dict[str, Any]:
        _require(who, "admin", "tenant")
        key = s.store.key(key_id)
        if key is None or (who.role == "tenant" and key.tenant_id != who.tenant_id):
            raise ApiError(404, f"no key {key_id!r}")
        s.store.revoke_key(key_id)
        return {"key_id": key_id, "revoked": True}

    # -- datasets ---------------------------------------------------------------------------

    @app.post("/datasets", status_code=201)
    async def upload_dataset(request: Request, s: ServiceDep, who: WhoDep,
                             name: Annotated[str, Query(min_length=1, max_length=200)]) -> dict[str, Any]:
        """The raw file as the body; `name` ends in .jsonl, .csv or .parquet. Validated as task rows."""
        _require(who, "tenant")
        from turnwise.rollout.tasks import TaskFileError, load_tasks

        suffix = Path(name).suffix.lower()
        if suffix not in (".jsonl", ".csv", ".parquet"):
            raise ApiError(400, f"dataset {name!r}: use a .jsonl, .csv or .parquet file")
        body = await request.body()
        ds_id = new_id("ds")
        folder = s.svc.state_path / "datasets" / str(who.tenant_id)
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            path = Path(tmp) / f"upload{suffix}"
            path.write_bytes(body)
            try:
                rows = len(load_tasks(path))
            except TaskFileError as e:
                raise ApiError(400, f"dataset {name!r}: {str(e).replace(str(path), name)}") from None
            final = folder / f"{ds_id}{suffix}"
            path.rename(final)
        s.store.add_dataset(Dataset(id=ds_id, tenant_id=str(who.tenant_id), name=name, path=str(final), rows=rows,
                                    size_bytes=len(body), created_at=time.time()))
        return {"id": ds_id, "name": name, "rows": rows, "bytes": len(body), "ref": f"dataset:{ds_id}"}

    @app.get("/datasets")
    def list_datasets(s: ServiceDep, who: WhoDep) -> list[dict[str, Any]]:
        _require(who, "tenant")
        return [{"id": d.id, "name": d.name, "rows": d.rows, "bytes": d.size_bytes, "ref": f"dataset:{d.id}"}
                for d in s.store.datasets(str(who.tenant_id))]

    # -- jobs -------------------------------------------------------------------------------

    @app.post("/jobs", status_code=201)
    def add_job(body: CreateJob, s: ServiceDep, who: WhoDep) -> dict[str, Any]:
        _require(who, "tenant")
        try:
            job, _ = create_job(body, s.svc, s.store, str(who.tenant_id), s.base_url)
        except ConfigError as e:
            raise ApiError(400, str(e)) from None
        _, key = s.store.create_key("job", tenant_id=job.tenant_id, job_id=job.id)
        return {**s.view(job), "job_key": key}

    @app.get("/jobs")
    def list_jobs(s: ServiceDep, who: WhoDep, status: str | None = None,
                  tenant_id: str | None = None) -> list[dict[str, Any]]:
        _require(who, "admin", "tenant")
        try:
            wanted = JobStatus(status) if status else None
        except ValueError:
            raise ApiError(400, f"status: {status!r} is not one of {', '.join(s.value for s in JobStatus)}") from None
        return [s.view(j) for j in s.store.jobs(_tenant_of(who, tenant_id, s), wanted)]

    @app.get("/jobs/{job_id}")
    def describe_job(job_id: str, s: ServiceDep, who: WhoDep) -> dict[str, Any]:
        return s.view(s.visible_job(who, job_id))

    @app.post("/jobs/{job_id}/stop")
    def stop_job(job_id: str, s: ServiceDep, who: WhoDep) -> dict[str, Any]:
        job = s.visible_job(who, job_id)
        with s.scheduler.lock:
            job = s.scheduler.request_stop(s.store.job(job.id) or job, "stopped by request")
        return s.view(job)

    @app.delete("/jobs/{job_id}/artifacts")
    def delete_artifacts(job_id: str, s: ServiceDep, who: WhoDep) -> dict[str, Any]:
        import shutil

        job = s.visible_job(who, job_id)
        if JobStatus(job.status) not in TERMINAL:
            raise ApiError(409, f"job {job_id} is {job.status}: stop it before deleting its artifacts")
        for sub in ("run", "eval"):
            shutil.rmtree(Path(job.job_dir) / sub, ignore_errors=True)
        job = s.store.update_job(job.id, artifacts={"deleted_at": time.time()})
        return s.view(job)

    @app.get("/jobs/{job_id}/logs")
    async def job_logs(job_id: str, s: ServiceDep, who: WhoDep, follow: bool = False, offset: int = 0):
        """The job's output from byte `offset`; `follow` streams it until the job ends."""
        job = s.visible_job(who, job_id)
        path = Path(job.job_dir) / "log.txt"

        async def chunks():
            pos = max(offset, 0)
            while True:
                if path.is_file():
                    with path.open("rb") as f:
                        f.seek(pos)
                        data = f.read()
                    if data:
                        pos += len(data)
                        yield data
                current = s.store.job(job_id)
                if not follow or current is None or JobStatus(current.status) in TERMINAL:
                    if follow and path.is_file() and path.stat().st_size > pos:
                        continue  # the last lines, written as it ended
                    return
                await asyncio.sleep(0.5)

        return StreamingResponse(chunks(), media_type="text/plain; charset=utf-8")

    # -- usage ------------------------------------------------------------------------------

    @app.get("/usage")
    def usage(s: ServiceDep, who: WhoDep, start: str | None = None, end: str | None = None,
              tenant_id: str | None = None) -> dict[str, Any]:
        """Tokens and cost per job inside [start, end) (epoch seconds or ISO 8601; None: unbounded)."""
        _require(who, "admin", "tenant")
        tenant = _tenant_of(who, tenant_id, s)
        t0, t1 = _when(start, "start"), _when(end, "end")
        per_job = s.store.usage_by_job(tenant, t0, t1)
        rows, total_usage, total_cost = [], zero_usage(), 0.0
        for job_id, used in sorted(per_job.items()):
            job = s.store.job(job_id)
            cost = cost_of(used, s.svc.price_for(job.model if job else ""))
            rows.append({"job_id": job_id, "name": job.name if job else None, "tenant_id": job.tenant_id if job else None,
                         "usage": used, "cost": cost})
            total_usage = add_usage(total_usage, used)
            total_cost += cost["total"] if cost else 0.0
        return {"tenant_id": tenant, "start": t0, "end": t1, "jobs": rows,
                "total": {"usage": total_usage, "cost": total_cost}}

    # -- errors -----------------------------------------------------------------------------

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
                 for e in exc.errors()]
        return JSONResponse(ApiError(400, "invalid request: " + "; ".join(parts)).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(ApiError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    return app
