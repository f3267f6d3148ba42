"""Push dispatch: `POST {url}/rollout` to an agent server, the managed agent SDK's contract.

    dispatcher = PushDispatcher("http://127.0.0.1:8080", base_url=runtime_url, model=name, store=store,
                                concurrency=64, timeout=300.0, max_retries=2)
    groups = await dispatcher.run_groups(tasks, group_size, {"temperature": 1.0, ...})

`run_groups` first checks `GET {url}/health`, then sends each rollout the payload of DESIGN.md
with a trajectory id of its own (created in the store first, so every failure has a record).
The agent reports complete-rollout and update-reward itself; the dispatcher then waits, polling
the store, until the trajectory is REWARDED or FAILED, within `timeout` of the request.

Outcomes of one attempt:

| what happened                                     | recorded                         | retried |
|---------------------------------------------------|----------------------------------|---------|
| agent rewarded the trajectory                     | REWARDED                         | no      |
| agent reported complete-rollout(failed)           | FAILED, the agent's reason       | no      |
| connection error, HTTP 429 or 5xx, timeout        | FAILED, "...HTTP 500: ...", ...  | yes     |
| HTTP 4xx (bad key, bad payload)                   | FAILED, "agent server refused"   | no      |
| answered, but no complete-rollout before timeout  | FAILED, "did not report"         | no      |
| completed, but no update-reward before timeout    | FAILED in the result (READY in the store) | no |

A retry is a fresh attempt with a fresh trajectory id; the failed attempt's trajectory stays
FAILED, so a late call from the abandoned agent gets 409 and cannot be counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from turnwise.adapter.feedback import error_message
from turnwise.runtime.store import TrajectoryStore, TransitionError
from turnwise.types import Group, RolloutResult, Task, Trajectory, TrajectoryStatus

TERMINAL = (TrajectoryStatus.REWARDED, TrajectoryStatus.FAILED)


class AgentUnavailable(RuntimeError):
    """The agent server did not answer `GET /health` with 200."""


def prompt_of(row: Mapping[str, Any]) -> str:
    """The payload's `prompt`: the row's `prompt` (or `question`), else its last user message."""
    for key in ("prompt", "question"):
        if isinstance(row.get(key), str):
            return row[key]
    messages = row.get("messages")
    if isinstance(messages, Sequence):
        for m in reversed(messages):
            if isinstance(m, Mapping) and m.get("role") == "user" and isinstance(m.get("content"), str):
                return m["content"]
    return ""


def push_payload(task: Task, inference_params: Mapping[str, Any], *, model: str, job_arn: str,
                 trajectory_id: str | None = None, endpoint: str | None = None,
                 region: str = "local") -> dict[str, Any]:
    """The `/rollout` body of DESIGN.md (both spellings of the keys the managed service sends)."""
    params = {k: inference_params[k] for k in ("temperature", "max_tokens", "top_p") if k in inference_params}
    metadata: dict[str, Any] = {"job_arn": job_arn, "jobArn": job_arn, "region": region}
    if trajectory_id is not None:
        metadata["trajectory_id"] = metadata["rolloutId"] = trajectory_id
    if endpoint is not None:
        metadata["endpoint"] = endpoint
    return {"instance": dict(task.row), "prompt": prompt_of(task.row), "metadata": metadata,
            "inference_params": params, "inferenceParams": dict(params), "model_name": model}


def fail_in_progress(store: TrajectoryStore, trajectory_id: str, error: str) -> None:
    """Seal a trajectory as FAILED unless it already ended (its agent may have just finished)."""
    t = store.get(trajectory_id, last_turn_only=True)
    if t is not None and t.status == TrajectoryStatus.IN_PROGRESS:
        with contextlib.suppress(TransitionError):  # its agent sealed it meanwhile
            store.complete(trajectory_id, TrajectoryStatus.FAILED, error=error)


def final_trajectory(store: TrajectoryStore, trajectory_id: str, waited: float) -> Trajectory:
    """The stored trajectory; one left READY (completed, never rewarded) is reported as FAILED."""
    t = store.get(trajectory_id)
    assert t is not None, trajectory_id
    if t.status == TrajectoryStatus.READY:
        return dataclasses.replace(t, status=TrajectoryStatus.FAILED,
                                   error=f"the agent completed the rollout but sent no update-reward "
                                         f"within {waited:g}s")
    return t


async def wait_terminal(store: TrajectoryStore, trajectory_id: str, deadline: float) -> TrajectoryStatus | None:
    """Poll until the trajectory is REWARDED or FAILED (its status), or None at the deadline."""
    delay = 0.005
    while True:
        t = store.get(trajectory_id, last_turn_only=True)
        if t is not None and t.status in TERMINAL:
            return t.status
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, 0.1)


class PushDispatcher:
    """Runs rollouts by POSTing them to an agent server (see the module docstring)."""

    def __init__(self, url: str, *, base_url: str, model: str, store: TrajectoryStore, concurrency: int,
                 timeout: float, max_retries: int = 2, api_key: str | None = None,
                 endpoint: str | None = None, health_timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.endpoint = endpoint or base_url
        """The runtime server URL sent to the agent in metadata.endpoint."""
        self.model = model
        self.store = store
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.api_key = api_key
        """Bearer key for the agent server's /rollout (not the runtime's key)."""
        self.health_timeout = health_timeout

    async def run_groups(self, tasks: Sequence[Task], group_size: int,
                         inference_params: Mapping[str, Any]) -> list[Group]:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        async with httpx.AsyncClient(base_url=self.url, headers=headers, limits=limits,
                                     timeout=httpx.Timeout(None, connect=10.0)) as http:
            await self.check_health(http)
            limit = asyncio.Semaphore(self.concurrency)
            results = await asyncio.gather(*(self._run_one(http, limit, task, inference_params)
                                             for task in tasks for _ in range(group_size)))
        return [Group(task=t, rollouts_G=tuple(results[i * group_size:(i + 1) * group_size]))
                for i, t in enumerate(tasks)]

    async def check_health(self, http: httpx.AsyncClient) -> None:
        """`GET /health` until 200, for up to `health_timeout` seconds; else AgentUnavailable."""
        deadline = time.monotonic() + self.health_timeout
        while True:
            try:
                r = await http.get("/health", timeout=min(5.0, self.health_timeout))
                if r.status_code == 200:
                    return
                problem = f"HTTP {r.status_code}: {error_message(r)}"
            except httpx.HTTPError as e:
                problem = f"{type(e).__name__}: {e}"
            if time.monotonic() >= deadline:
                raise AgentUnavailable(f"agent server {self.url} is not healthy (GET /health: {problem}); "
                                       "is it running (serve_agent) and is agent.url right?")
            await asyncio.sleep(0.2)

    async def _run_one(self, http: httpx.AsyncClient, limit: asyncio.Semaphore, task: Task,
                       inference_params: Mapping[str, Any]) -> RolloutResult:
        async with limit:
            start = time.perf_counter()
            attempts = self.max_retries + 1
            for attempt in range(1, attempts + 1):
                trajectory_id = f"traj-{uuid.uuid4().hex}"
                self.store.begin(trajectory_id)
                self.store.expect_sampling(trajectory_id, inference_params)  # runtime.sampling_overrides
                payload = push_payload(task, inference_params, model=self.model, job_arn=self.store.job_id,
                                       trajectory_id=trajectory_id, endpoint=self.endpoint)
                error, retry = await self._attempt(http, payload, trajectory_id)
                if error is not None:
                    fail_in_progress(self.store, trajectory_id, f"{error} (attempt {attempt} of {attempts})")
                if error is None or not retry:
                    break
            return RolloutResult(task=task, trajectory=final_trajectory(self.store, trajectory_id, self.timeout),
                                 seconds=time.perf_counter() - start)

    async def _attempt(self, http: httpx.AsyncClient, payload: dict[str, Any],
                       trajectory_id: str) -> tuple[str | None, bool]:
        """(why the attempt failed or None, whether to retry)."""
        deadline = time.monotonic() + self.timeout
        try:
            r = await asyncio.wait_for(http.post("/rollout", json=payload), self.timeout)
        except TimeoutError:
            return f"rollout timed out after {self.timeout:g}s", True
        except httpx.HTTPError as e:
            return f"agent server {self.url} unreachable: {type(e).__name__}: {e}", True
        if r.status_code == 429 or r.status_code >= 500:
            return f"agent server answered HTTP {r.status_code}: {error_message(r)}", True
        if r.status_code >= 400:
            return f"agent server refused the rollout: HTTP {r.status_code}: {error_message(r)}", False
        if await wait_terminal(self.store, trajectory_id, deadline) is None:
            t = self.store.get(trajectory_id, last_turn_only=True)
            if t is not None and t.status == TrajectoryStatus.IN_PROGRESS:
                if r.status_code == 202:  # accepted, running in the background: a timeout
                    return f"rollout timed out after {self.timeout:g}s (accepted, never reported)", True
                return (f"the agent answered HTTP {r.status_code} but did not report complete-rollout "
                        f"within {self.timeout:g}s"), False
        return None, False
