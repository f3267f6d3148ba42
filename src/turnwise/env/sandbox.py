"""Verifiable outcomes: run untrusted Python or SQL in an isolated subprocess.

    res = await run_python("result = sum(range(10))", limits=SandboxLimits(wall_s=5))
    res.status, res.result, res.stdout       # SandboxStatus.OK, 45, ""

Each run gets a fresh directory (its cwd, HOME and TMPDIR), removed afterwards, and a child
(`_sandbox_child.py`) that confines itself before running the code. Layers, strongest first,
each used where the host permits it and listed in `SandboxResult.isolation`:

- `netns`: a new network namespace; nothing, not even the host's loopback, is reachable.
- `mountns-ro`: a mount namespace where every mount but the sandbox directory is read-only,
  so no process, not even a root subprocess, can write outside the directory.
- `uid` (parent runs as root): the child drops to a dedicated unprivileged uid, unique among
  concurrent runs, that owns the directory (mode 700): RLIMIT_NPROC applies per sandbox,
  other sandboxes' directories are unreadable, and leftover processes are found by uid.
- `rlimits`: CPU seconds, address space, file size, open files, processes, no core dumps.
- `audit`: a PEP 578 audit hook in the interpreter refusing writes outside the directory,
  sockets, ctypes, signals to other processes and (unless `allow_subprocess`) new processes.
  It is what reports a blocked operation by name; alone it is not a security boundary.

The parent enforces the wall clock and the output cap (it kills the process group, and with
`uid` every process of that uid, so a fork bomb's survivors die too) and classifies the
outcome as a `SandboxStatus`. Not isolated: reads. The code can read world-readable host
files; keep ground truth out of reach of the sandbox user (mode 600 under root).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_CHILD = Path(__file__).with_name("_sandbox_child.py")
_UID_BASE = 1 << 30  # far above any real account
_uid_counter = itertools.count()


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one run (tests set them tight)."""

    wall_s: float = 10.0
    """Wall-clock seconds before everything is killed."""
    cpu_s: int = 5
    """CPU seconds per process (RLIMIT_CPU; whole seconds)."""
    memory_mb: int = 512
    """Address space per process (RLIMIT_AS)."""
    file_size_mb: int = 16
    """Largest file a process may write (RLIMIT_FSIZE)."""
    processes: int = 16
    """Processes the sandbox uid may have (RLIMIT_NPROC); counts only under `uid` isolation."""
    open_files: int = 64
    """File descriptors per process (RLIMIT_NOFILE)."""
    output_bytes: int = 65536
    """Bytes kept of stdout and of stderr each; more kills the run (OUTPUT_LIMIT)."""
    allow_subprocess: bool = False
    """Let the code start processes (bounded by `processes`)."""
    namespaces: bool = True
    """Try network and mount namespaces."""
    python: str | None = None
    """Interpreter to run (default: this one). Under root, the `uid` layer needs one that an
    unprivileged user can read (not one under /root)."""


class SandboxStatus(str, enum.Enum):
    """How a sandboxed run ended."""

    OK = "ok"
    """Exit code 0 and nothing blocked."""
    ERROR = "error"
    """The code raised or exited non-zero."""
    BLOCKED = "blocked"
    """The code attempted a forbidden operation (see `violations`)."""
    TIMEOUT = "timeout"
    """Wall-clock limit."""
    CPU_LIMIT = "cpu_limit"
    """CPU-time limit (SIGXCPU)."""
    MEMORY_LIMIT = "memory_limit"
    """Address-space limit (MemoryError or killed)."""
    PROCESS_LIMIT = "process_limit"
    """Process limit (fork failed with EAGAIN)."""
    FILE_SIZE_LIMIT = "file_size_limit"
    """File-size limit (EFBIG)."""
    OUTPUT_LIMIT = "output_limit"
    """More output than `output_bytes`."""


