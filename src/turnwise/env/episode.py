"""Per-rollout episode state: a private temp dir, deterministic ids and clock, a private
SQLite copy of a seed database, JSON/dict data (its own copy of a seed), and a hash of it all.

    async with Episode(seed=f"{task.id}:{rollout_index}", seed_db="orders.db") as ep:
        ep.db.execute("UPDATE orders SET status = 'refunded' WHERE id = ?", (order_id,))
        refund_id = ep.ids.new("rf")          # same seed -> same ids, in every run
        ...
        final_hash = ep.state_hash()          # compare with the hash after replaying gold actions

Isolation: each episode copies the seed database into its own directory (a reflink where the
filesystem supports it, else a kernel-side `copy_file_range`), or into memory with
`in_memory=True` through SQLite's backup API. The connection runs in autocommit with
`synchronous=OFF` and an in-memory journal: an episode is thrown away, so durability buys
nothing. `data=` seeds `ep.data` for JSON state: a mapping is deep-copied, a `SeedData` is
shared copy-on-write (`turnwise.env.data`); either way no episode sees another's writes. The directory is removed when the context exits, on success or failure (and by a
finalizer if an episode is dropped without closing).

`state_hash()` is the SHA-256 of `state_snapshot()` in canonical JSON: every database object's
SQL, every table's rows (each as the Python repr of its tuple: exact for text, integers, floats,
blobs and NULL) sorted, so insertion order does not matter but values do, `data`, and the
SHA-256 of each file in the directory except the database itself. `diff()` lists where two
episodes differ. Hashing a large state takes tens of milliseconds: in async code use
`await ep.state_hash_async()`, which hashes in the shared thread pool (`turnwise.env.offload`).
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import hashlib
import os
import random
import shutil
import sqlite3
import tempfile
import weakref
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import pydantic_core

from turnwise.env.data import SeedData, copy_json, data_canonical
from turnwise.env.offload import run_blocking
from turnwise.types import json_dumps_canonical

_FICLONE = 0x40049409  # ioctl: share the source's extents (btrfs, XFS, bcachefs)
_DB_NAME = "episode.sqlite3"


class IdGenerator:
    """Deterministic ids: `new("ord")` -> "ord_" + hex of SHA-256(seed, prefix, n-th call for that prefix)."""

    def __init__(self, seed: int | str):
        self.seed = str(seed)
        self._counts: dict[str, int] = {}

    def new(self, prefix: str = "id", length: int = 12) -> str:
        n = self._counts.get(prefix, 0)
        self._counts[prefix] = n + 1
        digest = hashlib.sha256(f"{self.seed}\x00{prefix}\x00{n}".encode()).hexdigest()
        return f"{prefix}_{digest[:length]}"

    def uuid(self) -> str:
        """A UUID-shaped id (version nibble 4), deterministic like `new`."""
        h = self.new("uuid", 32)[5:]
        return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{h[16:20]}-{h[20:32]}"


class Episode:
    """The state of one rollout (see the module docstring)."""

    def __init__(self, seed: int | str = 0, *, seed_db: str | os.PathLike[str] | None = None,
                 data: Mapping[str, Any] | SeedData | None = None,
                 root: str | os.PathLike[str] | None = None, in_memory: bool = False,
                 clock_start: dt.datetime = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc),
                 clock_step: dt.timedelta = dt.timedelta(seconds=1)):
        self.seed = seed
        self.ids = IdGenerator(seed)
        """Deterministic id generator."""
        self.rng = random.Random(hashlib.sha256(f"rng\x00{seed}".encode()).digest())
        """Seeded random generator for simulated randomness."""
        if data is not None and not isinstance(data, SeedData | Mapping):
            raise TypeError(f"Episode data must be a mapping or a SeedData, got {type(data).__name__}")
        self.data: dict[str, Any] = (data.fresh() if isinstance(data, SeedData)
                                     else copy_json(dict(data)) if data is not None else {})
        """JSON-able state (a copy of `data=`; carts, sessions, a benchmark's database); part of the state hash."""
        self.dir = Path(tempfile.mkdtemp(prefix="turnwise-ep-", dir=root))
        """Private working directory, removed on close."""
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.dir, ignore_errors=True)
        self._clock = clock_start
        self._clock_step = clock_step
        self._db: sqlite3.Connection | None = None
        try:
            if seed_db is not None:
                self._db = _open_copy(Path(seed_db), self.dir / _DB_NAME, in_memory)
        except BaseException:
            self._cleanup()
            raise

    @property
    def db(self) -> sqlite3.Connection:
        """This episode's private SQLite connection (autocommit). An episode without a seed
        database gets an empty in-memory one on first use."""
        if self._db is None:
            if self.closed:
                raise RuntimeError("episode is closed")
            self._db = _configure(sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False))
        return self._db

    @property
    def closed(self) -> bool:
        return not self._cleanup.alive

    def now(self) -> dt.datetime:
        """Deterministic clock: `clock_start`, then one `clock_step` later on each call."""
        t = self._clock
        self._clock += self._clock_step
        return t

    def state_snapshot(self) -> dict[str, Any]:
        """Everything the state hash covers, as canonical-JSON-able values."""
        return {"db": self._db_snapshot(), "data": pydantic_core.to_jsonable_python(self.data),
                "files": self._file_hashes()}

    def _db_snapshot(self) -> dict[str, Any] | None:
        return _db_snapshot(self._db) if self._db is not None else None

    def _file_hashes(self) -> dict[str, str]:
        files = {}
        for p in sorted(self.dir.rglob("*")):
            if p.is_file() and not p.name.startswith(_DB_NAME):
                files[p.relative_to(self.dir).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
        return files

    def state_hash(self) -> str:
        """SHA-256 (hex) of `state_snapshot()` in canonical JSON (built without the snapshot, so
        the seed's records not touched are not serialized again)."""
        text = (f'{{"data":{data_canonical(self.data)},"db":{json_dumps_canonical(self._db_snapshot())},'
                f'"files":{json_dumps_canonical(self._file_hashes())}}}')
        return hashlib.sha256(text.encode()).hexdigest()

    async def state_hash_async(self) -> str:
        """`state_hash()` in the shared thread pool, off the event loop."""
        return await run_blocking(self.state_hash)

    async def state_snapshot_async(self) -> dict[str, Any]:
        """`state_snapshot()` in the shared thread pool, off the event loop."""
        return await run_blocking(self.state_snapshot)

    def diff(self, other: Episode) -> list[str]:
        """Where two episodes' states differ (tables, rows, data keys, files): for debugging a
        failed state match or a verify run."""
        a, b = self.state_snapshot(), other.state_snapshot()
        out = []
        ta, tb = (a["db"] or {}).get("tables", {}), (b["db"] or {}).get("tables", {})
        for name in sorted(set(ta) | set(tb)):
            ra, rb = set(ta.get(name, {}).get("rows", ())), set(tb.get(name, {}).get("rows", ()))
            out += [f"{name}: only in self: {r}" for r in sorted(ra - rb)]
            out += [f"{name}: only in other: {r}" for r in sorted(rb - ra)]
        for key in ("data", "files"):
            for k in sorted(set(a[key]) | set(b[key])):
                if a[key].get(k) != b[key].get(k):
                    out.append(f"{key}.{k}: {a[key].get(k)!r} != {b[key].get(k)!r}")
        if (a["db"] or {}).get("schema") != (b["db"] or {}).get("schema"):
            out.append("database schema differs")
        return out

    def close(self) -> None:
        """Close the connection and remove the directory; safe to call twice."""
        if self._db is not None:
            self._db.close()
            self._db = None
        self._cleanup()

    def __enter__(self) -> Episode:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    async def __aenter__(self) -> Episode:
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.close()


def fast_copy(src: Path, dst: Path) -> str:
    """Copy a file, cheapest way first; returns "reflink", "copy_file_range" or "copy"."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        try:
            fcntl.ioctl(fout.fileno(), _FICLONE, fin.fileno())
            return "reflink"
        except OSError:
            pass
        try:
            size = os.fstat(fin.fileno()).st_size
            while size > 0:
                n = os.copy_file_range(fin.fileno(), fout.fileno(), size)
                if n == 0:
                    break
                size -= n
            return "copy_file_range"
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
    shutil.copyfile(src, dst)
    return "copy"


def _open_copy(seed_db: Path, dst: Path, in_memory: bool) -> sqlite3.Connection:
    if not seed_db.is_file():
        raise FileNotFoundError(f"seed database not found: {seed_db}")
    if in_memory:
        conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        src = sqlite3.connect(f"file:{seed_db}?mode=ro", uri=True)
        try:
            src.backup(conn)
        finally:
            src.close()
        return _configure(conn)
    fast_copy(seed_db, dst)
    return _configure(sqlite3.connect(dst, isolation_level=None, check_same_thread=False))


def _configure(conn: sqlite3.Connection) -> sqlite3.Connection:
    conn.execute("PRAGMA journal_mode=MEMORY")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def _db_snapshot(conn: sqlite3.Connection) -> dict[str, Any]:
    objects = conn.execute(
        "SELECT type, name, sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY type, name").fetchall()
    tables = {}
    for kind, name, _ in objects:
        if kind != "table" or name.startswith("sqlite_stat"):
            continue
        cur = conn.execute(f'SELECT * FROM "{name.replace(chr(34), chr(34) * 2)}"')
        columns = [d[0] for d in cur.description]
        # repr of a row tuple (str, int, float, bytes, None) is exact and ~10x faster than JSON
        rows = sorted(map(repr, cur))
        tables[name] = {"columns": columns, "rows": rows}
    return {"schema": [list(o) for o in objects], "tables": tables}
