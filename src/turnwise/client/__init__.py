"""The job service's Python client.

    from turnwise.client import ServiceClient
    admin = ServiceClient("http://127.0.0.1:8100", admin_key)
    tenant = admin.create_tenant("team-a")                      # {"id", "key", ...}
    client = ServiceClient("http://127.0.0.1:8100", tenant["key"])
    job = client.create_job("rl-1", "train", "examples/support_desk/config.yaml", overrides=["max_steps=4"])
    client.wait(job["id"]); client.describe_job(job["id"])["cost"]

Each method is one HTTP call and returns the JSON answer; errors raise `ServiceError` with the
service's message. A config given as a file path is read here, its relative data paths taken
relative to the file (as `turnwise train FILE` does).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import yaml

from turnwise.config import PATH_KEYS

TERMINAL = ("Completed", "Failed", "Stopped")


class ServiceError(RuntimeError):
    """The service refused a request: HTTP status and its message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


def read_config(path: str | Path) -> dict[str, Any]:
    """A config file as a mapping, with relative paths made absolute against the file's folder."""
    path = Path(path)
    doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: the top level must be a mapping")
    for section, key in PATH_KEYS:
        value = doc.get(section, {}).get(key) if isinstance(doc.get(section), dict) else None
        if isinstance(value, str) and value and not value.startswith("dataset:") and not Path(value).is_absolute():
            doc[section][key] = str((path.resolve().parent / value).resolve())
    return doc


class ServiceClient:
    """A `turnwise service` at `base_url`, as the holder of `api_key`."""

    def __init__(self, base_url: str, api_key: str, *, timeout: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {api_key}"},
                                 timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            r = self.http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise ServiceError(0, f"cannot reach {self.base_url}: {e}") from None
        if r.status_code >= 400:
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = r.text[:300]
            raise ServiceError(r.status_code, message)
        return r.json()

    # tenants and keys (admin; a tenant key makes keys for its own tenant)
    def create_tenant(self, name: str) -> dict[str, Any]:
        return self._call("POST", "/tenants", json={"name": name})

    def tenants(self) -> list[dict[str, Any]]:
        return self._call("GET", "/tenants")

    def create_key(self, tenant_id: str | None = None) -> dict[str, Any]:
        return self._call("POST", "/keys", json={"tenant_id": tenant_id})

    def list_keys(self) -> list[dict[str, Any]]:
        return self._call("GET", "/keys")

    def revoke_key(self, key_id: str) -> dict[str, Any]:
        return self._call("DELETE", f"/keys/{key_id}")

    # datasets
    def upload_dataset(self, path: str | Path, name: str | None = None) -> dict[str, Any]:
        path = Path(path)
        return self._call("POST", "/datasets", params={"name": name or path.name}, content=path.read_bytes())

    def datasets(self) -> list[dict[str, Any]]:
        return self._call("GET", "/datasets")

    # jobs
    def create_job(self, name: str, category: str = "train", config: str | Path | Mapping[str, Any] | None = None,
                   *, overrides: list[str] | None = None, model: str | None = None,
                   max_runtime_s: float | None = None) -> dict[str, Any]:
        """A new job (Pending); the answer holds its `id` and `job_key` (for its runtime endpoint)."""
        doc = dict(config) if isinstance(config, Mapping) else read_config(config) if config is not None else {}
        body = {"name": name, "category": category, "config": doc, "overrides": overrides or [],
                "model": model, "max_runtime_s": max_runtime_s}
        return self._call("POST", "/jobs", json=body)

    def describe_job(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/jobs/{job_id}")

    def list_jobs(self, status: str | None = None) -> list[dict[str, Any]]:
        return self._call("GET", "/jobs", params={"status": status} if status else None)

    def stop_job(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/jobs/{job_id}/stop")

    def delete_artifacts(self, job_id: str) -> dict[str, Any]:
        return self._call("DELETE", f"/jobs/{job_id}/artifacts")

    def wait(self, job_id: str, timeout: float | None = None, poll_s: float = 2.0) -> dict[str, Any]:
        """Describe the job until it ends (Completed, Failed, Stopped); TimeoutError after `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.describe_job(job_id)
            if job["status"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout:g} s")
            time.sleep(poll_s)

    def logs(self, job_id: str, follow: bool = False) -> Iterator[str]:
        """The job's output, line by line; `follow` streams until the job ends."""
        with self.http.stream("GET", f"/jobs/{job_id}/logs", params={"follow": follow},
                              timeout=httpx.Timeout(None, connect=10.0)) as r:
            if r.status_code >= 400:
                r.read()
                raise ServiceError(r.status_code, r.json()["error"]["message"])
            yield from r.iter_lines()

    def usage(self, start: str | float | None = None, end: str | float | None = None,
              tenant_id: str | None = None) -> dict[str, Any]:
        """Tokens and cost per job within [start, end) (epoch seconds or ISO 8601)."""
        params = {k: str(v) for k, v in (("start", start), ("end", end), ("tenant_id", tenant_id)) if v is not None}
        return self._call("GET", "/usage", params=params)
