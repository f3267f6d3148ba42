"""The rollout an agent is working on, and the headers that tie its model calls to it.

    ctx = RolloutContext(trajectory_id, base_url, model, inference_params)
    client = ctx.async_openai()            # every call carries the trajectory headers
    with rollout_scope(ctx):               # or: anywhere below, `headers()` reads the context
        ...

The context lives in a `contextvars.ContextVar`, so concurrent asyncio rollouts (and threads
started with `contextvars.copy_context()`) each see their own.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import openai

TRAJECTORY_HEADER = "X-Amzn-SageMaker-Trajectory-Id"
TURNWISE_TRAJECTORY_HEADER = "X-Turnwise-Trajectory-Id"
JOB_ARN_HEADER = "X-Amzn-SageMaker-Job-Arn"
DEFAULT_API_KEY = "turnwise"
"""Sent when no key is configured (the OpenAI SDK insists on one; a keyless server ignores it)."""


@dataclass(frozen=True)
class RolloutContext:
    """One rollout: which trajectory to record into, where, and how to sample."""

    trajectory_id: str
    """Trajectory id sent in the headers of every model call."""
    base_url: str
    """Runtime server root, e.g. http://127.0.0.1:8000 (the OpenAI base URL is this + /v1)."""
    model: str
    """Model name to pass to chat calls."""
    inference_params: Mapping[str, Any] = field(default_factory=dict)
    """Sampling settings from the trainer: temperature, top_p, max_tokens."""
    job_arn: str | None = None
    """Job the rollout belongs to (sent as X-Amzn-SageMaker-Job-Arn)."""
    api_key: str | None = None
    """Bearer key of the runtime server, when it requires one."""

    def headers(self) -> dict[str, str]:
        """Both trajectory header names, and the job ARN when known."""
        out = {TRAJECTORY_HEADER: self.trajectory_id, TURNWISE_TRAJECTORY_HEADER: self.trajectory_id}
        if self.job_arn:
            out[JOB_ARN_HEADER] = self.job_arn
        return out

    @property
    def openai_base_url(self) -> str:
        return self.base_url.rstrip("/") + "/v1"

    def sampling_kwargs(self) -> dict[str, Any]:
        """`inference_params` as chat-completion keyword arguments (unset ones left out)."""
        return {k: self.inference_params[k] for k in ("temperature", "top_p", "max_tokens")
                if self.inference_params.get(k) is not None}

    def async_openai(self, **kwargs: Any) -> openai.AsyncOpenAI:
        """An AsyncOpenAI client for the runtime, sending this rollout's headers on every call."""
        if "http_client" not in kwargs and self._plain_http:
            kwargs["http_client"] = openai.DefaultAsyncHttpxClient(verify=False)
        return openai.AsyncOpenAI(base_url=self.openai_base_url, api_key=self.api_key or DEFAULT_API_KEY,
                                  default_headers=self.headers(), **kwargs)

    def openai(self, **kwargs: Any) -> openai.OpenAI:
        """A sync OpenAI client for the runtime, sending this rollout's headers on every call."""
        if "http_client" not in kwargs and self._plain_http:
            kwargs["http_client"] = openai.DefaultHttpxClient(verify=False)
        return openai.OpenAI(base_url=self.openai_base_url, api_key=self.api_key or DEFAULT_API_KEY,
                             default_headers=self.headers(), **kwargs)

    @property
    def _plain_http(self) -> bool:
        # Plain http has no TLS, so the CA bundle need not be loaded: that takes ~40 ms of CPU per
        # client, and rollouts make one client each (1,024 rollouts: 40 s per step).
        return self.base_url.startswith("http://")

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any], *, base_url: str | None = None,
                     api_key: str | None = None) -> RolloutContext:
        """From a push `/rollout` body: the SDK's or AgentCore's (see `normalize_payload`)."""
        payload = normalize_payload(payload)
        meta = payload.get("metadata") or {}
        trajectory_id = meta.get("trajectory_id") or meta.get("trajectoryId") or meta.get("rolloutId")
        if not trajectory_id:
            raise ValueError("rollout payload has no metadata.trajectory_id")
        endpoint = base_url or meta.get("endpoint") or payload.get("model_endpoint")
        if not endpoint:
            raise ValueError("rollout payload has no metadata.endpoint (the runtime server URL)")
        params = payload.get("inference_params") or payload.get("inferenceParams") or {}
        return cls(trajectory_id=str(trajectory_id), base_url=str(endpoint), model=str(payload.get("model_name") or ""),
                   inference_params=dict(params), job_arn=meta.get("job_arn") or meta.get("jobArn") or None,
                   api_key=api_key)


_PARAM_ALIASES = {"maxTokens": "max_tokens", "topP": "top_p", "max_completion_tokens": "max_tokens"}


def normalize_payload(payload: Mapping[str, Any]) -> dict[str, Any]:
    """A push payload in both shapes at once, so agent code written for either reads it:

    - the SDK's: `instance` (the task row), `metadata.job_arn` / `trajectory_id`, `inference_params`;
    - AgentCore's: `prompt`, `metadata.jobArn` / `rolloutId`, `inferenceParams` (camelCase keys).

    Missing names are filled from their counterpart (`instance` from `prompt` as `{"prompt": ...}`,
    `prompt` from `instance["prompt"]` when it is a string); names present are never changed.
    """
    out = dict(payload)
    meta = dict(out.get("metadata") or {})
    for a, b in (("job_arn", "jobArn"), ("trajectory_id", "rolloutId")):
        value = meta.get(a) or meta.get(b)
        if value:
            meta.setdefault(a, value)
            meta.setdefault(b, value)
    if meta.get("trajectoryId"):
        meta.setdefault("trajectory_id", meta["trajectoryId"])
        meta.setdefault("rolloutId", meta["trajectoryId"])
    out["metadata"] = meta
    raw = out.get("inference_params") or out.get("inferenceParams") or {}
    params = {_PARAM_ALIASES.get(k, k): v for k, v in dict(raw).items()}
    out.setdefault("inference_params", params)
    out.setdefault("inferenceParams", dict(raw) or params)
    if out.get("inference_params") is None:
        out["inference_params"] = params
    if out.get("instance") is None and out.get("prompt") is not None:
        out["instance"] = {"prompt": out["prompt"]}
    if out.get("prompt") is None and isinstance(out.get("instance"), Mapping) and isinstance(
            out["instance"].get("prompt"), str):
        out["prompt"] = out["instance"]["prompt"]
    return out


current_rollout: ContextVar[RolloutContext | None] = ContextVar("turnwise_current_rollout", default=None)
"""The rollout of the running task, set by `rollout_scope` (and `rollout_handler`)."""


def headers() -> dict[str, str]:
    """The current rollout's headers; empty outside a rollout."""
    ctx = current_rollout.get()
    return ctx.headers() if ctx is not None else {}


@contextmanager
def rollout_scope(ctx: RolloutContext) -> Iterator[RolloutContext]:
    """Make `ctx` the current rollout inside the block."""
    token = current_rollout.set(ctx)
    try:
        yield ctx
    finally:
        current_rollout.reset(token)
