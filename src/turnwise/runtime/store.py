"""Durable trajectory store: SQLite in WAL mode, rows keyed by job id.

Every write is one transaction, committed before the HTTP response that reports it, so a
`kill -9` of the server loses nothing it has acknowledged (WAL with synchronous=NORMAL survives
process crashes; pass synchronous="FULL" to survive power loss too). One connection per store
file, guarded by a lock, so a store is safe to share between threads (the server's event loop,
the trainer). Several processes may open the same file; SQLite's locking orders their writes.

Lifecycle (`TRAJECTORY_TRANSITIONS`): in_progress -> ready | failed; ready -> rewarded, or
failed when its reward is rejected or never came (`fail`, the trainer's or the runtime's verdict);
any -> abandoned when a resumed run drops the step that was cut short (`abandon_after`).
A `ClientToken` makes `complete` and `set_rewards` idempotent: repeating a call with the token
that already took effect is a no-op success.
"""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from turnwise.runtime.sqlite import _Db, _floats_blob, _ids_blob, _turn
from turnwise.types import (
    TRAJECTORY_TRANSITIONS,
    FailureKind,
    FinishReason,
    Trajectory,
    TrajectoryStatus,
    Turn,
)


class TransitionError(Exception):
    """A lifecycle move that `TRAJECTORY_TRANSITIONS` does not allow (HTTP 409)."""


