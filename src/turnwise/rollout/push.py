"""Push dispatch: `POST {url}/rollout` to an agent server, the managed agent SDK's contract.

    dispatcher = PushDispatcher("http://127.0.0.1:8080", base_url=runtime_url, model=name, store=store,
                                concurrency=64, timeout=300.0, max_retries=2)
    groups = await dispatcher.run_groups(tasks, group_size, {"temperature": 1.0, ...})

`run_groups` first checks `GET {url}/health`, then sends each rollout the payload of DESIGN.md
with a trajectory id of its own (created in the store first, so every failure has a record).
The agent reports complete-rollout and update-reward itself; the dispatcher then waits, polling
the store, until the trajectory is REWARDED or FAILED, within `timeout` of the request.

Outcomes of one attempt:

| what happened                                     | recorded (failure kind)            | retried |
|---------------------------------------------------|------------------------------------|---------|
| agent rewarded the trajectory                     | REWARDED                           | no      |
| agent reported complete-rollout(failed)           | FAILED, agent_error, its reason    | no      |
| connection error, HTTP 429 or 5xx                 | FAILED, transport                  | yes     |
| no answer within the timeout                      | FAILED, timeout                    | yes     |
| HTTP 4xx (bad key, bad payload)                   | FAILED, transport ("refused")      | no      |
| answered, but no complete-rollout before timeout  | FAILED, timeout ("did not report") | no      |
| completed, but no update-reward before timeout    | FAILED, no_reward                  | no      |

A retry is a fresh attempt with a fresh trajectory id; the failed attempt's trajectory stays
FAILED, so a late call from the abandoned agent gets 409 and cannot be counted. Retries wait
`retry_backoff * 2^(k-1)` seconds (+-50% jitter, at most `timeout`) before attempt k+1. An attempt the agent server could not take (connection
refused, HTTP 5xx) first waits for the server to be healthy again: one health poll for all
rollouts, paused for up to `unavailable_timeout` (a restart loses no rollout), after which
`AgentUnavailable` stops the step and the loop stops the run with a checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from turnwise.adapter.feedback import error_message
from turnwise.rollout.base import as_groups
from turnwise.runtime.store import TrajectoryStore
from turnwise.types import FailureKind, Group, RolloutResult, Task, Trajectory, TrajectoryStatus

TERMINAL = (TrajectoryStatus.REWARDED, TrajectoryStatus.FAILED)
log = logging.getLogger(__name__)


class AgentUnavailable(RuntimeError):
    """The agent server did not answer `GET /health` with 200 within `unavailable_timeout`."""


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
    """The `/rollout` body of DESIGN.md (both spellings of the keys the managed service sends).
    `metadata.task_id` is the task's id, which a pull worker's lease records on the trajectory."""
    params = {k: inference_params[k] for k in ("temperature", "max_tokens", "top_p") if k in inference_params}
    metadata: dict[str, Any] = {"job_arn": job_arn, "jobArn": job_arn, "region": region, "task_id": task.id}
    if trajectory_id is not None:
        metadata["trajectory_id"] = metadata["rolloutId"] = trajectory_id
    if endpoint is not None:
        metadata["endpoint"] = endpoint
    return {"instance": dict(task.row), "prompt": prompt_of(task.row), "metadata": metadata,
            "inference_params": params, "inferenceParams": dict(params), "model_name": model}


def final_trajectory(store: TrajectoryStore, trajectory_id: str, waited: float) -> Trajectory:
    """The stored trajectory; one left READY (completed, never rewarded) is failed as no_reward."""
    store.fail(trajectory_id, FailureKind.NO_REWARD,
               f"the agent completed the rollout but sent no update-reward within {waited:g}s")
    t = store.get(trajectory_id)
    assert t is not None, trajectory_id
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
                 endpoint: str | None = None, unavailable_timeout: float = 300.0,
                 retry_backoff: float = 0.5) -> None:
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
        self.unavailable_timeout = unavailable_timeout
        self.retry_backoff = retry_backoff
        self._health_lock = asyncio.Lock()
        """One health poll at a time: the rollouts that failed together wait for the same one."""

    async def run_groups(self, tasks: Sequence[Task], group_size: int,
                         inference_params: Mapping[str, Any]) -> list[Group]:
        async with self._client() as http:
            await self.check_health(http)
            limit = asyncio.Semaphore(self.concurrency)
            runs = [asyncio.ensure_future(self._run_one(http, limit, task, inference_params))
                    for task in tasks for _ in range(group_size)]
            try:
                results = await asyncio.gather(*runs)
            except BaseException:  # AgentUnavailable or a cancellation: stop the others, recorded as such
                for r in runs:
                    r.cancel()
                await asyncio.gather(*runs, return_exceptions=True)
                raise
        return as_groups(tasks, group_size, results)

    async def run_one(self, task: Task, inference_params: Mapping[str, Any],
                      trajectory_id: str | None = None) -> RolloutResult:
        async with self._client() as http:
            await self.check_health(http)
            return await self._run_one(http, asyncio.Semaphore(1), task, inference_params, trajectory_id)

    def _client(self) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        return httpx.AsyncClient(base_url=self.url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(None, connect=10.0))

    async def check_health(self, http: httpx.AsyncClient) -> float:
        """`GET /health` until 200, for up to `unavailable_timeout` seconds (else AgentUnavailable);
        returns the seconds it waited."""
        async with self._health_lock:
            return await self._poll_health(http)

    async def _poll_health(self, http: httpx.AsyncClient) -> float:
        started = time.monotonic()
        deadline = started + self.unavailable_timeout
        warned = False
        while True:
            try:
                r = await http.get("/health", timeout=min(5.0, self.unavailable_timeout))
                if r.status_code == 200:
                    return time.monotonic() - started
                problem = f"HTTP {r.status_code}: {error_message(r)}"
            except httpx.HTTPError as e:
                problem = f"{type(e).__name__}: {e}"
            if time.monotonic() >= deadline:
                raise AgentUnavailable(f"agent server {self.url} is not healthy (GET /health: {problem}) after "
                                       f"{self.unavailable_timeout:g}s (agent.unavailable_timeout); is it running "
                                       "(serve_agent) and is agent.url right?")
            if not warned:
                log.warning("agent server %s is not healthy (%s): dispatch paused for up to %gs", self.url, problem,
                            self.unavailable_timeout)
                warned = True
            await asyncio.sleep(0.2)

    async def _run_one(self, http: httpx.AsyncClient, limit: asyncio.Semaphore, task: Task,
                       inference_params: Mapping[str, Any], first_id: str | None = None) -> RolloutResult:
        async with limit:
            start = time.perf_counter()
            attempts = self.max_retries + 1
            retried: list[FailureKind] = []
            for attempt in range(1, attempts + 1):
                trajectory_id = first_id if attempt == 1 and first_id else self.store.new_trajectory_id()
                self.store.begin(trajectory_id, task_id=task.id)
                self.store.expect_sampling(trajectory_id, inference_params)  # runtime.sampling_overrides
                payload = push_payload(task, inference_params, model=self.model, job_arn=self.store.job_id,
                                       trajectory_id=trajectory_id, endpoint=self.endpoint)
                try:
                    failure, error, retry = await self._attempt(http, payload, trajectory_id)
                except asyncio.CancelledError:
                    self.store.fail(trajectory_id, FailureKind.ABANDONED, "the step was stopped")
                    raise
                if failure is not None:
                    self.store.fail(trajectory_id, failure, f"{error} (attempt {attempt} of {attempts})")
                if failure is None or not retry or attempt == attempts:
                    break
                if failure == FailureKind.TRANSPORT:
                    await self.check_health(http)
                retried.append(failure)
                await asyncio.sleep(min(self.timeout, self.retry_backoff * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)))
            return RolloutResult(task=task, trajectory=final_trajectory(self.store, trajectory_id, self.timeout),
                                 seconds=time.perf_counter() - start, retried=tuple(retried))

    async def _attempt(self, http: httpx.AsyncClient, payload: dict[str, Any],
                       trajectory_id: str) -> tuple[FailureKind | None, str | None, bool]:
        """(failure kind or None, why, whether to retry)."""
        deadline = time.monotonic() + self.timeout
        try:
            r = await asyncio.wait_for(http.post("/rollout", json=payload), self.timeout)
        except TimeoutError:
            return FailureKind.AGENT_TIMEOUT, f"rollout timed out after {self.timeout:g}s", True
        except httpx.HTTPError as e:
            return FailureKind.TRANSPORT, f"agent server {self.url} unreachable: {type(e).__name__}: {e}", True
        if r.status_code == 429 or r.status_code >= 500:
            return FailureKind.TRANSPORT, f"agent server answered HTTP {r.status_code}: {error_message(r)}", True
        if r.status_code >= 400:
            return (FailureKind.TRANSPORT, f"agent server refused the rollout: HTTP {r.status_code}: "
                                           f"{error_message(r)}", False)
        if await wait_terminal(self.store, trajectory_id, deadline) is None:
            t = self.store.get(trajectory_id, last_turn_only=True)
            if t is not None and t.status == TrajectoryStatus.IN_PROGRESS:
                if r.status_code == 202:  # accepted, running in the background: a timeout
                    return (FailureKind.AGENT_TIMEOUT,
                            f"rollout timed out after {self.timeout:g}s (accepted, never reported)", True)
                return (FailureKind.AGENT_TIMEOUT, f"the agent answered HTTP {r.status_code} but did not "
                        f"report complete-rollout within {self.timeout:g}s", False)
        return None, None, False