@dataclass(frozen=True)
class SandboxResult:
    """What a sandboxed run produced."""

    status: SandboxStatus
    """How it ended."""
    stdout: str
    """Captured stdout (at most `output_bytes`, decoded with replacement)."""
    stderr: str
    """Captured stderr (same cap)."""
    exit_code: int | None
    """Exit status; negative for a signal; None if it never exited on its own."""
    result: Any = None
    """The JSON value of the code's global `result` (for SQL: columns and rows)."""
    violations: tuple[str, ...] = ()
    """Operations the audit hook refused."""
    isolation: tuple[str, ...] = ()
    """Layers that were active (netns, mountns-ro, uid, rlimits, audit)."""
    wall_s: float = 0.0
    """Seconds from start to exit."""
    error: str | None = None
    """The code's exception (type: message), when it raised."""
    truncated: bool = False
    """Output was cut at `output_bytes`."""
    notes: tuple[str, ...] = field(default=(), repr=False)
    """Diagnostics from the child (a layer the host refused, ...)."""

    @property
    def ok(self) -> bool:
        return self.status is SandboxStatus.OK


def _allocate_uid() -> int:
    # unique among this host's concurrent runs: the pid (pid_max <= 2^22) and a per-process counter
    return _UID_BASE + ((os.getpid() % (1 << 20)) << 10) + next(_uid_counter) % (1 << 10)


async def run_python(code: str, *, limits: SandboxLimits = SandboxLimits(), inputs: Any = None,
                     files: Mapping[str, str | bytes] | None = None, root: str | os.PathLike[str] | None = None
                     ) -> SandboxResult:
    """Run `code` as `__main__` in a sandbox. `inputs` (JSON) is visible to it as the global
    `inputs`; `files` are written into its directory first; its global `result` (JSON) comes back."""
    base = Path(root or Path(tempfile.gettempdir()) / "turnwise-sandbox")
    base.mkdir(parents=True, exist_ok=True)
    as_root = os.geteuid() == 0
    if as_root:
        os.chmod(base, 0o711)  # traversable by the sandbox uid, not listable
    workdir = Path(tempfile.mkdtemp(prefix="sb-", dir=base)).resolve()
    uid = _allocate_uid() if as_root else None
    cgroup = _make_cgroup(workdir.name, limits.processes) if as_root else None
    try:
        for name, content in (files or {}).items():
            target = (workdir / name).resolve()
            if workdir not in target.parents:
                raise ValueError(f"file {name!r} would land outside the sandbox directory")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content.encode() if isinstance(content, str) else content)
        (workdir / "main.py").write_text(code, encoding="utf-8")
        inputs_file = None
        if inputs is not None:
            inputs_file = str(workdir / "inputs.json")
            Path(inputs_file).write_text(json.dumps(inputs), encoding="utf-8")
        if uid is not None:
            for p in [workdir, *workdir.rglob("*")]:
                os.chown(p, uid, uid, follow_symlinks=False)
        os.chmod(workdir, 0o700)
        return await _run(workdir, uid, cgroup, limits, inputs_file)
    finally:
        if cgroup is not None:
            _remove_cgroup(cgroup)
        shutil.rmtree(workdir, ignore_errors=True)


async def run_sql(query: str, *, db: str | os.PathLike[str] | None = None, setup: str | None = None,
                  max_rows: int = 1000, limits: SandboxLimits = SandboxLimits(),
                  root: str | os.PathLike[str] | None = None) -> SandboxResult:
    """Run one SQL statement in a sandbox, on a private copy of `db` (or an empty database),
    after the optional `setup` script. `result` is `{"columns": [...], "rows": [[...], ...]}`
    (at most `max_rows` rows; `"truncated": true` when there were more)."""
    files: dict[str, bytes] = {}
    if db is not None:
        files["db.sqlite3"] = Path(db).read_bytes()
    inputs = {"query": query, "setup": setup, "max_rows": max_rows, "has_db": db is not None}
    return await run_python(_SQL_RUNNER, limits=limits, inputs=inputs, files=files, root=root)


