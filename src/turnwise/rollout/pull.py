"""Pull dispatch: queue rollouts on the runtime's task queue; `turnwise worker`s lease and run them.

    dispatcher = WorkerDispatcher(model=name, store=store, timeout=300.0, max_retries=2)
    groups = await dispatcher.run_groups(tasks, group_size, {"temperature": 1.0, ...})

Each rollout becomes one task (`turnwise.runtime.tasks`) whose payload is the push payload of
DESIGN.md plus `rollout_timeout`, which the worker enforces. A worker leases it, runs the
agent (which reports complete-rollout and update-reward), and reports the task done or failed.
A worker that dies stops heartbeating; its lease expires, its trajectory is failed, and the
task is queued again as a new attempt with a new trajectory id, up to `max_retries + 1`
attempts. The dispatcher waits until every task is done or failed and returns the trajectory
of its last attempt: one per task, so nothing is counted twice.

A leased task is bounded by the worker's timeout and, should the worker hang or die, by its
lease. Queued tasks wait for workers (a warning is logged while none come) until no worker has
leased any for `queue_timeout` seconds; then they fail ("the queue timed out", counted in
`rollout/timeouts`), so a step never waits forever on workers that are not there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from turnwise.rollout.base import as_groups
from turnwise.rollout.push import TERMINAL, final_trajectory, push_payload
from turnwise.runtime.store import TrajectoryStore
from turnwise.runtime.tasks import TaskQueue, TaskStatus
from turnwise.types import FailureKind, Group, RolloutResult, Task, Trajectory, TrajectoryStatus

log = logging.getLogger(__name__)

_CHUNK = 500  # ids per SQL query (SQLite limits bound parameters)


class WorkerDispatcher:
    """Runs rollouts through pull workers (see the module docstring)."""

    def __init__(self, *, model: str, store: TrajectoryStore, timeout: float, max_retries: int = 2,
                 endpoint: str | None = None, poll_interval: float = 0.05, warn_after: float = 60.0,
                 queue_timeout: float = 600.0) -> None:
        self.model = model
        self.store = store
        self.timeout = timeout
        self.queue_timeout = queue_timeout
        """Seconds with rollouts queued and none leased before the queued ones fail."""
        self.max_retries = max_retries
        self.endpoint = endpoint
        """Runtime URL for the agents; None: the URL the worker leased from."""
        self.poll_interval = poll_interval
        self.warn_after = warn_after

    async def run_groups(self, tasks: Sequence[Task], group_size: int,
                         inference_params: Mapping[str, Any]) -> list[Group]:
        batch = self.store.new_trajectory_id("batch")
        ids = [f"{batch}-{i}-{g}" for i in range(len(tasks)) for g in range(group_size)]
        return as_groups(tasks, group_size, await self._run(
            [tasks[k // group_size] for k in range(len(ids))], ids, inference_params))

    async def run_one(self, task: Task, inference_params: Mapping[str, Any],
                      trajectory_id: str | None = None) -> RolloutResult:
        """One rollout; with `trajectory_id`, that is the task id and its first attempt's trajectory id."""
        [result] = await self._run([task], [trajectory_id or self.store.new_trajectory_id("task")], inference_params,
                                   named=trajectory_id is not None)
        return result

    async def _run(self, tasks: Sequence[Task], ids: Sequence[str], inference_params: Mapping[str, Any],
                   named: bool = False) -> list[RolloutResult]:
        queue = TaskQueue(self.store, max_attempts=self.max_retries + 1)
        rows = []
        for task, task_id in zip(tasks, ids, strict=True):
            payload = push_payload(task, inference_params, model=self.model, job_arn=self.store.job_id,
                                   endpoint=self.endpoint, trajectory_id=task_id if named else None)
            payload["rollout_timeout"] = self.timeout
            rows.append((task_id, payload))
        start = time.perf_counter()
        queue.add(rows)
        finished = await self._wait(queue, {task_id: task.id for task, task_id in zip(tasks, ids, strict=True)},
                                    start)
        return [RolloutResult(task=task, trajectory=finished[task_id][0], seconds=finished[task_id][1],
                              retried=self._retried(task_id, finished[task_id][0].id))
                for task, task_id in zip(tasks, ids, strict=True)]

    def _retried(self, task_id: str, last_id: str) -> tuple[FailureKind, ...]:
        """Failure kinds of the attempts before the last one (their trajectories are `<task>.a<k>`,
        the first one named after the task when the dispatcher chose its id)."""
        out = []
        for candidate in (task_id, *(f"{task_id}.a{k}" for k in range(1, self.max_retries + 2))):
            if candidate == last_id:
                break
            t = self.store.get(candidate, last_turn_only=True)
            if t is not None and t.status == TrajectoryStatus.FAILED:
                out.append(t.failure or FailureKind.AGENT_ERROR)
        return tuple(out)

    async def _wait(self, queue: TaskQueue, ids: Mapping[str, str],
                    start: float) -> dict[str, tuple[Trajectory, float]]:
        """Poll until every task (queue task id -> `Task.id`) ended; task id -> (its last attempt's
        trajectory, seconds)."""
        pending = set(ids)
        ended_at: dict[str, float] = {}  # task done, trajectory not yet rewarded: when first seen
        finished: dict[str, tuple[Trajectory, float]] = {}
        last_progress = last_lease = time.monotonic()
        queued = len(ids)
        while pending:
            counts = queue.counts()  # also applies lease expiry (re-queues tasks of dead workers)
            now_queued = counts["queued"]
            if now_queued < queued or now_queued == 0:
                last_lease = time.monotonic()
            queued = now_queued
            if time.monotonic() - last_lease > self.queue_timeout:
                failed = queue.fail_queued(list(pending), f"no worker leased it: the queue timed out after "
                                                          f"{self.queue_timeout:g}s without a lease")
                if failed:
                    log.warning("%d queued rollouts failed: no worker leased any for %gs", len(failed),
                                self.queue_timeout)
                last_lease = time.monotonic()
            for task_id, status, trajectory_id, error in self._ended(pending):
                trajectory = self._trajectory_of(task_id, status, trajectory_id, error, ids[task_id])
                if trajectory.status not in TERMINAL:  # the queue is sealing it, or update-reward may follow
                    first = ended_at.setdefault(task_id, time.monotonic())
                    if time.monotonic() - first < self.timeout:
                        continue
                    self.store.fail(trajectory.id, FailureKind.NO_REWARD, f"task {status.value} but its trajectory "
                                    f"was never completed ({error or 'no error given'})")
                    trajectory = final_trajectory(self.store, trajectory.id, self.timeout)
                finished[task_id] = (trajectory, time.perf_counter() - start)
                pending.discard(task_id)
                last_progress = time.monotonic()
            if pending and time.monotonic() - last_progress > self.warn_after:
                log.warning("%d rollouts still waiting (%d queued, %d leased): are `turnwise worker`s running "
                            "against this runtime?", len(pending), counts["queued"], counts["leased"])
                last_progress = time.monotonic()
            if pending:
                await asyncio.sleep(self.poll_interval)
        return finished

    def _ended(self, task_ids: Iterable[str]) -> list[tuple[str, TaskStatus, str | None, str | None]]:
        """(id, status, trajectory id, error) of the given tasks that are done or failed."""
        ids = list(task_ids)
        out = []
        for i in range(0, len(ids), _CHUNK):
            chunk = ids[i:i + _CHUNK]
            marks = ",".join("?" * len(chunk))
            with self.store.transaction() as conn:
                rows = conn.execute(f"SELECT id, status, trajectory_id, error FROM tasks WHERE job_id=? "
                                    f"AND status IN (?, ?) AND id IN ({marks})",
                                    (self.store.job_id, TaskStatus.DONE.value, TaskStatus.FAILED.value,
                                     *chunk)).fetchall()
            out += [(r["id"], TaskStatus(r["status"]), r["trajectory_id"], r["error"]) for r in rows]
        return out

    def _trajectory_of(self, task_id: str, status: TaskStatus, trajectory_id: str | None,
                       error: str | None, task_row_id: str) -> Trajectory:
        trajectory = self.store.get(trajectory_id) if trajectory_id else None
        if trajectory is None:  # never leased (the queue timed out): a failed trajectory records why
            trajectory_id = trajectory_id or f"{task_id}.none"
            self.store.begin(trajectory_id, task_id=task_row_id)
            self.store.fail(trajectory_id, FailureKind.QUEUE_TIMEOUT, error or f"task {status.value}")
            trajectory = self.store.get(trajectory_id)
            assert trajectory is not None
        return trajectory
