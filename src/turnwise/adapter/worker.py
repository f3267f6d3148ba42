"""Pull worker: lease rollouts from a runtime server, run an agent on each, heartbeat, report.

    worker = Worker(agent, "http://trainer:8000", api_key=key, concurrency=8)
    await worker.run(stop_event)          # or: turnwise worker --agent mod:fn --server URL

The agent is either a trainer-style function, `async def agent(task, client, ctx) -> reward`
(the same one `agent.kind: python` runs in process: `task` is the payload's `instance`), or a
`@rollout_handler`-style function of the push payload (`fn(payload)` / `fn(payload, ctx)`).
Either way the outcome is reported to the runtime (complete-rollout, update-reward) before the
task is reported done; an agent that raises or outlives its timeout is reported failed.

Per lease, a heartbeat runs every `lease_seconds / 3`. A 409 on a heartbeat means the lease was
lost (the server thought this worker dead and queued the task again): the rollout is cancelled
and not reported, since its trajectory was already failed. A worker killed outright simply stops
heartbeating; the task goes back to the queue when the lease expires (server side).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import logging
import os
import socket
import sys
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from turnwise.adapter.context import RolloutContext
from turnwise.adapter.feedback import error_message
from turnwise.adapter.handler import rollout_handler
from turnwise.types import FailureKind

log = logging.getLogger(__name__)


class WorkerError(RuntimeError):
    """The runtime refused the worker (bad API key, wrong URL); retrying would not help."""


def load_function(spec: str | None, what: str = "--agent") -> Callable[..., Any]:
    """Import `module:function`; the current directory is importable (like `uvicorn --app-dir .`)."""
    module_name, sep, attr = (spec or "").partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{what} must look like 'package.module:function', got {spec!r}")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import agent module {module_name!r}: {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"module {module_name!r} has no function {attr!r}")
    return fn


def _positional_arity(fn: Callable[..., Any]) -> int:
    params = inspect.signature(fn).parameters.values()
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def as_rollout_handler(fn: Callable[..., Any], *, api_key: str | None = None) -> Callable[[Mapping[str, Any]], Any]:
    """A `@rollout_handler` running `fn` (see the module docstring for the two styles)."""
    if getattr(fn, "__turnwise_rollout_handler__", False):
        return fn
    if inspect.iscoroutinefunction(fn) and _positional_arity(fn) == 3:
        trainer_style = fn

        async def on_payload(payload: Mapping[str, Any], ctx: RolloutContext) -> Any:
            client = ctx.async_openai()
            try:
                value = await trainer_style(dict(payload["instance"]), client, ctx)
            finally:
                await client.close()
            return value.value if hasattr(value, "value") else value  # reward objects: metrics stay local

        return rollout_handler(on_payload, api_key=api_key)
    return rollout_handler(fn, api_key=api_key)


class Worker:
    """Leases tasks from one runtime server and runs an agent on each, `concurrency` at a time."""

    def __init__(self, fn: Callable[..., Any], server_url: str, *, api_key: str | None = None,
                 concurrency: int = 1, lease_seconds: float = 60.0, timeout: float | None = None,
                 poll_interval: float = 0.5, worker_id: str | None = None, max_tasks: int | None = None) -> None:
        if concurrency < 1 or lease_seconds <= 0 or poll_interval <= 0:
            raise ValueError("concurrency, lease_seconds and poll_interval must be positive")
        self.handler = as_rollout_handler(fn, api_key=api_key)
        self.server_url = server_url.rstrip("/")
        self.api_key = api_key
        self.concurrency = concurrency
        self.lease_seconds = lease_seconds
        self.timeout = timeout
        """Seconds per rollout; None: the payload's `rollout_timeout`, else no limit."""
        self.poll_interval = poll_interval
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.max_tasks = max_tasks
        """Stop after leasing this many tasks (None: run until stopped)."""
        self.completed = 0
        """Tasks reported done."""
        self.failed = 0
        """Tasks reported failed."""
        self.lost = 0
        """Leases lost before the report (the task was re-queued)."""

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Lease and run tasks until `stop` is set (then finish the running ones) or `max_tasks`."""
        stop = stop or asyncio.Event()
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        running: set[asyncio.Task[None]] = set()
        leased = 0
        backoff = self.poll_interval
        async with httpx.AsyncClient(base_url=self.server_url, headers=headers, timeout=30.0) as http:
            try:
                while not stop.is_set() and (self.max_tasks is None or leased < self.max_tasks):
                    free = self.concurrency - len(running)
                    if self.max_tasks is not None:
                        free = min(free, self.max_tasks - leased)
                    got = 0
                    if free > 0:
                        try:
                            leases = await self._lease(http, free)
                            backoff = self.poll_interval
                        except httpx.HTTPError as e:
                            log.warning("worker %s: cannot reach %s (%s); retrying", self.worker_id,
                                        self.server_url, e)
                            leases, backoff = [], min(backoff * 2, 10 * self.poll_interval)
                        for lease in leases:
                            running.add(asyncio.create_task(self._run_lease(http, lease)))
                        got, leased = len(leases), leased + len(leases)
                    if got == 0 or len(running) >= self.concurrency:
                        await _wait_any(running, stop, backoff if got == 0 else None)
                    running = {t for t in running if not t.done()}
                if running:
                    await asyncio.gather(*running)
            finally:
                for t in running:
                    t.cancel()

    async def _lease(self, http: httpx.AsyncClient, n: int) -> list[dict[str, Any]]:
        r = await http.post("/tasks/lease", json={"WorkerId": self.worker_id, "MaxTasks": n,
                                                  "LeaseSeconds": self.lease_seconds})
        if r.status_code in (401, 403, 404):
            raise WorkerError(f"{self.server_url} refused the worker: HTTP {r.status_code}: {error_message(r)}")
        if r.status_code != 200:
            raise httpx.HTTPStatusError(f"HTTP {r.status_code}: {error_message(r)}", request=r.request, response=r)
        return list(r.json()["Leases"])

    async def _run_lease(self, http: httpx.AsyncClient, lease: Mapping[str, Any]) -> None:
        task_path = "/tasks/" + quote(str(lease["TaskId"]), safe="")
        payload = dict(lease["Payload"])
        timeout = self.timeout if self.timeout is not None else payload.pop("rollout_timeout", None)
        rollout = asyncio.create_task(self._call(payload))
        beat = asyncio.create_task(self._heartbeat(http, task_path, lease["LeaseId"], rollout))
        status, error, failure = "done", None, None
        try:
            await asyncio.wait_for(asyncio.shield(rollout), timeout)
        except TimeoutError:
            rollout.cancel()
            with contextlib.suppress(BaseException):
                await rollout
            status, error = "failed", f"rollout timed out after {timeout:g}s (worker {self.worker_id})"
            failure = FailureKind.AGENT_TIMEOUT
        except asyncio.CancelledError:
            if not rollout.cancelled():  # the worker itself is being cancelled
                rollout.cancel()
                raise
            self.lost += 1
            log.warning("worker %s: lease of task %s lost; dropped it", self.worker_id, lease["TaskId"])
            return
        except Exception as e:  # the agent failed; rollout_handler already reported its trajectory
            status, error, failure = "failed", f"{type(e).__name__}: {e}", FailureKind.AGENT_ERROR
        finally:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat
        await self._report(http, task_path, lease["LeaseId"], status, error, failure)

    async def _call(self, payload: dict[str, Any]) -> None:
        if inspect.iscoroutinefunction(self.handler):
            await self.handler(payload)
        else:
            await asyncio.to_thread(self.handler, payload)

    async def _heartbeat(self, http: httpx.AsyncClient, task_path: str, lease_id: str,
                         rollout: asyncio.Task[None]) -> None:
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            try:
                r = await http.post(task_path + "/heartbeat", json={"LeaseId": lease_id,
                                                                    "LeaseSeconds": self.lease_seconds})
            except httpx.HTTPError as e:
                log.warning("worker %s: heartbeat failed (%s); retrying", self.worker_id, e)
                continue
            if r.status_code in (404, 409):
                rollout.cancel()  # the task was given to another worker: stop working on it
                return

    async def _report(self, http: httpx.AsyncClient, task_path: str, lease_id: str, status: str,
                      error: str | None, failure: FailureKind | None = None) -> None:
        body = {"LeaseId": lease_id, "Status": status, **({"Error": error[:4096]} if error else {}),
                **({"Failure": failure.value} if failure else {})}
        for attempt in range(5):
            try:
                r = await http.post(task_path + "/report", json=body)
            except httpx.HTTPError as e:
                log.warning("worker %s: report failed (%s); retrying", self.worker_id, e)
                await asyncio.sleep(0.2 * 2 ** attempt)
                continue
            if r.status_code == 200:
                if status == "done":
                    self.completed += 1
                else:
                    self.failed += 1
            else:
                self.lost += 1
                log.warning("worker %s: report of %s refused: HTTP %d: %s", self.worker_id, task_path,
                            r.status_code, error_message(r))
            return
        self.lost += 1


async def _wait_any(running: set[asyncio.Task[None]], stop: asyncio.Event, timeout: float | None) -> None:
    """Until a running task ends, `stop` is set, or `timeout` passes."""
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({*running, stopper}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
