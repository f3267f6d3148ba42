"""Task leasing for pull workers: durable, with lease expiry and no double counting.

The trainer adds tasks (push payloads, DESIGN.md); workers lease them, heartbeat while the
agent runs, and report done or failed. Lifecycle (`TASK_TRANSITIONS`):

    queued -> leased -> done | failed
    leased -> queued     the lease expired (worker died): retried, up to max_attempts, then failed
    queued -> failed     no worker leased it in time (`fail_queued`, the trainer's queue timeout)

Every lease is a new attempt with a new trajectory id (`<task>.a<attempt>`, created at lease
time), written into the payload's metadata, so a dead worker's half-recorded turns never mix
with the retry's. When a lease expires, its trajectory is failed ("lease expired"), so the dead
worker, should it come back, can neither report the task (409, its lease is gone) nor complete
or reward its trajectory (409 "not in valid status"): each task yields at most one counted
trajectory. Expiry is applied lazily, on every queue operation, from wall-clock deadlines kept
in SQLite, so it survives restarts.
"""

from __future__ import annotations

import contextlib
import copy
import enum
import json
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from turnwise.runtime.store import TrajectoryStore, TransitionError, UnknownTrajectory
from turnwise.types import FailureKind, TrajectoryStatus


class TaskStatus(str, enum.Enum):
    QUEUED = "queued"
    LEASED = "leased"
    DONE = "done"
    FAILED = "failed"


TASK_TRANSITIONS: Mapping[TaskStatus, frozenset[TaskStatus]] = {
    TaskStatus.QUEUED: frozenset({TaskStatus.LEASED, TaskStatus.FAILED}),
    TaskStatus.LEASED: frozenset({TaskStatus.QUEUED, TaskStatus.DONE, TaskStatus.FAILED}),
    TaskStatus.DONE: frozenset(),
    TaskStatus.FAILED: frozenset(),
}


class LeaseLost(Exception):
    """The lease is not (or no longer) the task's current one (HTTP 409)."""


class UnknownTask(KeyError):
    """No task with this id in this job (HTTP 404)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown task"


@dataclass(frozen=True)
class Lease:
    """A task handed to a worker."""

    task_id: str
    lease_id: str
    """Proof of the lease: heartbeats and the report must send it."""
    trajectory_id: str
    """The trajectory this attempt records into (also in payload.metadata)."""
    attempt: int
    """1 for the first lease, 2 after one expiry, ..."""
    expires_at: float
    """Unix time; heartbeat before it."""
    payload: Mapping[str, Any]
    """The push payload, with this attempt's trajectory id."""


@dataclass(frozen=True)
class TaskState:
    """Where a task stands."""

    task_id: str
    status: TaskStatus
    attempt: int
    trajectory_id: str | None
    """The current (or final) attempt's trajectory."""
    worker_id: str | None
    error: str | None


