"""Bearer-key authentication and job scoping.

Modes:
- No keys (the default, loopback only): every request is accepted, whatever its Authorization
  header; it acts on the server's own job. The managed service's agent SDK works unchanged.
- Keys: `Authorization: Bearer <key>` must match one (compared in constant time). A key given as
  `{key: job_id}` (a mapping of keys to jobs) or, in a list, as `{"key": ..., "job": ...}` (the
  config's `runtime.api_keys` entries) acts only on that job: it cannot read or write another job's trajectories,
  and a request naming another job (`X-Amzn-SageMaker-Job-Arn`, `JobArn`) gets 403. Keys given
  as a plain list act on the server's own job.
- `opaque_tokens_on_loopback=True` (with keys): a bearer token that matches no key is still
  accepted from a loopback peer, acting on the server's own job. This is for agents built on the
  managed service's agent SDK, whose feedback client sends opaque signed AWS tokens that
  turnwise cannot verify, while remote workers use keys.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


def is_loopback(host: str | None) -> bool:
    return host is not None and (host in LOOPBACK_HOSTS or host.startswith("127."))


class AuthError(Exception):
    """401 (bad or missing key) or 403 (key not valid for the job), with a message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Caller:
    """Who is calling: the job it may act on."""

    job_id: str
    """The job whose trajectories this request reads and writes."""
    bound: bool
    """The job comes from the caller's key (requests naming another job are refused)."""


def job_matches(job_arn: str, job_id: str) -> bool:
    """A job ARN names a job id when equal to it or ending in `/<id>` or `:<id>`."""
    return job_arn == job_id or job_arn.endswith("/" + job_id) or job_arn.endswith(":" + job_id)


def _entry(item: Any) -> tuple[str, str | None]:
    """A list entry: a plain key, `{"key", "job"}`, or an object with `.key` / `.job` (ApiKeyConfig)."""
    if isinstance(item, str):
        return item, None
    if isinstance(item, Mapping) and "key" in item:
        return item["key"], item.get("job")
    if hasattr(item, "key"):
        return item.key, getattr(item, "job", None)
    raise TypeError(f"an api_keys entry must be a key or {{key, job}}, not {type(item).__name__}")


class Auth:
    """Checks `Authorization` headers against configured keys."""

    def __init__(self, api_keys: Sequence[str | Mapping[str, str] | Any] | Mapping[str, str] = (), *,
                 default_job: str, opaque_tokens_on_loopback: bool = False) -> None:
        if isinstance(api_keys, str):
            raise TypeError("api_keys must be a list of keys or a {key: job_id} mapping, not a string")
        keys = dict(api_keys) if isinstance(api_keys, Mapping) else dict(_entry(k) for k in api_keys)
        if any(not isinstance(k, str) or len(k) < 8 for k in keys):
            raise ValueError("API keys must be at least 8 characters")
        self._digests = [(hashlib.sha256(k.encode()).digest(), job) for k, job in keys.items()]
        self.default_job = default_job
        self.opaque_tokens_on_loopback = opaque_tokens_on_loopback

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check(self, authorization: str | None, peer_host: str | None, job_arn: str | None) -> Caller:
        caller = self._caller(authorization, peer_host)
        if caller.bound and job_arn and not job_matches(job_arn, caller.job_id):
            raise AuthError(403, f"this API key is not valid for job {job_arn!r}")
        return caller

    def _caller(self, authorization: str | None, peer_host: str | None) -> Caller:
        if not self._digests:
            return Caller(self.default_job, bound=False)
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError(401, "missing API key: send Authorization: Bearer <key>")
        digest = hashlib.sha256(token.strip().encode()).digest()
        found: str | None = None
        matched = False
        for key_digest, job in self._digests:  # no early exit: time does not depend on which key
            if hmac.compare_digest(digest, key_digest):
                matched, found = True, job
        if matched:
            return Caller(found or self.default_job, bound=found is not None)
        if self.opaque_tokens_on_loopback and is_loopback(peer_host):
            return Caller(self.default_job, bound=False)
        raise AuthError(401, "invalid API key")