_SQL_RUNNER = """\
import sqlite3
conn = sqlite3.connect("db.sqlite3" if inputs["has_db"] else ":memory:", isolation_level=None)
conn.execute("PRAGMA temp_store=MEMORY")
if inputs["setup"]:
    conn.executescript(inputs["setup"])
cur = conn.execute(inputs["query"])
columns = [d[0] for d in cur.description or ()]
rows = cur.fetchmany(inputs["max_rows"] + 1)
def cell(v):
    return v.hex() if isinstance(v, bytes) else v
result = {"columns": columns, "rows": [[cell(v) for v in r] for r in rows[: inputs["max_rows"]]],
          "truncated": len(rows) > inputs["max_rows"]}
"""


class _Capped:
    """Reads a stream to EOF, keeping the first `cap` bytes; sets `over` when more arrive."""

    def __init__(self, stream: asyncio.StreamReader, cap: int, over: asyncio.Event):
        self.data = bytearray()
        self.truncated = False
        self.task = asyncio.ensure_future(self._read(stream, cap, over))

    async def _read(self, stream: asyncio.StreamReader, cap: int, over: asyncio.Event) -> None:
        while chunk := await stream.read(65536):
            room = cap - len(self.data)
            self.data += chunk[:max(room, 0)]
            if len(chunk) > room:
                self.truncated = True
                over.set()


async def _run(workdir: Path, uid: int | None, cgroup: Path | None, limits: SandboxLimits,
               inputs_file: str | None) -> SandboxResult:
    loop = asyncio.get_running_loop()
    status_r, status_w = os.pipe()
    cfg = {"workdir": str(workdir), "status_fd": status_w, "uid": uid, "gid": uid,
           "cgroup": str(cgroup) if cgroup else None,
           "code_file": str(workdir / "main.py"), "inputs_file": inputs_file, "namespaces": limits.namespaces,
           "allow_subprocess": limits.allow_subprocess,
           "cpu_s": max(1, int(limits.cpu_s)), "memory_mb": limits.memory_mb,
           "file_size_mb": limits.file_size_mb, "open_files": limits.open_files,
           "nproc": limits.processes if uid is not None else _own_processes() + limits.processes}
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir),
           "SQLITE_TMPDIR": str(workdir), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    t0 = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            limits.python or sys.executable, "-I", "-B", str(_CHILD), json.dumps(cfg), cwd=workdir, env=env,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            pass_fds=(status_w,), start_new_session=True)
    except BaseException:
        os.close(status_r)
        raise
    finally:
        os.close(status_w)
    status_reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(status_reader), os.fdopen(status_r, "rb", buffering=0))
    over = asyncio.Event()
    assert proc.stdout is not None and proc.stderr is not None
    out, err = _Capped(proc.stdout, limits.output_bytes, over), _Capped(proc.stderr, limits.output_bytes, over)
    status_lines = _Capped(status_reader, 1 << 22, asyncio.Event())
    waiter, over_waiter = asyncio.ensure_future(proc.wait()), asyncio.ensure_future(over.wait())
    try:
        done, _ = await asyncio.wait({waiter, over_waiter}, timeout=limits.wall_s,
                                     return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # the caller gave up (a rollout timeout): the child must not outlive it
        _kill_all(proc.pid, uid, cgroup, limits.allow_subprocess)
        transport.close()
        raise
    timed_out, output_over = not done, over_waiter in done and waiter not in done
    over_waiter.cancel()
    _kill_all(proc.pid, uid, cgroup, limits.allow_subprocess)
    exit_code = await proc.wait() if waiter in done else None
    wall = time.monotonic() - t0
    if exit_code is None:
        await proc.wait()
    for reader in (out, err, status_lines):  # killed writers close the pipes; don't hang on stragglers
        try:
            await asyncio.wait_for(reader.task, timeout=2.0)
        except asyncio.TimeoutError:
            reader.task.cancel()
    transport.close()
    return _classify(exit_code, timed_out, output_over, out, err, status_lines.data, wall)


def _classify(exit_code: int | None, timed_out: bool, output_over: bool, out: _Capped, err: _Capped,
              status_data: bytes, wall: float) -> SandboxResult:
    report: dict[str, Any] = {"violation": [], "note": []}
    for line in status_data.decode(errors="replace").splitlines():
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue
        for k, v in item.items() if isinstance(item, dict) else ():
            if k in ("violation", "note"):
                report[k].append(str(v))
            else:
                report[k] = v
    exc = report.get("exception") or {}
    exc_type, exc_errno = exc.get("type"), exc.get("errno")
    if timed_out:
        status = SandboxStatus.TIMEOUT
    elif output_over:
        status = SandboxStatus.OUTPUT_LIMIT
    elif exit_code == -signal.SIGXCPU:
        status = SandboxStatus.CPU_LIMIT
    elif report["violation"]:
        status = SandboxStatus.BLOCKED
    elif exc_type == "MemoryError":
        status = SandboxStatus.MEMORY_LIMIT
    elif exc_type == "BlockingIOError" and exc_errno == 11:
        status = SandboxStatus.PROCESS_LIMIT
    elif exc_errno == 27 or exit_code == -signal.SIGXFSZ:  # EFBIG
        status = SandboxStatus.FILE_SIZE_LIMIT
    elif exit_code == 0:
        status = SandboxStatus.OK
    else:
        status = SandboxStatus.ERROR
    return SandboxResult(
        status=status, stdout=out.data.decode(errors="replace"), stderr=err.data.decode(errors="replace"),
        exit_code=exit_code, result=report.get("result"), violations=tuple(report["violation"]),
        isolation=tuple(report.get("isolation") or ()), wall_s=wall,
        error=f"{exc_type}: {exc.get('message', '')}" if exc_type else report.get("result_error"),
        truncated=out.truncated or err.truncated, notes=tuple(report["note"]))


def _own_processes() -> int:
    """Processes of our uid now (RLIMIT_NPROC counts them all when we cannot switch uid)."""
    me = os.getuid()
    n = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError):
                n += os.stat(f"/proc/{pid}").st_uid == me
    return n


