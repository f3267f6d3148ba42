"""Sandbox child: confine this process, then run untrusted Python. Standard library only.

Run by `turnwise.env.sandbox` as `python -I -B _sandbox_child.py CONFIG_JSON` in a new
session, with cwd = the sandbox directory: inside bubblewrap, which already built the
boundary (then only steps 2 and 4 run), or, with `require_isolation` off, directly, confining
itself with steps 1-4 (each one that the host refuses is skipped and not reported as active):

1. namespaces: a new network namespace (no interface is up, so nothing is reachable) and a
   mount namespace in which every mount except the sandbox directory is remounted read-only.
   As root directly; otherwise inside a new user namespace that maps only our own uid.
2. resource limits: CPU seconds, address space, file size, open files, processes, no core.
3. identity (root only): drop to the dedicated unprivileged uid/gid the parent chose, which
   owns the directory (mode 700), so RLIMIT_NPROC applies and other sandboxes are unreadable.
4. an audit hook (PEP 578) that refuses, in this interpreter: writes outside the directory,
   sockets, ctypes, signals to other processes, and, unless allowed, new processes.

Audit hooks alone are not a security boundary (PEP 578 says so); bubblewrap is. The first
refused operation ends the process with status 86 (VIOLATION_EXIT), which the code cannot catch.
The status pipe carries JSON lines: the active layers (written once, before the code runs),
the code's `result`, its uncaught exception and violation names. The parent trusts none of
it for a good outcome (see `turnwise.env.sandbox`).
"""

import contextlib
import json
import os
import resource
import sys
import traceback

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 32, 1024, 2048, 4096
MS_REC, MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 16384, 1 << 18, 1 << 21, 1 << 24
_MOUNT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
                "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PROCESS_EVENTS = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
                   "subprocess.Popen", "pty.spawn"}
_PATH_WRITE_EVENTS = {"os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate",
                      "os.utime", "os.rename", "os.link", "os.symlink", "shutil.rmtree", "os.mkfifo",
                      "os.mknod", "os.chflags", "os.setxattr", "os.removexattr"}

STATUS_FD = -1
VIOLATION_EXIT = 86


def report(**item):
    with contextlib.suppress(OSError):
        os.write(STATUS_FD, (json.dumps(item, default=repr) + "\n").encode())


def unshare_namespaces(workdir):
    import ctypes  # before the audit hook, which forbids ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.geteuid(), os.getegid()
    flags = CLONE_NEWNET | CLONE_NEWNS | (0 if uid == 0 else CLONE_NEWUSER)
    if libc.unshare(flags) != 0:
        report(note=f"namespaces unavailable: {os.strerror(ctypes.get_errno())}")
        return []
    if uid != 0:  # map only ourselves: we are "root" in the namespace and nobody outside it
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    layers = ["netns"]

    def mount(src, target, flags):
        return libc.mount(src, target.encode(), None, flags, None) == 0

    if not mount(None, "/", MS_REC | MS_PRIVATE) or not mount(workdir.encode(), workdir, MS_BIND | MS_REC):
        return layers
    failed = []
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    for fields in mounts:
        target = fields[4].replace("\\040", " ")
        if target == workdir or target.startswith(workdir + "/"):
            continue
        extra = sum(_MOUNT_FLAGS.get(o, 0) for o in fields[5].split(","))
        if not mount(None, target, MS_REMOUNT | MS_BIND | MS_RDONLY | extra):
            failed.append(target)
    if "/" not in failed:
        layers.append("mountns-ro" if not failed else "mountns-ro-partial")
    return layers


def interpreter_world_readable():
    """Whether a user other than the owner can run this interpreter and import its libraries."""
    import stat

    for entry in {sys.base_prefix, sys.prefix, *(p for p in sys.path if p and os.path.isdir(p))}:
        path = os.path.realpath(entry)
        parts = [path]
        while parts[-1] != "/":
            parts.append(os.path.dirname(parts[-1]))
        for d in parts:
            mode = os.stat(d).st_mode
            if not mode & stat.S_IXOTH or (d == path and not mode & stat.S_IROTH):
                return False
    return True


def set_limits(cfg):
    def lim(res, soft, hard=None):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(res, (soft, soft if hard is None else hard))

    lim(resource.RLIMIT_CPU, cfg["cpu_s"], cfg["cpu_s"] + 1)  # SIGXCPU first, SIGKILL a second later
    lim(resource.RLIMIT_AS, cfg["memory_mb"] << 20)
    lim(resource.RLIMIT_FSIZE, cfg["file_size_mb"] << 20)
    lim(resource.RLIMIT_NOFILE, cfg["open_files"])
    lim(resource.RLIMIT_CORE, 0)
    lim(resource.RLIMIT_NPROC, cfg["nproc"])


