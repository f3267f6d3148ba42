"""The service's state in SQL through SQLAlchemy: tenants, API keys, jobs, datasets, usage.

SQLite (WAL) by default; any SQLAlchemy URL works (Postgres when one machine is not enough).
Every change is one committed transaction, so a SIGKILL of the service loses nothing it answered.

Keys: `tw_<id>_<secret>`. Only sha256(secret) is stored; a key is found by its id and its secret
compared with `hmac.compare_digest`. Roles: `admin` (manages tenants), `tenant` (that tenant's
jobs, datasets and usage), `job` (that job's runtime endpoint only). Revoked keys stay, unusable.

Usage: each job row holds its totals by dimension; every increase is also a `usage_events` row
(when, which job, how many more), so a report over a period sums the events inside it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, Float, ForeignKey, Integer, String, create_engine, event, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from turnwise.rollout.usage import USAGE_KEYS
from turnwise.service.lifecycle import JobStatus, check_transition


class Base(DeclarativeBase):
    pass


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[float] = mapped_column(Float)


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(10))
    tenant_id: Mapped[str | None] = mapped_column(ForeignKey("tenants.id"), nullable=True)
    job_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)
    created_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    category: Mapped[str] = mapped_column(String(10))
    status: Mapped[str] = mapped_column(String(12), index=True)
    reason: Mapped[str | None] = mapped_column(String(2000), nullable=True)
    model: Mapped[str] = mapped_column(String(500))
    """The priced model: `model.path`, or `tiny`."""
    spec: Mapped[dict] = mapped_column(JSON)
    """What the job runs: {"config": path, "args": [...]} (built at create, see `scheduler`)."""
    max_runtime_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[float] = mapped_column(Float, index=True)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    ended_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    job_dir: Mapped[str] = mapped_column(String(1000))
    run_dir: Mapped[str | None] = mapped_column(String(1000), nullable=True)
    handle: Mapped[str | None] = mapped_column(String(200), nullable=True)
    """The executor's handle of the running command (local: `pid:start_time`; ray: submission id)."""
    runtime_port: Mapped[int | None] = mapped_column(Integer, nullable=True)
    runtime_key: Mapped[str] = mapped_column(String(100))
    """The job's own runtime server key, known to the service only (the proxy sends it)."""
    stop_reason: Mapped[str | None] = mapped_column(String(500), nullable=True)
    resumes: Mapped[int] = mapped_column(Integer, default=0)
    progress: Mapped[dict] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    artifacts: Mapped[dict] = mapped_column(JSON, default=dict)
    usage: Mapped[dict] = mapped_column(JSON, default=dict)


class Dataset(Base):
    __tablename__ = "datasets"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    path: Mapped[str] = mapped_column(String(1000))
    rows: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float)


class UsageEvent(Base):
    __tablename__ = "usage_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    tenant_id: Mapped[str] = mapped_column(String(40), index=True)
    at: Mapped[float] = mapped_column(Float, index=True)
    prefill_tokens: Mapped[int] = mapped_column(Integer, default=0)
    prefill_cached_tokens: Mapped[int] = mapped_column(Integer, default=0)
    sample_tokens: Mapped[int] = mapped_column(Integer, default=0)
    train_tokens: Mapped[int] = mapped_column(Integer, default=0)


@dataclass(frozen=True)
class Principal:
    """Who a request's key is."""

    key_id: str
    role: str
    """admin | tenant | job"""
    tenant_id: str | None
    job_id: str | None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


_DUMMY_DIGEST = _digest("no such key")


