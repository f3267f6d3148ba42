"""Report a rollout's outcome to the runtime server: complete-rollout, then update-reward.

Every call carries a ClientToken (a fresh one unless given), so the client's own retries of
transient failures (connection refused while the server restarts, 502/503/504) are idempotent.
A 409 "not in valid status" means the trajectory already moved on (reported by someone else,
or by an earlier attempt whose response was lost): it counts as done and returns False.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

ALREADY_DONE_MARKERS = ("not in valid status", "Cannot transition trajectory")
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


class FeedbackClient:
    """Async client of `/complete-rollout` and `/update-reward`."""

    def __init__(self, base_url: str, api_key: str | None = None, *, job_arn: str | None = None,
                 retries: int = 6, backoff: float = 0.1, timeout: float = 30.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout,
                                       transport=transport)
        self.job_arn = job_arn
        self.retries = retries
        self.backoff = backoff

    async def complete_rollout(self, trajectory_id: str, status: str = "ready", client_token: str | None = None,
                               *, error: str | None = None) -> bool:
        """Seal the trajectory as "ready" or "failed". False when it was already sealed."""
        if status not in ("ready", "failed"):
            raise ValueError(f"status must be 'ready' or 'failed', not {status!r}")
        body: dict[str, Any] = {"TrajectoryId": trajectory_id, "Status": status}
        if error is not None:
            body["Error"] = error[:4096]
        return await self._post("/complete-rollout", body, client_token)

    async def update_reward(self, trajectory_id: str, rewards: float | Sequence[float],
                            client_token: str | None = None) -> bool:
        """One reward, or one per turn (after complete_rollout). False when already rewarded."""
        values = [float(rewards)] if isinstance(rewards, int | float) else [float(r) for r in rewards]
        return await self._post("/update-reward", {"TrajectoryId": trajectory_id, "Rewards": values}, client_token)

    async def _post(self, path: str, body: dict[str, Any], client_token: str | None) -> bool:
        body["ClientToken"] = client_token or uuid.uuid4().hex
        if self.job_arn:
            body["JobArn"] = self.job_arn
        delay = self.backoff
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = await self._http.post(path, json=body)
            except httpx.TransportError:
                if last:
                    raise
            else:
                if response.status_code < 400:
                    return True
                message = error_message(response)
                if response.status_code == 409 and any(m in message for m in ALREADY_DONE_MARKERS):
                    return False
                if response.status_code not in _RETRY_STATUS or last:
                    raise FeedbackError(response.status_code, message)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> FeedbackClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
