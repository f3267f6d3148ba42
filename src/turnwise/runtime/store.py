"""Durable trajectory store: SQLite in WAL mode, rows keyed by job id.

Every write is one transaction, committed before the HTTP response that reports it, so a
`kill -9` of the server loses nothing it has acknowledged (WAL with synchronous=NORMAL survives
process crashes; pass synchronous="FULL" to survive power loss too). One connection per store
file, guarded by a lock, so a store is safe to share between threads (the server's event loop,
the trainer). Several processes may open the same file; SQLite's locking orders their writes.

Lifecycle (`TRAJECTORY_TRANSITIONS`): in_progress -> ready | failed; ready -> rewarded.
A `ClientToken` makes `complete` and `set_rewards` idempotent: repeating a call with the token
that already took effect is a no-op success.
"""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
import threading
import time
from array import array
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from turnwise.types import (
    TRAJECTORY_TRANSITIONS,
    FinishReason,
    Message,
    Trajectory,
    TrajectoryStatus,
    Turn,
    as_messages,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS trajectories (
    job_id TEXT NOT NULL,
    id TEXT NOT NULL,
    status TEXT NOT NULL,
    tools TEXT NOT NULL,
    error TEXT,
    complete_token TEXT,
    n_turns INTEGER NOT NULL DEFAULT 0,
    prefill_tokens INTEGER NOT NULL DEFAULT 0,
    sample_tokens INTEGER NOT NULL DEFAULT 0,
    reused_tokens INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (job_id, id)
);
CREATE INDEX IF NOT EXISTS trajectories_by_status ON trajectories (job_id, status);
CREATE TABLE IF NOT EXISTS turns (
    job_id TEXT NOT NULL,
    trajectory_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    prompt_ids BLOB NOT NULL,
    completion_ids BLOB NOT NULL,
    logprobs BLOB NOT NULL,
    version INTEGER NOT NULL,
    finish_reason TEXT NOT NULL,
    message TEXT NOT NULL,
    tool_parse_error INTEGER NOT NULL,
    reused_prompt_tokens INTEGER NOT NULL,
    request_messages TEXT NOT NULL,
    prefill_tokens INTEGER NOT NULL,
    created_at REAL NOT NULL,
    prompt_plan TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (job_id, trajectory_id, idx)
);
CREATE TABLE IF NOT EXISTS tasks (
    job_id TEXT NOT NULL,
    id TEXT NOT NULL,
    payload TEXT NOT NULL,
    status TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    lease_id TEXT,
    worker_id TEXT,
    lease_expires_at REAL,
    trajectory_id TEXT,
    error TEXT,
    created_at REAL NOT NULL,
    PRIMARY KEY (job_id, id)
);
CREATE INDEX IF NOT EXISTS tasks_by_status ON tasks (job_id, status, created_at);
CREATE TABLE IF NOT EXISTS rewards (
    job_id TEXT NOT NULL,
    trajectory_id TEXT NOT NULL,
    rewards TEXT NOT NULL,
    client_token TEXT,
    created_at REAL NOT NULL,
    PRIMARY KEY (job_id, trajectory_id)
);
"""


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


def _ids_blob(ids: Sequence[int]) -> bytes:
    return array("i", ids).tobytes()


def _ids(blob: bytes) -> tuple[int, ...]:
    out = array("i")
    out.frombytes(blob)
    return tuple(out)


def _floats_blob(values: Sequence[float]) -> bytes:
    return array("d", values).tobytes()


def _floats(blob: bytes) -> tuple[float, ...]:
    out = array("d")
    out.frombytes(blob)
    return tuple(out)


def _message(text: str) -> Message:
    return as_messages([json.loads(text)])[0]


def _turn(row: sqlite3.Row) -> Turn:
    return Turn(
        index=row["idx"], prompt_ids=_ids(row["prompt_ids"]), completion_ids=_ids(row["completion_ids"]),
        logprobs=_floats(row["logprobs"]), version=row["version"],
        finish_reason=FinishReason(row["finish_reason"]), message=_message(row["message"]),
        tool_parse_error=bool(row["tool_parse_error"]), reused_prompt_tokens=row["reused_prompt_tokens"],
        request_messages=as_messages(json.loads(row["request_messages"])), prompt_plan=row["prompt_plan"],
    )


class _Db:
    """One SQLite connection shared by the stores of every job in a file."""

    def __init__(self, path: str | Path, synchronous: str) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.lock = threading.RLock()
        self.conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30.0)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute(f"PRAGMA synchronous={synchronous}")
        self.conn.execute("PRAGMA busy_timeout=30000")
        with self.lock:
            self.conn.executescript(_SCHEMA)
            columns = {r["name"] for r in self.conn.execute("PRAGMA table_info(turns)")}
            if "prompt_plan" not in columns:  # a store written before turns recorded their prompt plan
                self.conn.execute("ALTER TABLE turns ADD COLUMN prompt_plan TEXT NOT NULL DEFAULT ''")


class TrajectoryStore:
    """The trajectories of one job, in a SQLite file that may hold several jobs."""

    def __init__(self, path: str | Path, job_id: str, *, synchronous: str = "NORMAL") -> None:
        if synchronous.upper() not in ("NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"synchronous must be NORMAL, FULL or EXTRA, not {synchronous!r}")
        self._db = _Db(path, synchronous.upper())
        self.job_id = job_id

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

    def begin(self, trajectory_id: str, tools: Sequence[Mapping[str, Any]] | None = ()) -> None:
        """Create the trajectory IN_PROGRESS if new; tools are set until its first turn is recorded."""
        now = time.time()
        tools_json = json.dumps(list(tools or ()))
        with self._db.lock:  # one statement: atomic on its own
            self._db.conn.execute(
                "INSERT INTO trajectories (job_id, id, status, tools, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (job_id, id) DO UPDATE SET tools=excluded.tools "
                "WHERE n_turns=0 AND status=? AND excluded.tools != '[]'",
                (self.job_id, trajectory_id, TrajectoryStatus.IN_PROGRESS.value, tools_json, now, now,
                 TrajectoryStatus.IN_PROGRESS.value))

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
            turn = replace(turn, index=counted[0] - 1)
            conn.execute(
                "INSERT INTO turns VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (self.job_id, trajectory_id, turn.index, _ids_blob(turn.prompt_ids),
                 _ids_blob(turn.completion_ids), _floats_blob(turn.logprobs), turn.version,
                 FinishReason(turn.finish_reason).value, json.dumps(turn.message.to_openai()),
                 int(turn.tool_parse_error), turn.reused_prompt_tokens,
                 json.dumps([m.to_openai() for m in turn.request_messages]), prefill_tokens, now,
                 turn.prompt_plan))
        return turn

    def complete(self, trajectory_id: str, status: TrajectoryStatus | str, *, error: str | None = None,
                 client_token: str | None = None) -> None:
        """Seal an in-progress trajectory as READY or FAILED."""
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
            if status not in TRAJECTORY_TRANSITIONS[current]:
                raise TransitionError(f"trajectory {trajectory_id!r} is {current.value}: not in valid status "
                                      f"to complete as {status.value} (needs in_progress)")
            conn.execute("UPDATE trajectories SET status=?, error=?, complete_token=?, updated_at=? "
                         "WHERE job_id=? AND id=?",
                         (status.value, error, client_token, time.time(), self.job_id, trajectory_id))

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
                          tools=tuple(json.loads(row["tools"])), error=row["error"])

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
