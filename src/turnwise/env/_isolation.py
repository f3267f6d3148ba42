"""The sandbox's OS boundary: a bubblewrap command line, and the pids cgroup that bounds it.

bubblewrap (`bwrap`, https://github.com/containers/bubblewrap) builds the sandbox's world
from nothing: a new user, pid, network, IPC, UTS and cgroup namespace; an empty tmpfs root,
read-only from the start, holding only the read-only binds of an explicit allow-list (the
interpreter's prefix and the system libraries; the system binaries only when the code may
start processes; `extra_read_only` paths), a minimal `/dev` with a small private `/dev/shm`,
no `/proc` at all, and the sandbox directory, the one writable path. The code runs as uid 65534 with no
capabilities, in a new session (no TIOCSTI into the caller's terminal), cannot create further
user namespaces, and dies with its parent. Task data, the trainer's `/proc`, its environment
and every other host file are not hidden but absent.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

NOBODY = 65534
BWRAP_LAYERS = ("bwrap", "userns", "pidns", "netns", "mountns-ro", "ipcns", "cap-drop")
"""Layers a bubblewrap run has, by construction of its command line."""
INSTALL_HINT = ("install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install "
                "bubblewrap; Arch: pacman -S bubblewrap), or set sandbox.require_isolation: false "
                "(SandboxLimits(require_isolation=False), TURNWISE_SANDBOX_REQUIRE_ISOLATION=0) to run "
                "the weaker layers knowingly")


class SandboxUnavailable(RuntimeError):
    """Isolation is required but bubblewrap is missing or refused to start here."""


def require_isolation_default() -> bool:
    """`TURNWISE_SANDBOX_REQUIRE_ISOLATION` (set from `sandbox.require_isolation`); true unless 0/false/no."""
    return os.environ.get("TURNWISE_SANDBOX_REQUIRE_ISOLATION", "1").strip().lower() not in ("0", "false", "no")


@functools.lru_cache(maxsize=1)
def bwrap_problem() -> str | None:
    """None when `bwrap` exists and can build a sandbox here; else why not (one line)."""
    exe = shutil.which("bwrap")
    if exe is None:
        return "bubblewrap (bwrap) is not installed"
    probe = [exe, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
             "--cap-drop", "ALL", "--uid", str(NOBODY), *_system_binds(True), "--", "/bin/true"]
    try:
        p = subprocess.run(probe, capture_output=True, text=True, timeout=10, env={"PATH": "/usr/bin:/bin"})
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"bwrap failed to start: {e}"
    if p.returncode != 0:
        return f"bwrap cannot build a sandbox here: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}"
    return None


def _system_binds(with_binaries: bool) -> list[str]:
    args: list[str] = []
    for d in ("/usr/lib", "/usr/lib64", "/usr/lib32", *(("/usr/bin", "/usr/sbin") if with_binaries else ())):
        if os.path.isdir(d) and not os.path.islink(d):
            args += ["--ro-bind", d, d]
    for d in ("/lib", "/lib64", "/lib32", *(("/bin", "/sbin") if with_binaries else ())):
        if os.path.islink(d):
            args += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            args += ["--ro-bind", d, d]
    return args


def interpreter_paths(python: str | None) -> tuple[str, list[str]]:
    """The real interpreter to run and the prefixes to bind for it. The default is this
    interpreter without its virtualenv: the child needs only the standard library."""
    if python is None:
        exe = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
        return exe, sorted({os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix)})
    exe = os.path.realpath(python)
    return exe, [os.path.dirname(os.path.dirname(exe))]


def bwrap_command(*, workdir: Path, python: str | None, allow_subprocess: bool, extra_read_only: tuple[str, ...],
                  shm_bytes: int, env: dict[str, str]) -> tuple[list[str], str]:
    """The bwrap argv prefix (the child's argv follows it) and the interpreter it runs."""
    exe, prefixes = interpreter_paths(python)
    args = ["bwrap", "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
            "--cap-drop", "ALL", "--uid", str(NOBODY), "--gid", str(NOBODY), "--hostname", "sandbox",
            *_system_binds(allow_subprocess)]
    bound = {"/usr/lib", "/usr/bin", "/usr/lib64"}
    for p in [*prefixes, *(os.path.realpath(x) for x in extra_read_only)]:
        if not any(p == b or p.startswith(b + "/") for b in bound) and os.path.exists(p):
            args += ["--ro-bind", p, p]
            bound.add(p)
    # no /proc: in it, files owned by root (to whom uid 65534 maps when the host runs bwrap as root)
    # stay writable by their mode, /proc/sys/kernel/core_pattern among them; nothing here needs it
    args += ["--dev", "/dev", "--size", str(shm_bytes), "--tmpfs", "/dev/shm",
             "--bind", str(workdir), str(workdir), "--chdir", str(workdir), "--remount-ro", "/", "--clearenv"]
    for k, v in env.items():
        args += ["--setenv", k, v]
    return [*args, "--"], exe


def exit_code_of(bwrap_status: int) -> int:
    """bwrap reports a child killed by signal N as 128 + N; make it -N like subprocess does."""
    return -(bwrap_status - 128) if 128 < bwrap_status < 128 + signal.NSIG else bwrap_status


# --- pids cgroup: bounds every process and thread of one run; all of them are killed through it ---

def pids_cgroup_root() -> Path | None:
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


def make_cgroup(name: str, max_pids: int) -> Path | None:
    root = pids_cgroup_root()
    if root is None:
        return None
    path = root / f"turnwise-{name}"
    try:
        path.mkdir()
        (path / "pids.max").write_text(str(max_pids))
        return path
    except OSError:
        remove_cgroup(path)
        return None


def cgroup_hit_limit(path: Path | None) -> bool:
    """Whether a fork in the cgroup failed at pids.max (the kernel counts it in pids.events)."""
    if path is None:
        return False
    with contextlib.suppress(OSError, ValueError):
        for line in (path / "pids.events").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "max":
                return int(value) > 0
    return False


def kill_cgroup(path: Path) -> None:
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


def remove_cgroup(path: Path) -> None:
    kill_cgroup(path)
    for _ in range(50):  # rmdir fails while killed processes are still being reaped
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.01)