class TaskQueue:
    """The task queue of one job, in the trajectory store's SQLite file."""

    def __init__(self, store: TrajectoryStore, *, max_attempts: int = 3,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.job_id = store.job_id
        self.max_attempts = max_attempts
        self.clock = clock

    def add(self, tasks: Sequence[tuple[str | None, Mapping[str, Any]]]) -> list[str]:
        """Queue (task id or None, payload) pairs; an id already queued is left as it is."""
        ids, now = [], self.clock()
        with self.store.transaction() as conn:
            for task_id, payload in tasks:
                task_id = task_id or uuid.uuid4().hex
                conn.execute("INSERT INTO tasks (job_id, id, payload, status, max_attempts, created_at) "
                             "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                             (self.job_id, task_id, json.dumps(payload), TaskStatus.QUEUED.value,
                              self.max_attempts, now))
                ids.append(task_id)
        return ids

    def lease(self, worker_id: str, max_tasks: int = 1, lease_seconds: float = 60.0) -> list[Lease]:
        """Up to `max_tasks` queued tasks, oldest first, leased to `worker_id`."""
        self._expire()
        now = self.clock()
        leases = []
        with self.store.transaction() as conn:
            rows = conn.execute("SELECT id, payload, attempt FROM tasks WHERE job_id=? AND status=? "
                                "ORDER BY created_at, id LIMIT ?",
                                (self.job_id, TaskStatus.QUEUED.value, max_tasks)).fetchall()
            for row in rows:
                attempt = row["attempt"] + 1
                payload = json.loads(row["payload"])
                named = (payload.get("metadata") or {}).get("trajectory_id") if attempt == 1 else None
                lease = Lease(task_id=row["id"], lease_id=uuid.uuid4().hex,
                              trajectory_id=str(named) if named else f"{row['id']}.a{attempt}", attempt=attempt,
                              expires_at=now + lease_seconds, payload=payload)
                conn.execute("UPDATE tasks SET status=?, attempt=?, lease_id=?, worker_id=?, lease_expires_at=?, "
                             "trajectory_id=? WHERE job_id=? AND id=?",
                             (TaskStatus.LEASED.value, attempt, lease.lease_id, worker_id, lease.expires_at,
                              lease.trajectory_id, self.job_id, lease.task_id))
                leases.append(lease)
        out = []
        for lease in leases:
            payload = copy.deepcopy(dict(lease.payload))
            meta = payload.get("metadata")
            if not isinstance(meta, dict):  # rows queued before POST /tasks validated payloads
                meta = payload["metadata"] = {}
            task_id = meta.get("task_id")  # the dispatcher's `Task.id` (`push_payload`), for the sampler
            # exists from the start: a failure is recorded even then
            self.store.begin(lease.trajectory_id, task_id=str(task_id) if isinstance(task_id, str | int) else None)
            params = payload.get("inference_params") or payload.get("inferenceParams")
            if isinstance(params, dict):  # the job's sampling for this rollout (runtime.sampling_overrides)
                self.store.expect_sampling(lease.trajectory_id, params)
            meta["trajectory_id"] = meta["rolloutId"] = lease.trajectory_id
            out.append(Lease(**{**lease.__dict__, "payload": payload}))
        return out

    def heartbeat(self, task_id: str, lease_id: str, lease_seconds: float = 60.0) -> float:
        """Extend a lease; returns the new deadline. Raises LeaseLost once it expired."""
        self._expire()
        expires = self.clock() + lease_seconds
        with self.store.transaction() as conn:
            self._current(conn, task_id, lease_id)
            conn.execute("UPDATE tasks SET lease_expires_at=? WHERE job_id=? AND id=?", (expires, self.job_id, task_id))
        return expires

    def report(self, task_id: str, lease_id: str, status: TaskStatus | str, error: str | None = None,
               failure: FailureKind | None = None) -> TaskState:
        """End a leased task as done or failed; repeating the same report is a no-op."""
        status = TaskStatus(status)
        if status not in (TaskStatus.DONE, TaskStatus.FAILED):
            raise ValueError(f"report status must be done or failed, not {status.value}")
        self._expire()
        with self.store.transaction() as conn:
            row = self._row(conn, task_id)
            if row["lease_id"] == lease_id and row["status"] == status.value:
                return self._state(row)  # a retried report
            self._current(conn, task_id, lease_id)
            conn.execute("UPDATE tasks SET status=?, error=?, lease_expires_at=NULL WHERE job_id=? AND id=?",
                         (status.value, error, self.job_id, task_id))
        if status == TaskStatus.FAILED:
            self._fail_trajectory(row["trajectory_id"], error or "worker reported the task failed",
                                  failure or FailureKind.AGENT_ERROR)
        else:
            self._fail_trajectory(row["trajectory_id"], "worker reported done without complete-rollout",
                                  FailureKind.AGENT_ERROR)
        return self.get(task_id)

    def fail_queued(self, task_ids: Sequence[str], error: str) -> list[str]:
        """Fail those of `task_ids` still queued (no worker leased them); their ids."""
        failed = []
        with self.store.transaction() as conn:
            for task_id in task_ids:
                cur = conn.execute("UPDATE tasks SET status=?, error=? WHERE job_id=? AND id=? AND status=?",
                                   (TaskStatus.FAILED.value, error, self.job_id, task_id, TaskStatus.QUEUED.value))
                if cur.rowcount:
                    failed.append(task_id)
        return failed

    def get(self, task_id: str) -> TaskState:
        self._expire()
        with self.store.transaction() as conn:
            return self._state(self._row(conn, task_id))

    def counts(self) -> dict[str, int]:
        self._expire()
        with self.store.transaction() as conn:
            rows = conn.execute("SELECT status, COUNT(*) AS n FROM tasks WHERE job_id=? GROUP BY status",
                                (self.job_id,)).fetchall()
        return {s.value: 0 for s in TaskStatus} | {r["status"]: r["n"] for r in rows}

    # -- internals --------------------------------------------------------------------------

    def _row(self, conn: Any, task_id: str) -> Any:
        row = conn.execute("SELECT * FROM tasks WHERE job_id=? AND id=?", (self.job_id, task_id)).fetchone()
        if row is None:
            raise UnknownTask(f"unknown task {task_id!r} in job {self.job_id!r}")
        return row

    def _current(self, conn: Any, task_id: str, lease_id: str) -> None:
        row = self._row(conn, task_id)
        if row["status"] != TaskStatus.LEASED.value or row["lease_id"] != lease_id:
            raise LeaseLost(f"lease {lease_id!r} of task {task_id!r} is not current (task is {row['status']}, "
                            f"attempt {row['attempt']}): not in valid status")

    @staticmethod
    def _state(row: Any) -> TaskState:
        return TaskState(task_id=row["id"], status=TaskStatus(row["status"]), attempt=row["attempt"],
                         trajectory_id=row["trajectory_id"], worker_id=row["worker_id"], error=row["error"])

    def _expire(self) -> None:
        now = self.clock()
        with self.store.transaction() as conn:
            rows = conn.execute("SELECT id, attempt, max_attempts, trajectory_id, worker_id FROM tasks "
                                "WHERE job_id=? AND status=? AND lease_expires_at < ?",
                                (self.job_id, TaskStatus.LEASED.value, now)).fetchall()
            for row in rows:
                final = row["attempt"] >= row["max_attempts"]
                conn.execute("UPDATE tasks SET status=?, lease_id=NULL, lease_expires_at=NULL, error=? "
                             "WHERE job_id=? AND id=?",
                             (TaskStatus.FAILED.value if final else TaskStatus.QUEUED.value,
                              f"lease of worker {row['worker_id']!r} expired (attempt {row['attempt']})",
                              self.job_id, row["id"]))
        for row in rows:
            self._fail_trajectory(row["trajectory_id"], f"lease expired (worker {row['worker_id']!r})",
                                  FailureKind.WORKER_LOST)

    def _fail_trajectory(self, trajectory_id: str | None, error: str, failure: FailureKind) -> None:
        if trajectory_id is None:
            return
        trajectory = self.store.get(trajectory_id, last_turn_only=True)
        if trajectory is not None and trajectory.status == TrajectoryStatus.IN_PROGRESS:
            with contextlib.suppress(TransitionError, UnknownTrajectory):  # completed meanwhile by its agent
                self.store.complete(trajectory_id, TrajectoryStatus.FAILED, error=error, failure=failure)
