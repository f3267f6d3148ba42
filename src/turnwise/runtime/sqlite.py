"""The trajectory store's SQLite file: its schema (with in-place migrations of older files), the
shared connection, and how token ids, logprobs and turns are packed into rows."""

from __future__ import annotations

import json
import sqlite3
import threading
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from turnwise.types import FinishReason, Message, Turn, as_messages

_SCHEMA = """
CREATE TABLE IF NOT EXISTS trajectories (
    job_id TEXT NOT NULL,
    id TEXT NOT NULL,
    status TEXT NOT NULL,
    tools TEXT NOT NULL,
    error TEXT,
    failure TEXT,
    task_id TEXT,
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
    started_at REAL NOT NULL DEFAULT 0,
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
        started_at=row["started_at"], ended_at=row["created_at"],
    )


class _Db:
    """One SQLite connection shared by the stores of every job in a file."""

    def __init__(self, path: str | Path, synchronous: str) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.lock = threading.RLock()
        self.sampling: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
        """The job's sampling parameters per trajectory (`expect_sampling`); in memory, bounded."""
        self.conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30.0)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute(f"PRAGMA synchronous={synchronous}")
        self.conn.execute("PRAGMA busy_timeout=30000")
        with self.lock:
            self.conn.executescript(_SCHEMA)
            columns = {r["name"] for r in self.conn.execute("PRAGMA table_info(trajectories)")}
            if "failure" not in columns:  # a store written before failures were typed
                self.conn.execute("ALTER TABLE trajectories ADD COLUMN failure TEXT")
            if "task_id" not in columns:  # a store written before trajectories knew their task
                self.conn.execute("ALTER TABLE trajectories ADD COLUMN task_id TEXT")
            turn_columns = {r["name"] for r in self.conn.execute("PRAGMA table_info(turns)")}
            if "prompt_plan" not in turn_columns:  # a store written before turns recorded their prompt plan
                self.conn.execute("ALTER TABLE turns ADD COLUMN prompt_plan TEXT NOT NULL DEFAULT ''")
            if "started_at" not in turn_columns:  # a store written before turns recorded when they began
                self.conn.execute("ALTER TABLE turns ADD COLUMN started_at REAL NOT NULL DEFAULT 0")