def install_audit_hook(workdir, allow_subprocess):
    me = os.getpid()
    real, join = os.path.realpath, os.path.join

    def inside(path):
        if isinstance(path, int):
            return True  # an already open descriptor
        p = os.fsdecode(path)
        resolved = real(p if os.path.isabs(p) else join(os.getcwd(), p))
        return resolved == workdir or resolved.startswith(workdir + "/") or resolved == "/dev/null"

    def deny(what):
        # fatal: a PermissionError could be caught and the violation hidden; os._exit cannot be
        report(violation=what)
        with contextlib.suppress(Exception):
            sys.stderr.write(f"sandbox: {what} is not allowed\n")
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(VIOLATION_EXIT)

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & _WRITE_FLAGS)
            if writing and path is not None and not inside(path):
                deny(f"write outside the sandbox directory: {os.fsdecode(path)}")
            if mode is None and path is not None and not inside(path) and os.path.isdir(path):
                deny(f"a directory descriptor outside the sandbox: {os.fsdecode(path)}")  # dir_fd= escapes
        elif event in _PATH_WRITE_EVENTS:
            # a symlink may point anywhere (writes through it are resolved above); a hard link may not
            paths = args[1:2] if event == "os.symlink" else args[:2] if event in ("os.rename", "os.link") else args[:1]
            for a in paths:
                if a is not None and not inside(a):
                    deny(f"{event} outside the sandbox directory: {os.fsdecode(a)}")
        elif event.startswith("socket.") and event != "socket.gethostname":
            deny(f"network access ({event})")
        elif event.startswith("ctypes."):
            deny(f"ctypes ({event})")
        elif event in ("os.kill", "os.killpg", "signal.pthread_kill") and args[0] not in (0, me):
            deny(f"signal to another process ({event})")
        elif event in _PROCESS_EVENTS and not allow_subprocess:
            deny(f"starting a process ({event})")

    sys.addaudithook(hook)
    if not allow_subprocess:  # _posixsubprocess.fork_exec raises no audit event: close that door by name too
        import _posixsubprocess
        import subprocess

        def fork_exec(*args, **kwargs):
            deny("starting a process (_posixsubprocess.fork_exec)")

        _posixsubprocess.fork_exec = fork_exec
        if hasattr(subprocess, "_fork_exec"):
            subprocess._fork_exec = fork_exec


def main():
    global STATUS_FD
    cfg = json.loads(sys.argv[1])
    STATUS_FD = cfg["status_fd"]
    workdir = os.path.realpath(cfg["workdir"])
    host_root = os.geteuid() == 0  # before a user namespace makes us "root" inside it
    isolation = []
    if cfg["cgroup"]:  # join first, so that every process started later is counted and killable
        with open(os.path.join(cfg["cgroup"], "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
        isolation.append("cgroup-pids")
    if cfg["namespaces"]:
        try:
            isolation += unshare_namespaces(workdir)
        except OSError as e:
            report(note=f"namespaces unavailable: {e}")
    set_limits(cfg)
    isolation.append("rlimits")
    dropped = False
    if cfg["uid"] is not None:
        if interpreter_world_readable():
            os.setgroups([])
            os.setgid(cfg["gid"])
            os.setuid(cfg["uid"])
            isolation.append("uid")
            dropped = True
        else:
            report(note="uid layer off: this interpreter is not readable by an unprivileged user")
    allow_subprocess = cfg["allow_subprocess"]
    if allow_subprocess and cfg.get("refuse_subprocess"):
        allow_subprocess = False
        report(note="allow_subprocess refused: no pids cgroup, and RLIMIT_NPROC does not bind a uid mapped to root")
    if allow_subprocess and host_root and not dropped and not cfg["cgroup"]:
        # uid 0 is exempt from RLIMIT_NPROC: without a pids cgroup nothing would bound a fork bomb
        allow_subprocess = False
        report(note="allow_subprocess refused: no process limit applies to root without a pids cgroup")
    os.chdir(workdir)
    sys.path.insert(0, workdir)
    sys.dont_write_bytecode = True
    install_audit_hook(workdir, allow_subprocess)
    isolation.append("audit")
    report(isolation=isolation)

    with open(cfg["code_file"], encoding="utf-8") as f:
        code = compile(f.read(), cfg["code_file"], "exec")
    scope = {"__name__": "__main__", "__file__": cfg["code_file"], "__builtins__": __builtins__}
    if cfg["inputs_file"] is not None:
        with open(cfg["inputs_file"], encoding="utf-8") as f:
            scope["inputs"] = json.load(f)
    exit_code = 0
    try:
        exec(code, scope)
    except SystemExit as e:
        exit_code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException as e:  # report the user's exception, print it as Python would
        report(exception={"type": type(e).__name__, "errno": getattr(e, "errno", None), "message": str(e)[:500]})
        traceback.print_exc()
        exit_code = 1
    if "result" in scope:
        try:
            report(result=json.loads(json.dumps(scope["result"])))
        except (TypeError, ValueError) as e:
            report(result_error=f"result is not JSON-serializable: {e}")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


if __name__ == "__main__":
    main()