class ServiceStore:
    """The service's tables behind one SQLAlchemy engine; each method is one transaction."""

    def __init__(self, url: str) -> None:
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
            Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        self.engine = create_engine(url, future=True)
        if url.startswith("sqlite"):
            @event.listens_for(self.engine, "connect")
            def _sqlite_pragmas(conn: Any, _record: Any) -> None:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA busy_timeout=30000")
                conn.execute("PRAGMA foreign_keys=ON")
        Base.metadata.create_all(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions.begin() as s:
            yield s

    # -- tenants and keys ---------------------------------------------------------------------

    def create_tenant(self, name: str) -> Tenant:
        with self.session() as s:
            if s.scalar(select(Tenant).where(Tenant.name == name)) is not None:
                raise ValueError(f"a tenant named {name!r} exists")
            tenant = Tenant(id=new_id("tenant"), name=name, created_at=time.time())
            s.add(tenant)
        return tenant

    def tenants(self) -> list[Tenant]:
        with self.session() as s:
            return list(s.scalars(select(Tenant).order_by(Tenant.created_at)))

    def tenant(self, tenant_id: str) -> Tenant | None:
        with self.session() as s:
            return s.get(Tenant, tenant_id)

    def create_key(self, role: str, tenant_id: str | None = None, job_id: str | None = None) -> tuple[str, str]:
        """A new key: (key id, the key itself; shown once, never stored)."""
        key_id, secret = uuid.uuid4().hex[:16], secrets.token_urlsafe(32)
        with self.session() as s:
            s.add(ApiKey(id=key_id, secret_sha256=_digest(secret), role=role, tenant_id=tenant_id, job_id=job_id,
                         created_at=time.time()))
        return key_id, f"tw_{key_id}_{secret}"

    def has_admin_key(self) -> bool:
        with self.session() as s:
            return s.scalar(select(ApiKey).where(ApiKey.role == "admin", ApiKey.revoked_at.is_(None))) is not None

    def keys(self, tenant_id: str | None) -> list[ApiKey]:
        with self.session() as s:
            q = select(ApiKey).order_by(ApiKey.created_at)
            return list(s.scalars(q if tenant_id is None else q.where(ApiKey.tenant_id == tenant_id)))

    def key(self, key_id: str) -> ApiKey | None:
        with self.session() as s:
            return s.get(ApiKey, key_id)

    def revoke_key(self, key_id: str) -> None:
        with self.session() as s:
            row = s.get(ApiKey, key_id)
            if row is not None and row.revoked_at is None:
                row.revoked_at = time.time()

    def authenticate(self, token: str) -> Principal | None:
        """The key's principal, or None (unknown, malformed or revoked)."""
        prefix, _, rest = token.partition("_")
        key_id, _, secret = rest.partition("_")
        with self.session() as s:
            row = s.get(ApiKey, key_id) if prefix == "tw" and key_id and secret else None
            # compare even when there is no row, so a miss costs what a hit costs
            ok = hmac.compare_digest(_digest(secret), row.secret_sha256 if row is not None else _DUMMY_DIGEST)
            if row is None or not ok or row.revoked_at is not None:
                return None
            return Principal(row.id, row.role, row.tenant_id, row.job_id)

    # -- datasets ---------------------------------------------------------------------------

    def add_dataset(self, ds: Dataset) -> None:
        with self.session() as s:
            s.add(ds)

    def datasets(self, tenant_id: str) -> list[Dataset]:
        with self.session() as s:
            return list(s.scalars(select(Dataset).where(Dataset.tenant_id == tenant_id).order_by(Dataset.created_at)))

    def dataset(self, dataset_id: str) -> Dataset | None:
        with self.session() as s:
            return s.get(Dataset, dataset_id)

    # -- jobs -------------------------------------------------------------------------------

    def add_job(self, job: Job) -> None:
        with self.session() as s:
            s.add(job)

    def job(self, job_id: str) -> Job | None:
        with self.session() as s:
            return s.get(Job, job_id)

    def jobs(self, tenant_id: str | None = None, status: JobStatus | None = None) -> list[Job]:
        with self.session() as s:
            q = select(Job).order_by(Job.created_at)
            if tenant_id is not None:
                q = q.where(Job.tenant_id == tenant_id)
            if status is not None:
                q = q.where(Job.status == status.value)
            return list(s.scalars(q))

    def update_job(self, job_id: str, **values: Any) -> Job:
        """Set columns of a job; a `status` change must be allowed (`lifecycle.TRANSITIONS`)."""
        with self.session() as s:
            job = s.get(Job, job_id)
            if job is None:
                raise KeyError(job_id)
            if "status" in values:
                new = JobStatus(values["status"])
                check_transition(JobStatus(job.status), new)
                values["status"] = new.value
            for k, v in values.items():
                setattr(job, k, v)
        return job

    def record_usage(self, job_id: str, totals: Mapping[str, int]) -> dict[str, int]:
        """Raise the job's totals to `totals` (never lower them) and log the increase as an event."""
        with self.session() as s:
            job = s.get(Job, job_id)
            if job is None:
                raise KeyError(job_id)
            old = {k: int((job.usage or {}).get(k, 0)) for k in USAGE_KEYS}
            delta = {k: max(int(totals.get(k, 0)) - old[k], 0) for k in USAGE_KEYS}
            if any(delta.values()):
                s.add(UsageEvent(job_id=job_id, tenant_id=job.tenant_id, at=time.time(), **delta))
                job.usage = {k: old[k] + delta[k] for k in USAGE_KEYS}
            return dict(job.usage or {k: 0 for k in USAGE_KEYS})

    def usage_by_job(self, tenant_id: str | None, start: float | None, end: float | None) -> dict[str, dict[str, int]]:
        """Token usage per job inside [start, end) (None: unbounded), of one tenant or all."""
        with self.session() as s:
            cols = [func.sum(getattr(UsageEvent, k)) for k in USAGE_KEYS]
            q = select(UsageEvent.job_id, *cols).group_by(UsageEvent.job_id)
            if tenant_id is not None:
                q = q.where(UsageEvent.tenant_id == tenant_id)
            if start is not None:
                q = q.where(UsageEvent.at >= start)
            if end is not None:
                q = q.where(UsageEvent.at < end)
            return {row[0]: {k: int(v or 0) for k, v in zip(USAGE_KEYS, row[1:], strict=True)} for row in s.execute(q)}
