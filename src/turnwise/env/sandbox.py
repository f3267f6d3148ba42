"""Verifiable outcomes: run untrusted Python or SQL in an isolated subprocess.

    res = await run_python("result = sum(range(10))", limits=SandboxLimits(wall_s=5))
    res.status, res.result, res.stdout       # SandboxStatus.OK, 45, ""

Each run gets a fresh directory (its cwd, HOME and TMPDIR), removed afterwards, and a child
(`_sandbox_child.py`) that sets its limits and runs the code. The boundary is bubblewrap
(`turnwise.env._isolation`): the child starts in new user, pid, network, IPC and mount
namespaces, as uid 65534 without capabilities, in an empty read-only root that holds only the
interpreter, the system libraries and the sandbox directory (the one writable path). Nothing
else on the host (task data, the trainer's `/proc` and environment, other sandboxes) is visible.
Inside it, layers listed in `SandboxResult.isolation`:

- `cgroup-pids` (a writable pids cgroup, usually root): every process and thread of the run
  is bounded and, at the end, killed through it.
- `rlimits`: CPU seconds, address space, file size, open files, processes, no core dumps.
- `audit`: a PEP 578 audit hook that ends the run (status BLOCKED) at the first write outside
  the directory, socket, ctypes, signal to another process or (unless `allow_subprocess`) new
  process, naming it. It is what reports a blocked operation by name; it is not the boundary.

Where `bwrap` is missing or refused, `run_python` raises `SandboxUnavailable` (with how to
install it) unless `require_isolation` is off (`sandbox.require_isolation: false`): then the
child confines itself with the weaker layers `netns`, `mountns-ro` (read-only remount), `uid`
(root only), and `isolation` lacks `bwrap`; reads of world-readable host files are then possible.

The parent derives the outcome from what it observes: the wall clock, the output cap, the exit
status (the audit hook's violations exit with a reserved status the code cannot undo), the
cgroup's pids events, and its own command line for `isolation`. The child's status pipe only
carries the code's `result`, its exception and violation names, all things the code could
produce or fake against itself only: nothing it writes there makes a failed run look OK.
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

from turnwise.env._isolation import (
    BWRAP_LAYERS,
    INSTALL_HINT,
    SandboxUnavailable,
    bwrap_command,
    bwrap_problem,
    cgroup_hit_limit,
    exit_code_of,
    kill_cgroup,
    make_cgroup,
    remove_cgroup,
    require_isolation_default,
)

_CHILD = Path(__file__).with_name("_sandbox_child.py")
_UID_BASE = 1 << 30  # far above any real account
_uid_counter = itertools.count()
_CHILD_IN_SANDBOX = "/opt/turnwise/_sandbox_child.py"
VIOLATION_EXIT = 86
"""The child's exit status after the audit hook refused an operation (reserved)."""


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
    """Weaker layers only (no bwrap): try network and mount namespaces."""
    python: str | None = None
    """Interpreter to run (default: this one, without its virtualenv); its prefix is bound read-only."""
    read_only_paths: tuple[str, ...] = ()
    """More host paths the code may read (bound read-only), e.g. a virtualenv's site-packages."""
    require_isolation: bool | None = None
    """Refuse to run without bubblewrap (None: $TURNWISE_SANDBOX_REQUIRE_ISOLATION, default true)."""


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
    """Operations the audit hook refused (the first one ends the run)."""
    isolation: tuple[str, ...] = ()
    """Layers that were active (bwrap, userns, pidns, netns, mountns-ro, ..., cgroup-pids, rlimits, audit)."""
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
    require = limits.require_isolation if limits.require_isolation is not None else require_isolation_default()
    problem = bwrap_problem()  # cached: bwrap is probed once per process
    if problem is not None and require:
        raise SandboxUnavailable(f"{problem}: {INSTALL_HINT}")
    base = Path(root or Path(tempfile.gettempdir()) / "turnwise-sandbox")
    base.mkdir(parents=True, exist_ok=True)
    as_root = os.geteuid() == 0
    use_uid = as_root and problem is not None  # under bwrap the code is uid 65534 in its own user namespace
    if use_uid:
        os.chmod(base, 0o711)  # traversable by the sandbox uid, not listable
    workdir = Path(tempfile.mkdtemp(prefix="sb-", dir=base)).resolve()
    uid = _allocate_uid() if use_uid else None
    # under bwrap the cgroup also holds bwrap itself and its pid-namespace init
    cgroup = make_cgroup(workdir.name, limits.processes + (2 if problem is None else 0)) if as_root else None
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
        return await _run(workdir, uid, cgroup, limits, inputs_file, bwrap=problem is None,
                          weak_note=None if problem is None else f"require_isolation off: {problem}; weaker layers only")
    finally:
        if cgroup is not None:
            remove_cgroup(cgroup)
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
               inputs_file: str | None, *, bwrap: bool, weak_note: str | None) -> SandboxResult:
    loop = asyncio.get_running_loop()
    status_r, status_w = os.pipe()
    info_r, info_w = os.pipe() if bwrap else (-1, -1)
    cfg = {"workdir": str(workdir), "status_fd": status_w, "uid": uid, "gid": uid, "bwrap": bwrap,
           "cgroup": str(cgroup) if cgroup and not bwrap else None,
           "code_file": str(workdir / "main.py"), "inputs_file": inputs_file,
           "namespaces": limits.namespaces and not bwrap, "allow_subprocess": limits.allow_subprocess,
           # as host root, the user namespace maps uid 65534 to root, whom RLIMIT_NPROC exempts
           "refuse_subprocess": bwrap and os.geteuid() == 0 and cgroup is None,
           "cpu_s": max(1, int(limits.cpu_s)), "memory_mb": limits.memory_mb,
           "file_size_mb": limits.file_size_mb, "open_files": limits.open_files,
           "nproc": limits.processes if uid is not None else _own_processes() + limits.processes}
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir),
           "SQLITE_TMPDIR": str(workdir), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    if bwrap:
        prefix, exe = bwrap_command(workdir=workdir, python=limits.python, allow_subprocess=limits.allow_subprocess,
                                    extra_read_only=limits.read_only_paths, shm_bytes=limits.file_size_mb << 20,
                                    env=env)
        prefix[1:1] = ["--info-fd", str(info_w), "--ro-bind", str(_CHILD), _CHILD_IN_SANDBOX]
        if cgroup is not None:  # join before bwrap starts, so everything it starts is counted and killable
            prefix = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(cgroup / "cgroup.procs"), *prefix]
        argv = [*prefix, exe, "-I", "-B", _CHILD_IN_SANDBOX, json.dumps(cfg)]
        launch_env = {"PATH": "/usr/bin:/bin"}  # bwrap's own environment is visible inside as /proc/1/environ
    else:
        argv = [limits.python or sys.executable, "-I", "-B", str(_CHILD), json.dumps(cfg)]
        launch_env = env
    t0 = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=workdir, env=launch_env,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            pass_fds=(status_w, info_w) if bwrap else (status_w,), start_new_session=True)
    except BaseException:
        os.close(status_r)
        if bwrap:
            os.close(info_r)
        raise
    finally:
        os.close(status_w)
        if bwrap:
            os.close(info_w)
    readers, transports = [], []
    for fd, cap in ((status_r, 1 << 22), (info_r, 4096)) if bwrap else ((status_r, 1 << 22),):
        stream = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda s=stream: asyncio.StreamReaderProtocol(s), os.fdopen(fd, "rb", buffering=0))
        readers.append(_Capped(stream, cap, asyncio.Event()))
        transports.append(transport)
    over = asyncio.Event()
    assert proc.stdout is not None and proc.stderr is not None
    out, err = _Capped(proc.stdout, limits.output_bytes, over), _Capped(proc.stderr, limits.output_bytes, over)
    status_lines = readers[0]

    ns_init: list[int] = []

    def kill() -> None:
        if bwrap and proc.returncode is None:  # the pid namespace's init: its death kills the namespace
            ns_init.extend(_kill_ns_init(readers[1].data))
        _kill_all(proc.pid, uid, cgroup, limits.allow_subprocess)

    waiter, over_waiter = asyncio.ensure_future(proc.wait()), asyncio.ensure_future(over.wait())
    try:
        done, _ = await asyncio.wait({waiter, over_waiter}, timeout=limits.wall_s,
                                     return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # the caller gave up (a rollout timeout): the child must not outlive it
        kill()
        for transport in transports:
            transport.close()
        raise
    timed_out, output_over = not done, over_waiter in done and waiter not in done
    over_waiter.cancel()
    kill()
    exit_code = await proc.wait() if waiter in done else None
    wall = time.monotonic() - t0
    if exit_code is None:
        await proc.wait()
    for pid in ns_init:
        await _gone(pid)
    if bwrap and exit_code is not None:
        exit_code = exit_code_of(exit_code)
    for reader in (out, err, *readers):  # killed writers close the pipes; don't hang on stragglers
        try:
            await asyncio.wait_for(reader.task, timeout=2.0)
        except asyncio.TimeoutError:
            reader.task.cancel()
    for transport in transports:
        transport.close()
    layers = (*BWRAP_LAYERS, *(("cgroup-pids",) if cgroup else ())) if bwrap else ()
    return _classify(exit_code, timed_out, output_over, out, err, status_lines.data, wall, layers=layers,
                     process_limit=cgroup_hit_limit(cgroup), weak_note=weak_note)


def _kill_ns_init(info: bytes) -> list[int]:
    """SIGKILL the pid namespace's init named by bwrap's --info-fd (`{"child-pid": N}`)."""
    with contextlib.suppress(ValueError, TypeError, KeyError, AttributeError, ProcessLookupError, PermissionError):
        pid = int(json.loads(info.decode(errors="replace").split("}")[0] + "}")["child-pid"])
        if pid > 1:
            os.kill(pid, signal.SIGKILL)
            return [pid]
    return []


async def _gone(pid: int, timeout: float = 2.0) -> None:
    """Wait until `pid` has exited (a zombie has an empty cmdline), so nothing outlives the run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if not Path(f"/proc/{pid}/cmdline").read_bytes():
                return
        except OSError:
            return
        await asyncio.sleep(0.005)


def _classify(exit_code: int | None, timed_out: bool, output_over: bool, out: _Capped, err: _Capped,
              status_data: bytes, wall: float, *, layers: tuple[str, ...], process_limit: bool,
              weak_note: str | None) -> SandboxResult:
    """The outcome from what the parent observed. Status lines are claims: the first `isolation`
    line (written before the code ran) names the child's own layers; `result`, `exception` and
    `violation` lines can only make a run look worse (OK needs exit status 0 and none of them)."""
    report: dict[str, Any] = {"violation": [], "note": [] if weak_note is None else [weak_note]}
    for line in status_data.decode(errors="replace").splitlines():
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue
        for k, v in item.items() if isinstance(item, dict) else ():
            if k in ("violation", "note"):
                report[k].append(str(v)[:500])
            elif k == "isolation":
                report.setdefault(k, v if isinstance(v, list) else [])
            else:
                report[k] = v
    exc = report.get("exception") if isinstance(report.get("exception"), dict) else {}
    exc_type, exc_errno = exc.get("type"), exc.get("errno")
    if exit_code == VIOLATION_EXIT and not report["violation"]:
        report["violation"].append(f"exit status {VIOLATION_EXIT} (reserved for refused operations)")
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
    elif (exc_type == "BlockingIOError" and exc_errno == 11) or (process_limit and exit_code != 0):
        status = SandboxStatus.PROCESS_LIMIT
    elif exc_errno == 27 or exit_code == -signal.SIGXFSZ:  # EFBIG
        status = SandboxStatus.FILE_SIZE_LIMIT
    elif exit_code == 0 and not exc_type:
        status = SandboxStatus.OK
    else:
        status = SandboxStatus.ERROR
    child_layers = tuple(str(x) for x in report.get("isolation") or ())
    return SandboxResult(
        status=status, stdout=out.data.decode(errors="replace"), stderr=err.data.decode(errors="replace"),
        exit_code=exit_code, result=report.get("result"), violations=tuple(report["violation"]),
        isolation=layers + tuple(x for x in child_layers if x not in layers), wall_s=wall,
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
        kill_cgroup(cgroup)
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
