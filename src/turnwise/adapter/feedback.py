"""Report a rollout's outcome to the runtime server: complete-rollout, then update-reward.

Every call carries a ClientToken (a fresh one unless given), so the client's own retries of
transient failures (connection refused while the server restarts, 502/503/504) are idempotent.
A 409 "not in valid status" means the trajectory already moved on (reported by someone else,
or by an earlier attempt whose response was lost): it counts as done and returns False. So
does a 400 "invalid reward" (a per-turn list of the wrong length, NaN or infinity): the
runtime has failed that rollout with the reason, and the caller's step goes on without it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

ALREADY_DONE_MARKERS = ("not in valid status", "Cannot transition trajectory")
INVALID_REWARD_MARKER = "invalid reward"  # turnwise.runtime.rollout_routes.INVALID_REWARD
log = logging.getLogger(__name__)
_RETRY_STATUS = frozenset({502, 503, 504})


class FeedbackError(Exception):
    """The runtime refused a report (bad request, unknown trajectory, bad key)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


def error_message(response: httpx.Response) -> str:
    """The message of a runtime (or OpenAI-shaped) JSON error, else the body text."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, Mapping):
        err = body.get("error")
        if isinstance(err, Mapping) and "message" in err:
            return str(err["message"])
        if "message" in body:
            return str(body["message"])
    return response.text[:500]


def _complete_body(trajectory_id: str, status: str, error: str | None) -> dict[str, Any]:
    if status not in ("ready", "failed"):
        raise ValueError(f"status must be 'ready' or 'failed', not {status!r}")
    body: dict[str, Any] = {"TrajectoryId": trajectory_id, "Status": status}
    if error is not None:
        body["Error"] = error[:4096]
    return body


def _reward_body(trajectory_id: str, rewards: float | Sequence[float]) -> dict[str, Any]:
    values = [float(rewards)] if isinstance(rewards, int | float) else [float(r) for r in rewards]
    return {"TrajectoryId": trajectory_id, "Rewards": values}


_JSON = {"Content-Type": "application/json"}


def _json(body: dict[str, Any]) -> bytes:
    """JSON, with NaN and infinities written as Python does (httpx refuses them): the runtime
    reads them and fails that rollout with the reason, rather than the client raising."""
    return json.dumps(body, allow_nan=True).encode()


def _verify(base_url: str) -> bool:
    """No CA bundle for plain http (loading it costs ~40 ms per client; handlers make one per rollout)."""
    return not base_url.startswith("http://")


class _Reporter:
    """What both clients share: request bodies, the retry schedule, reading responses."""

    def __init__(self, api_key: str | None, job_arn: str | None, retries: int, backoff: float) -> None:
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.job_arn = job_arn
        self.retries = retries
        self.backoff = backoff

    def body(self, body: dict[str, Any], client_token: str | None) -> dict[str, Any]:
        body["ClientToken"] = client_token or uuid.uuid4().hex
        if self.job_arn:
            body["JobArn"] = self.job_arn
        return body

    def delays(self) -> list[float]:
        return [min(self.backoff * 2 ** i, 2.0) for i in range(self.retries)]

    @staticmethod
    def outcome(response: httpx.Response, last: bool) -> bool | None:
        """True done, False already done, None retry; raises FeedbackError on a refusal."""
        if response.status_code < 400:
            return True
        message = error_message(response)
        if response.status_code == 409 and any(m in message for m in ALREADY_DONE_MARKERS):
            return False
        if response.status_code == 400 and message.startswith(INVALID_REWARD_MARKER):
            log.warning("rollout failed: %s", message)
            return False
        if response.status_code not in _RETRY_STATUS or last:
            raise FeedbackError(response.status_code, message)
        return None


class FeedbackClient:
    """Async client of `/complete-rollout` and `/update-reward`."""

    def __init__(self, base_url: str, api_key: str | None = None, *, job_arn: str | None = None,
                 retries: int = 6, backoff: float = 0.1, timeout: float = 30.0, max_in_flight: int = 16,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._reporter = _Reporter(api_key, job_arn, retries, backoff)
        # Few requests in flight: httpx's pool scans every queued request against every connection
        # on each change, which is quadratic when a thousand rollouts report at once.
        self._in_flight = asyncio.Semaphore(max_in_flight)
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=self._reporter.headers,
                                       timeout=timeout, transport=transport, verify=_verify(base_url),
                                       limits=httpx.Limits(max_connections=max_in_flight,
                                                           max_keepalive_connections=max_in_flight))

    async def complete_rollout(self, trajectory_id: str, status: str = "ready", client_token: str | None = None,
                               *, error: str | None = None) -> bool:
        """Seal the trajectory as "ready" or "failed". False when it was already sealed."""
        return await self._post("/complete-rollout", _complete_body(trajectory_id, status, error), client_token)

    async def update_reward(self, trajectory_id: str, rewards: float | Sequence[float],
                            client_token: str | None = None) -> bool:
        """One reward, or one per turn (after complete_rollout). False when already rewarded."""
        return await self._post("/update-reward", _reward_body(trajectory_id, rewards), client_token)

    async def _post(self, path: str, body: dict[str, Any], client_token: str | None) -> bool:
        body = self._reporter.body(body, client_token)
        delays = self._reporter.delays()
        for attempt in range(len(delays) + 1):
            last = attempt == len(delays)
            try:
                async with self._in_flight:
                    response = await self._http.post(path, content=_json(body), headers=_JSON)
            except httpx.TransportError:
                if last:
                    raise
            else:
                done = self._reporter.outcome(response, last)
                if done is not None:
                    return done
            await asyncio.sleep(delays[attempt])
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> FeedbackClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class SyncFeedbackClient:
    """`FeedbackClient` for synchronous agents (same retries and idempotency)."""

    def __init__(self, base_url: str, api_key: str | None = None, *, job_arn: str | None = None,
                 retries: int = 6, backoff: float = 0.1, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self._reporter = _Reporter(api_key, job_arn, retries, backoff)
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=self._reporter.headers,
                                  timeout=timeout, transport=transport, verify=_verify(base_url))

    def complete_rollout(self, trajectory_id: str, status: str = "ready", client_token: str | None = None,
                         *, error: str | None = None) -> bool:
        return self._post("/complete-rollout", _complete_body(trajectory_id, status, error), client_token)

    def update_reward(self, trajectory_id: str, rewards: float | Sequence[float],
                      client_token: str | None = None) -> bool:
        return self._post("/update-reward", _reward_body(trajectory_id, rewards), client_token)

    def _post(self, path: str, body: dict[str, Any], client_token: str | None) -> bool:
        body = self._reporter.body(body, client_token)
        delays = self._reporter.delays()
        for attempt in range(len(delays) + 1):
            last = attempt == len(delays)
            try:
                response = self._http.post(path, content=_json(body), headers=_JSON)
            except httpx.TransportError:
                if last:
                    raise
            else:
                done = self._reporter.outcome(response, last)
                if done is not None:
                    return done
            time.sleep(delays[attempt])
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SyncFeedbackClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