def _kill_all(pid: int, uid: int | None, cgroup: Path | None, scan: bool) -> None:
    """SIGKILL the sandbox's session (its pgid is its pid) and, when it could have started
    processes that left the session, every process in its cgroup or of its uid."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    if cgroup is not None:
        _kill_cgroup(cgroup)
    if uid is None or not scan:
        return
    for _ in range(100):  # a fork bomb may still be forking while we sweep
        found = False
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    os.kill(int(entry), signal.SIGKILL)
                    found = True
            except (OSError, ValueError):
                pass
        if not found:
            return


def _pids_cgroup_root() -> Path | None:
    """A writable cgroup directory with the pids controller (v1 `pids` or v2), or None."""
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    for fields in mounts:
        sep = fields.index("-")
        fstype, target, options = fields[sep + 1], Path(fields[4]), fields[sep + 3].split(",")
        if fstype == "cgroup" and "pids" in options and os.access(target, os.W_OK):
            return target
        if fstype == "cgroup2" and os.access(target, os.W_OK):
            try:
                if "pids" in (target / "cgroup.controllers").read_text().split():
                    (target / "cgroup.subtree_control").write_text("+pids")
                    return target
            except OSError:
                continue
    return None


def _make_cgroup(name: str, max_pids: int) -> Path | None:
    root = _pids_cgroup_root()
    if root is None:
        return None
    path = root / f"turnwise-{name}"
    try:
        path.mkdir()
        (path / "pids.max").write_text(str(max_pids))
        return path
    except OSError:
        _remove_cgroup(path)
        return None


def _kill_cgroup(path: Path) -> None:
    for _ in range(100):
        try:
            pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
        except OSError:
            return
        if not pids:
            return
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        time.sleep(0.001)


def _remove_cgroup(path: Path) -> None:
    _kill_cgroup(path)
    for _ in range(50):  # rmdir fails while killed processes are still being reaped
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.01)