class UnknownTrajectory(KeyError):
    """No trajectory with this id in this job (HTTP 404)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown trajectory"


class ClientTokenConflict(Exception):
    """A ClientToken reused for a different request (HTTP 409)."""


@dataclass(frozen=True)
class Usage:
    """Tokens metered for one trajectory or one job."""

    prefill_tokens: int = 0
    """Prompt tokens the sampler computed (excluding reused prefix KV)."""
    sample_tokens: int = 0
    """Tokens sampled."""
    reused_prompt_tokens: int = 0
    """Prompt tokens taken from the stored conversation instead of re-tokenized."""
    turns: int = 0
    """Sampled turns."""


@dataclass(frozen=True)
class JobStats:
    """Counts and usage of one job."""

    job_id: str
    trajectories_by_status: Mapping[str, int]
    usage: Usage


_SAMPLING_ENTRIES = 1 << 16  # rollouts in flight at once, with a wide margin


class TrajectoryStore:
    """The trajectories of one job, in a SQLite file that may hold several jobs."""

    def __init__(self, path: str | Path, job_id: str, *, synchronous: str = "NORMAL") -> None:
        if synchronous.upper() not in ("NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"synchronous must be NORMAL, FULL or EXTRA, not {synchronous!r}")
        self._db = _Db(path, synchronous.upper())
        self.job_id = job_id
        self._next_id: int | None = None

    @property
    def path(self) -> Path:
        return self._db.path

    def for_job(self, job_id: str) -> TrajectoryStore:
        """The store of another job in the same file (same connection)."""
        if job_id == self.job_id:
            return self
        other = object.__new__(TrajectoryStore)
        other._db = self._db
        other.job_id = job_id
        return other

    def close(self) -> None:
        with self._db.lock:
            self._db.conn.close()

    def transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """A write transaction on the store's file (for other tables of the runtime: the task queue)."""
        return self._tx()

    @contextmanager
    def _tx(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        conn = self._db.conn
        with self._db.lock:
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _status(self, conn: sqlite3.Connection, trajectory_id: str) -> sqlite3.Row:
        row = conn.execute("SELECT status, complete_token, n_turns FROM trajectories WHERE job_id=? AND id=?",
                           (self.job_id, trajectory_id)).fetchone()
        if row is None:
            raise UnknownTrajectory(f"unknown trajectory {trajectory_id!r} in job {self.job_id!r}")
        return row

    # -- writes --------------------------------------------------------------------------

    def expect_sampling(self, trajectory_id: str, params: Mapping[str, Any]) -> None:
        """Record the sampling parameters the trainer chose for this rollout (temperature, top_p,
        max_tokens), which the runtime applies against the request's (`runtime.sampling_overrides`)."""
        def valid(k: str, v: Any) -> bool:
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                return False
            return v >= 0 if k == "temperature" else 0 < v <= 1 if k == "top_p" else isinstance(v, int) and v >= 1

        keep = {k: params[k] for k in ("temperature", "top_p", "max_tokens") if valid(k, params.get(k))}
        with self._db.lock:
            self._db.sampling[(self.job_id, trajectory_id)] = keep
            self._db.sampling.move_to_end((self.job_id, trajectory_id))
            while len(self._db.sampling) > _SAMPLING_ENTRIES:
                self._db.sampling.popitem(last=False)

    def expected_sampling(self, trajectory_id: str) -> dict[str, Any] | None:
        """What `expect_sampling` recorded for this trajectory, if anything."""
        with self._db.lock:
            return self._db.sampling.get((self.job_id, trajectory_id))

    def new_trajectory_id(self, prefix: str = "traj") -> str:
        """A trajectory id not used in this job: `<prefix>-<n>`, n counting up from the number of
        trajectories already stored. Deterministic, so two runs that dispatch in the same order get
        the same ids and so the same derived sampling seeds (see `runtime.service`)."""
        with self._db.lock:
            if getattr(self, "_next_id", None) is None:
                self._next_id = self._db.conn.execute("SELECT COUNT(*) FROM trajectories WHERE job_id=?",
                                                      (self.job_id,)).fetchone()[0]
            while True:
                candidate = f"{prefix}-{self._next_id:06d}"
                self._next_id += 1
                if self._db.conn.execute("SELECT 1 FROM trajectories WHERE job_id=? AND id=?",
                                         (self.job_id, candidate)).fetchone() is None:
                    return candidate

    def begin(self, trajectory_id: str, tools: Sequence[Mapping[str, Any]] | None = (), *,
              task_id: str | None = None) -> None:
        """Create the trajectory IN_PROGRESS if new; tools are set until its first turn is recorded.
        `task_id` (the dispatcher's `Task.id`) is kept once set: the runtime's own `begin` on the
        first model call, which knows no task, cannot erase it."""
        now = time.time()
        tools_json = json.dumps(list(tools or ()))
        with self._db.lock:  # one statement: atomic on its own
            self._db.conn.execute(
                "INSERT INTO trajectories (job_id, id, status, tools, task_id, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (job_id, id) DO UPDATE SET "
                "tools=CASE WHEN n_turns=0 AND status=? AND excluded.tools != '[]' "
                "THEN excluded.tools ELSE tools END, task_id=COALESCE(task_id, excluded.task_id)",
                (self.job_id, trajectory_id, TrajectoryStatus.IN_PROGRESS.value, tools_json, task_id,
                 now, now, TrajectoryStatus.IN_PROGRESS.value))

    def append_turn(self, trajectory_id: str, turn: Turn, *, prefill_tokens: int | None = None) -> Turn:
        """Record a turn at the next position (its `index` is set here); returns the stored turn.

        `prefill_tokens`: prompt tokens the sampler computed (default: the unreused ones).
        """
        if len(turn.logprobs) != len(turn.completion_ids):
            raise ValueError(f"{len(turn.logprobs)} logprobs for {len(turn.completion_ids)} completion tokens")
        if prefill_tokens is None:
            prefill_tokens = len(turn.prompt_ids) - turn.reused_prompt_tokens
        now = time.time()
        with self._tx() as conn:
            counted = conn.execute(
                "UPDATE trajectories SET n_turns=n_turns+1, prefill_tokens=prefill_tokens+?, "
                "sample_tokens=sample_tokens+?, reused_tokens=reused_tokens+?, updated_at=? "
                "WHERE job_id=? AND id=? AND status=? RETURNING n_turns",
                (prefill_tokens, len(turn.completion_ids), turn.reused_prompt_tokens, now,
                 self.job_id, trajectory_id, TrajectoryStatus.IN_PROGRESS.value)).fetchone()
            if counted is None:
                row = self._status(conn, trajectory_id)  # raises UnknownTrajectory
                raise TransitionError(f"trajectory {trajectory_id!r} is {row['status']}: not in valid status "
                                      f"for a new turn (needs in_progress)")
            turn = replace(turn, index=counted[0] - 1, ended_at=now)
            conn.execute(
                "INSERT INTO turns VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (self.job_id, trajectory_id, turn.index, _ids_blob(turn.prompt_ids),
                 _ids_blob(turn.completion_ids), _floats_blob(turn.logprobs), turn.version,
                 FinishReason(turn.finish_reason).value, json.dumps(turn.message.to_openai()),
                 int(turn.tool_parse_error), turn.reused_prompt_tokens,
                 json.dumps([m.to_openai() for m in turn.request_messages]), prefill_tokens, now,
                 turn.prompt_plan, turn.started_at))
        return turn

    def complete(self, trajectory_id: str, status: TrajectoryStatus | str, *, error: str | None = None,
                 client_token: str | None = None,
                 failure: FailureKind | None = None) -> None:
        """Seal an in-progress trajectory as READY or FAILED (the agent's report; `failure`
        defaults to AGENT_ERROR for FAILED)."""
        status = TrajectoryStatus(status)
        if status not in (TrajectoryStatus.READY, TrajectoryStatus.FAILED):
            raise ValueError(f"complete takes ready or failed, not {status.value}")
        with self._tx() as conn:
            row = self._status(conn, trajectory_id)
            current = TrajectoryStatus(row["status"])
            if client_token is not None and row["complete_token"] == client_token:
                done_as = TrajectoryStatus.READY if current == TrajectoryStatus.REWARDED else current
                if done_as != status:
                    raise ClientTokenConflict(f"ClientToken {client_token!r} already completed trajectory "
                                              f"{trajectory_id!r} as {done_as.value}, not {status.value}")
                return
            if current != TrajectoryStatus.IN_PROGRESS:
                raise TransitionError(f"trajectory {trajectory_id!r} is {current.value}: not in valid status "
                                      f"to complete as {status.value} (needs in_progress)")
            if status == TrajectoryStatus.FAILED:
                failure = failure or FailureKind.AGENT_ERROR
            conn.execute("UPDATE trajectories SET status=?, error=?, failure=?, complete_token=?, updated_at=? "
                         "WHERE job_id=? AND id=?",
                         (status.value, error, failure.value if failure else None, client_token, time.time(),
                          self.job_id, trajectory_id))

    def abandon_after(self, timestamp: float) -> int:
        """Mark ABANDONED every trajectory of the job begun after `timestamp`, and every one still
        open (in progress or ready): the rollouts of a step a resumed run will sample again.
        Queued and leased pull tasks fail with them. Returns how many trajectories."""
        open_ = (TrajectoryStatus.IN_PROGRESS.value, TrajectoryStatus.READY.value)
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE trajectories SET status=?, failure=?, error=COALESCE(error, ?), updated_at=? "
                "WHERE job_id=? AND status!=? AND (created_at > ? OR status IN (?, ?))",
                (TrajectoryStatus.ABANDONED.value, FailureKind.ABANDONED.value, "the trainer stopped during its step",
                 time.time(), self.job_id, TrajectoryStatus.ABANDONED.value, timestamp, *open_))
            conn.execute("UPDATE tasks SET status='failed', error='abandoned: the trainer stopped', "
                         "lease_expires_at=NULL WHERE job_id=? AND status IN ('queued', 'leased')", (self.job_id,))
            return cur.rowcount

    def fail(self, trajectory_id: str, failure: FailureKind, error: str) -> bool:
        """The trainer's verdict: an IN_PROGRESS or READY (never rewarded) trajectory becomes FAILED
        with `failure`. False when it had already ended (its agent finished meanwhile)."""
        with self._tx() as conn:
            current = TrajectoryStatus(self._status(conn, trajectory_id)["status"])
            if TrajectoryStatus.FAILED not in TRAJECTORY_TRANSITIONS[current]:
                return False
            conn.execute("UPDATE trajectories SET status=?, error=?, failure=?, updated_at=? WHERE job_id=? AND id=?",
                         (TrajectoryStatus.FAILED.value, error, failure.value, time.time(), self.job_id,
                          trajectory_id))
            return True

    def set_rewards(self, trajectory_id: str, rewards: Sequence[float] | float, *,
                    client_token: str | None = None) -> None:
        """Reward a READY trajectory (one value, or one per turn); it becomes REWARDED.

        A FAILED trajectory may take one reward too and stays FAILED (compatibility, see below).
        """
        values = (float(rewards),) if isinstance(rewards, int | float) else tuple(float(r) for r in rewards)
        if not values or not all(math.isfinite(v) for v in values):
            raise ValueError("rewards must be one or more finite numbers")
        with self._tx() as conn:
            row = self._status(conn, trajectory_id)
            current = TrajectoryStatus(row["status"])
            prior = conn.execute("SELECT rewards, client_token FROM rewards WHERE job_id=? AND trajectory_id=?",
                                 (self.job_id, trajectory_id)).fetchone()
            if prior is not None and client_token is not None and prior["client_token"] == client_token:
                if tuple(json.loads(prior["rewards"])) != values:
                    raise ClientTokenConflict(f"ClientToken {client_token!r} already rewarded trajectory "
                                              f"{trajectory_id!r} with other values")
                return
            # A failed trajectory keeps its status but may carry a reward: the managed agent SDK's
            # report_error sends complete-rollout(failed) and then update-reward(0.0).
            failed_unrewarded = current == TrajectoryStatus.FAILED and prior is None
            if TrajectoryStatus.REWARDED not in TRAJECTORY_TRANSITIONS[current] and not failed_unrewarded:
                raise TransitionError(f"trajectory {trajectory_id!r} is {current.value}: not in valid status "
                                      f"for update-reward (needs ready, after complete-rollout)")
            n_turns = row["n_turns"]
            if len(values) != 1 and len(values) != n_turns:
                raise ValueError(f"got {len(values)} rewards for a trajectory of {n_turns} turns: "
                                 f"send one value or one per turn")
            now = time.time()
            conn.execute("INSERT INTO rewards VALUES (?, ?, ?, ?, ?)",
                         (self.job_id, trajectory_id, json.dumps(values), client_token, now))
            new_status = current if failed_unrewarded else TrajectoryStatus.REWARDED
            conn.execute("UPDATE trajectories SET status=?, updated_at=? WHERE job_id=? AND id=?",
                         (new_status.value, now, self.job_id, trajectory_id))

    # -- reads ---------------------------------------------------------------------------

    def get(self, trajectory_id: str, *, last_turn_only: bool = False) -> Trajectory | None:
        """The trajectory, or None. `last_turn_only`: `turns` holds just the last turn (cheap;
        enough to plan the next prompt)."""
        conn = self._db.conn
        with self._db.lock:
            row = conn.execute("SELECT * FROM trajectories WHERE job_id=? AND id=?",
                               (self.job_id, trajectory_id)).fetchone()
            if row is None:
                return None
            if last_turn_only:  # the primary key finds it: no scan, no sort
                turn_rows = conn.execute("SELECT * FROM turns WHERE job_id=? AND trajectory_id=? AND idx=?",
                                         (self.job_id, trajectory_id, row["n_turns"] - 1)).fetchall()
            else:
                turn_rows = conn.execute("SELECT * FROM turns WHERE job_id=? AND trajectory_id=? ORDER BY idx",
                                         (self.job_id, trajectory_id)).fetchall()
            reward = None
            if row["status"] in (TrajectoryStatus.REWARDED.value, TrajectoryStatus.FAILED.value):
                reward = conn.execute("SELECT rewards FROM rewards WHERE job_id=? AND trajectory_id=?",
                                      (self.job_id, trajectory_id)).fetchone()
        return self._trajectory(row, [_turn(r) for r in turn_rows], reward)

    def _trajectory(self, row: sqlite3.Row, turns: Sequence[Turn], reward: sqlite3.Row | None) -> Trajectory:
        return Trajectory(id=row["id"], job_id=self.job_id, status=TrajectoryStatus(row["status"]),
                          turns=tuple(turns), rewards=tuple(json.loads(reward["rewards"])) if reward else (),
                          tools=tuple(json.loads(row["tools"])), error=row["error"],
                          failure=FailureKind(row["failure"]) if row["failure"] else None,
                          task_id=row["task_id"])

    def list(self, status: TrajectoryStatus | str | None = None) -> list[Trajectory]:
        """Every trajectory of the job (optionally only those in one status), oldest first."""
        where, args = "job_id=?", [self.job_id]
        if status is not None:
            where += " AND status=?"
            args.append(TrajectoryStatus(status).value)
        with self._tx(write=False) as conn:
            rows = conn.execute(f"SELECT * FROM trajectories WHERE {where} ORDER BY created_at, id", args).fetchall()
            ids = {r["id"] for r in rows}
            turns: dict[str, list[Turn]] = {i: [] for i in ids}
            for r in conn.execute("SELECT * FROM turns WHERE job_id=? ORDER BY trajectory_id, idx", (self.job_id,)):
                if r["trajectory_id"] in ids:
                    turns[r["trajectory_id"]].append(_turn(r))
            rewards = {r["trajectory_id"]: r for r in
                       conn.execute("SELECT trajectory_id, rewards FROM rewards WHERE job_id=?", (self.job_id,))}
        return [self._trajectory(r, turns[r["id"]], rewards.get(r["id"])) for r in rows]

    def usage(self, trajectory_id: str) -> Usage:
        """Tokens metered for one trajectory."""
        with self._tx(write=False) as conn:
            row = conn.execute("SELECT prefill_tokens, sample_tokens, reused_tokens, n_turns FROM trajectories "
                               "WHERE job_id=? AND id=?", (self.job_id, trajectory_id)).fetchone()
        if row is None:
            raise UnknownTrajectory(f"unknown trajectory {trajectory_id!r} in job {self.job_id!r}")
        return Usage(row["prefill_tokens"], row["sample_tokens"], row["reused_tokens"], row["n_turns"])

    def stats(self) -> JobStats:
        """Trajectory counts by status and token usage of the whole job."""
        with self._tx(write=False) as conn:
            rows = conn.execute(
                "SELECT status, COUNT(*) AS n, SUM(prefill_tokens) AS p, SUM(sample_tokens) AS s, "
                "SUM(reused_tokens) AS r, SUM(n_turns) AS t FROM trajectories WHERE job_id=? GROUP BY status",
                (self.job_id,)).fetchall()
        by_status = {s.value: 0 for s in TrajectoryStatus}
        p = s = r = t = 0
        for row in rows:
            by_status[row["status"]] = row["n"]
            p, s, r, t = p + row["p"], s + row["s"], r + row["r"], t + row["t"]
        return JobStats(self.job_id, by_status, Usage(p, s, r, t))
