"""Escape attempts against the sandbox, as model-written code would try them; each must fail.

Most attacks run twice: as the sandboxed code itself (under the audit hook) and in a fresh
interpreter the code starts through `_posixsubprocess.fork_exec` reloaded from scratch, which
raises no audit event: that interpreter has no hook at all, so what stops it is bubblewrap
alone. Every test then checks the host side (the file is not there, the process is alive,
the secret did not come back, nothing is left running).

Needs bubblewrap (`apt-get install bubblewrap`); without it every test here is skipped.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from turnwise.env._isolation import bwrap_problem
from turnwise.env.sandbox import VIOLATION_EXIT, SandboxLimits, SandboxResult, SandboxStatus, run_python

pytestmark = pytest.mark.skipif(bwrap_problem() is not None,
                                reason=f"{bwrap_problem()}: install bubblewrap (apt-get install bubblewrap)")

S = SandboxStatus
ATTEMPTS: list[str] = []
"""Every escape attempt made (each test asserts each one failed); tallied at the end (`pytest -s`)."""


@pytest.fixture(scope="module", autouse=True)
def tally():
    yield
    print(f"\nescapes: {len(ATTEMPTS)} attempts ({sum(a.startswith('unhooked') for a in ATTEMPTS)} from an "
          "interpreter without the audit hook)")
REPO = Path(__file__).resolve().parents[1]
TASK_DATA = REPO / "examples" / "support_desk" / "data" / "test.jsonl"
LIMITS = SandboxLimits(wall_s=8, cpu_s=4, memory_mb=512, file_size_mb=4, processes=16, output_bytes=1 << 20)
SUBPROCESS = SandboxLimits(wall_s=8, cpu_s=4, memory_mb=512, file_size_mb=4, processes=16, output_bytes=1 << 20,
                           allow_subprocess=True)

# Prepended to attacks: `unhooked(script)` runs `script` in a new interpreter without the audit hook.
UNHOOKED = r'''
import json, os, sys
def unhooked(script):
    del sys.modules["_posixsubprocess"]          # a fresh copy of the module has the real fork_exec
    import _posixsubprocess
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = _posixsubprocess.fork_exec(
        [sys.executable, "-I", "-c", script], [os.fsencode(sys.executable)], True, (), None, None,
        -1, -1, -1, out_w, -1, out_w, err_r, err_w, True, False, -1, None, None, -1, -1, None, False)
    os.close(out_w); os.close(err_w)
    chunks = []
    while (b := os.read(out_r, 65536)):
        chunks.append(b)
    os.waitpid(pid, 0)
    text = b"".join(chunks).decode(errors="replace")
    return json.loads(text.strip().splitlines()[-1]) if text.strip() else {"no output": True}
'''


def attack(script: str, limits: SandboxLimits = LIMITS, **kw: Any) -> tuple[SandboxResult, dict[str, Any]]:
    """Run `script` (which prints one JSON object last) unhooked inside the sandbox."""
    if "done = {}" not in script:  # try_all counted its own
        ATTEMPTS.append("unhooked: " + script.strip().splitlines()[0][:60])
    code = UNHOOKED + f"result = unhooked({script!r})\n"
    r = asyncio.run(run_python(code, limits=limits, **kw))
    assert "bwrap" in r.isolation, r.isolation
    assert isinstance(r.result, dict), (r.status, r.stdout[-500:], r.stderr[-1500:])
    return r, r.result


def sandbox(code: str, limits: SandboxLimits = LIMITS, **kw: Any) -> SandboxResult:
    ATTEMPTS.append("hooked: " + code.strip().splitlines()[-1][:60])
    return asyncio.run(run_python(code, limits=limits, **kw))


def try_all(ops: dict[str, str], *, escapes: bool = True) -> str:
    """A script that runs each named statement and prints which ones succeeded."""
    if escapes:
        ATTEMPTS.extend(f"unhooked: {name}" for name in ops)
    lines = ["import ctypes, ctypes.util, json, os, signal, socket, subprocess, sys", "done = {}"]
    for name, stmt in ops.items():
        lines += ["try:", *("    " + ln for ln in stmt.splitlines()), f"    done[{name!r}] = True",
                  "except BaseException as e:", f"    done[{name!r}] = f'{{type(e).__name__}}: {{e}}'"]
    lines.append("print(json.dumps(done))")
    return "\n".join(lines)


def succeeded(done: dict[str, Any]) -> list[str]:
    return [k for k, v in done.items() if v is True]


def skip_if_subprocesses_refused(r: SandboxResult) -> None:
    """As root without a writable pids cgroup nothing bounds processes, so the sandbox refuses them."""
    if any("allow_subprocess refused" in n for n in r.notes):
        pytest.skip("allow_subprocess refused here (root without a writable pids cgroup)")


def leftovers(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            pass
    return found


LIBC = "libc = ctypes.CDLL(None, use_errno=True)\n"


def test_the_unhooked_interpreter_really_has_no_audit_hook():
    # the premise of this file: inside, code can reach a hook-free interpreter; bwrap must hold alone
    r, done = attack(try_all({"ctypes": LIBC + "assert libc.getpid() > 0",
                              "fork": "pid = os.fork()\nos._exit(0) if pid == 0 else os.waitpid(pid, 0)"},
                             escapes=False))
    assert succeeded(done) == ["ctypes", "fork"], done
    assert r.status is S.OK


def test_killing_the_trainer_and_its_neighbours_fails():
    victim = subprocess.Popen(["sleep", "30"])  # a host process the sandbox must not reach
    try:
        host_pids = [victim.pid, os.getpid(), os.getppid()]
        ops = {f"kill {p}": f"os.kill({p}, signal.SIGKILL)" for p in host_pids}
        ops["kill 1"] = "os.kill(1, signal.SIGKILL)"  # bwrap's init in the pid namespace ignores it
        r, done = attack(try_all(ops))
        assert [k for k in succeeded(done) if k != "kill 1"] == [], done
        assert victim.poll() is None  # still running
        # its parent inside is the sandbox child: killing it ends this run, and only this run
        r = sandbox(UNHOOKED + "unhooked('import os; os.kill(os.getppid(), 9)')\nresult = 'survived'")
        assert r.exit_code == -signal.SIGKILL and r.result is None and victim.poll() is None
        # kill(-1): every process the caller may signal; inside the pid namespace only its own
        r = sandbox(UNHOOKED + "unhooked('import os; os.kill(-1, 9)')\nresult = 'survived'")
        assert r.exit_code == -signal.SIGKILL and victim.poll() is None
        r = sandbox("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)")  # the hooked path too
        assert r.status is S.BLOCKED and r.exit_code == VIOLATION_EXIT
    finally:
        victim.kill()
        victim.wait()


def test_kill_parent_from_a_shell_under_allow_subprocess_ends_only_the_sandbox():
    r = sandbox("import subprocess\np = subprocess.run(['sh', '-c', 'kill -9 1; kill -9 $PPID'])\nresult = 1",
                SUBPROCESS)
    skip_if_subprocesses_refused(r)
    # $PPID is the sandbox child: it dies (SIGKILL), and the trainer, this process, reads that
    assert "bwrap" in r.isolation and r.exit_code == -signal.SIGKILL and r.result is None


@pytest.mark.parametrize("target_dir", ["/tmp", "host"])
def test_remount_rw_and_write_to_the_host_fails(tmp_path: Path, target_dir: str):
    host_dir = tmp_path if target_dir == "host" else Path("/tmp")
    target = host_dir / f"escape-{uuid.uuid4().hex}"
    ops = {
        "remount / rw": LIBC + "assert libc.mount(None, b'/', None, 32 | 4096, None) == 0, os.strerror(ctypes.get_errno())",
        "remount / rw (no bind)": LIBC + "assert libc.mount(None, b'/', None, 32, None) == 0, os.strerror(ctypes.get_errno())",
        "mount tmpfs": LIBC + "assert libc.mount(b'x', b'/tmp', b'tmpfs', 0, None) == 0, os.strerror(ctypes.get_errno())",
        "umount /": LIBC + "assert libc.umount2(b'/', 2) == 0, os.strerror(ctypes.get_errno())",
        "write": f"open({str(target)!r}, 'w').write('pwned')",
        "write the parent dir": f"open({str(target.parent)!r} + '/x', 'w')",
        "chroot": "os.chroot('/tmp')",
    }
    r, done = attack(try_all(ops))
    assert succeeded(done) == [], done
    assert not target.exists()
    r = sandbox(f"import subprocess\np = subprocess.run(['sh', '-c', 'mount -o remount,rw / ; echo pwned > {target}'],"
                " capture_output=True, text=True)\nresult = p.stderr", SUBPROCESS)
    assert not target.exists(), r.result


def test_leaving_the_pids_cgroup_and_detaching_leaves_nothing_running():
    marker = f"marker{uuid.uuid4().hex}"
    ops = {
        "join the root pids cgroup": "open('/sys/fs/cgroup/pids/cgroup.procs', 'w').write(str(os.getpid()))",
        "join the root cgroup v2": "open('/sys/fs/cgroup/cgroup.procs', 'w').write(str(os.getpid()))",
        "mount cgroupfs": LIBC + "os.makedirs('cg', exist_ok=True)\n"
                                 "assert libc.mount(b'cgroup', b'cg', b'cgroup', 0, b'pids') == 0, os.strerror(ctypes.get_errno())",
        # a daemon: double fork, new session, stdio closed, then sleep with a marker in its argv
        "detach": f"if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                  f"        os.closerange(0, 1024)\n        os.execv('{os.path.realpath('/proc/self/exe')}', "
                  f"['python', '-c', 'import time; time.sleep(60)', '{marker}'])\n    os._exit(0)\n"
                  "os.wait()\ntime_ok = True",
    }
    r, done = attack(try_all(ops))
    assert succeeded(done) == ["detach"], done  # the daemon starts, inside the sandbox
    assert r.status is S.OK
    deadline = time.monotonic() + 2
    while leftovers(marker) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert leftovers(marker) == []  # and dies with it


def test_reading_the_parents_proc_and_environment_fails(monkeypatch):
    secret = f"sk-{uuid.uuid4().hex}"
    monkeypatch.setenv("TURNWISE_TEST_SECRET", secret)  # the trainer's environment holds a secret
    ops = {f"{p}/{f}": f"print(open('/proc/{p}/{f}', 'rb').read())"
           for p in ("self", "1", str(os.getpid()), str(os.getppid())) for f in ("environ", "cmdline", "mem")}
    ops |= {"list /proc": "print(os.listdir('/proc'))", "mount proc": LIBC + "os.makedirs('p', exist_ok=True)\n"
            "assert libc.mount(b'proc', b'p', b'proc', 0, None) == 0, os.strerror(ctypes.get_errno())",
            "sysrq": "os.close(os.open('/proc/sysrq-trigger', os.O_WRONLY))",
            "core_pattern": "os.close(os.open('/proc/sys/kernel/core_pattern', os.O_WRONLY))"}
    r, done = attack(try_all(ops))
    assert succeeded(done) == [], done
    assert secret not in json.dumps(done) + r.stdout + r.stderr
    r = sandbox(f"result = open('/proc/{os.getpid()}/environ').read()")
    assert r.status is not S.OK and secret not in r.stdout + r.stderr


@pytest.mark.parametrize("path", [str(TASK_DATA), str(REPO / "src" / "turnwise" / "config" / "__init__.py"), "/etc/passwd",
                                  "/etc/shadow", os.path.expanduser("~/.bash_history"), str(REPO), "/work", "/home"])
def test_reading_task_data_and_host_files_fails(path: str):
    ops = {"read": f"print(len(open({path!r}, 'rb').read()))", "list": f"assert os.listdir({path!r}) is not None",
           "stat": f"os.stat({path!r})"}
    r, done = attack(try_all(ops))
    assert succeeded(done) == [], done
    r = sandbox(f"result = open({path!r}).read()")
    assert r.status is not S.OK and r.result is None


def test_only_the_allow_list_is_visible():
    script = ("import json, os\nseen = []\nfor d, dirs, files in os.walk('/'):\n"
              "    if d.startswith(('/usr/lib', '/dev')) or d.startswith(os.path.realpath(os.path.dirname(os.__file__))):\n"
              "        dirs[:] = []\n        continue\n    seen += [os.path.join(d, f) for f in files]\n"
              "print(json.dumps(seen))")
    r, seen = attack(script.replace("print(json.dumps(seen))", "print(json.dumps({'seen': seen}))"))
    allowed = (os.path.realpath(os.sys.base_prefix), "/opt/turnwise/_sandbox_child.py")
    outside = [f for f in seen["seen"] if not f.startswith(allowed) and "/sb-" not in f]
    assert outside == [], outside[:20]  # no host file but the interpreter, the libraries and its own dir


def test_ptrace_fails():
    # the trainer and its parent by their host pids (bwrap's init, pid 1 inside, holds no capabilities)
    ops = {f"attach {p}": LIBC + f"assert libc.ptrace(16, {p}, None, None) == 0, os.strerror(ctypes.get_errno())\n"
           f"libc.ptrace(17, {p}, None, None)" for p in (os.getpid(), os.getppid())}
    ops["seize"] = LIBC + f"assert libc.ptrace(0x4206, {os.getpid()}, None, None) == 0, os.strerror(ctypes.get_errno())"
    r, done = attack(try_all(ops))
    assert succeeded(done) == [], done
    assert "TracerPid:\t0" in Path("/proc/self/status").read_text()
    assert sandbox("import ctypes").status is S.BLOCKED  # hooked code cannot even load ctypes


def test_unshare_inside_fails():
    ops = {name: LIBC + f"assert libc.unshare({flag}) == 0, os.strerror(ctypes.get_errno())"
           for name, flag in (("user", 0x10000000), ("mount", 0x20000), ("net", 0x40000000), ("pid", 0x20000000),
                              ("user+mount", 0x10020000))}
    r, done = attack(try_all(ops))
    assert succeeded(done) == [], done
    r = sandbox("import subprocess\np = subprocess.run(['unshare', '-r', 'id'], capture_output=True, text=True)\n"
                "result = p.returncode", SUBPROCESS)
    skip_if_subprocesses_refused(r)
    assert r.result not in (0, None), (r.result, r.stderr)


def test_writing_to_dev_shm_stays_private_and_bounded():
    name = f"escape-{uuid.uuid4().hex}"
    ops = {"write /dev/shm": f"open('/dev/shm/{name}', 'w').write('pwned')",
           "fill /dev/shm": "f = open('/dev/shm/fill', 'wb')\nfor _ in range(64): f.write(b'x' * (1 << 20))\nf.flush()"}
    r, done = attack(try_all(ops))
    assert "fill /dev/shm" not in succeeded(done)  # bounded: file_size_mb, and the tmpfs's size
    assert not Path(f"/dev/shm/{name}").exists()  # the host's /dev/shm never saw it
    assert sandbox(f"open('/dev/shm/{name}', 'w')").status is S.BLOCKED


def test_kernel_interfaces_are_read_only():
    ops = {"/sys": "print(os.listdir('/sys'))", "sethostname": LIBC + "assert libc.sethostname(b'pwned', 5) == 0, os.strerror(ctypes.get_errno())",
           "kmsg": "open('/dev/kmsg', 'rb').read(1)", "block device": "open('/dev/vda', 'rb').read(1)",
           "raw socket": "socket.socket(socket.AF_PACKET, socket.SOCK_RAW)",
           "setuid 0": "os.setuid(0)", "mknod": "os.mknod('sda', 0o60600, os.makedev(8, 0))"}
    host_name = socket.gethostname()
    r, done = attack(try_all(ops))
    assert succeeded(done) == [], done
    assert socket.gethostname() == host_name
    r, ids = attack("import ctypes, json, os\nlibc = ctypes.CDLL(None)\n"
            "print(json.dumps({'uid': os.getuid(), 'euid': os.geteuid(), 'no_new_privs': libc.prctl(39, 0, 0, 0, 0),"
            " 'cap_sys_admin': libc.prctl(23, 21, 0, 0, 0), 'groups': os.getgroups()}))")
    # PR_GET_NO_NEW_PRIVS = 1; PR_CAPBSET_READ(CAP_SYS_ADMIN) = 0: not even in the bounding set
    assert ids == {"uid": 65534, "euid": 65534, "no_new_privs": 1, "cap_sys_admin": 0, "groups": ids["groups"]}


@pytest.fixture
def listeners():
    """A TCP listener on the host's loopback and an abstract unix socket; both record connections."""
    tcp = socket.create_server(("127.0.0.1", 0))
    unix = socket.socket(socket.AF_UNIX)
    name = f"\0turnwise-escape-{uuid.uuid4().hex}"
    unix.bind(name)
    unix.listen()
    hits: list[str] = []
    stop = threading.Event()

    def serve(s: socket.socket, label: str) -> None:
        s.settimeout(0.1)
        while not stop.is_set():
            try:
                s.accept()[0].close()
                hits.append(label)
            except OSError:
                pass

    threads = [threading.Thread(target=serve, args=a, daemon=True) for a in ((tcp, "tcp"), (unix, "unix"))]
    for t in threads:
        t.start()
    yield tcp.getsockname()[1], name, hits
    stop.set()
    for t in threads:
        t.join()
    tcp.close()
    unix.close()


def test_network_from_an_unhooked_interpreter_fails(listeners):
    port, abstract, hits = listeners
    ops = {"tcp loopback": f"socket.create_connection(('127.0.0.1', {port}), timeout=1)",
           "abstract unix socket": f"s = socket.socket(socket.AF_UNIX)\ns.connect({abstract!r})",
           "dns": "socket.getaddrinfo('pypi.org', 443)", "internet": "socket.create_connection(('1.1.1.1', 53), timeout=1)"}
    r, done = attack(try_all(ops))
    assert succeeded(done) == [], done
    assert hits == []


def test_another_sandbox_is_invisible(tmp_path: Path):
    async def main() -> tuple[SandboxResult, SandboxResult]:
        victim = asyncio.create_task(run_python(
            "import time\nopen('secret.txt', 'w').write('mine')\ntime.sleep(2)\nresult = open('secret.txt').read()",
            limits=LIMITS, root=tmp_path))
        await asyncio.sleep(0.8)
        victim_dir = next(p for p in tmp_path.iterdir() if p.is_dir())
        script = try_all({"list siblings": f"assert len(os.listdir({str(tmp_path)!r})) > 1",
                          "read": f"open({str(victim_dir / 'secret.txt')!r}).read()",
                          "write": f"open({str(victim_dir / 'secret.txt')!r}, 'w').write('stolen')"})
        attacker = await run_python(UNHOOKED + f"result = unhooked({script!r})\n", limits=LIMITS, root=tmp_path)
        return await victim, attacker

    victim, attacker = asyncio.run(main())
    assert succeeded(attacker.result) == [], attacker.result
    assert victim.status is S.OK and victim.result == "mine"


def test_fork_bomb_that_bypasses_the_audit_hook_is_bounded_and_cleaned_up():
    marker = f"bomb{uuid.uuid4().hex}"
    script = f"import os\n'{marker}'\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    code = UNHOOKED + f"result = unhooked({script!r})\n"
    t0 = time.monotonic()
    r = sandbox(code, SandboxLimits(wall_s=2, cpu_s=1, processes=16))
    assert r.status is not S.OK and time.monotonic() - t0 < 6
    assert leftovers(marker) == []
    assert subprocess.run(["true"]).returncode == 0  # the host can still start processes


def test_links_out_of_the_directory_do_not_reach_host_files(tmp_path: Path):
    host_file = tmp_path / "precious.txt"
    host_file.write_text("keep")
    ops = {"hardlink": f"os.link({str(host_file)!r}, 'h')", "symlink then write": f"os.symlink({str(host_file)!r}, 's')\n"
           "open('s', 'w').write('pwned')", "rename out": f"os.rename('main.py', {str(tmp_path / 'x')!r})"}
    r, done = attack(try_all(ops), root=tmp_path / "sb")
    assert succeeded(done) == [], done
    assert host_file.read_text() == "keep" and not (tmp_path / "x").exists()  # the cleanup did not follow 's'


def test_huge_outputs_are_capped():
    limits = SandboxLimits(wall_s=5, output_bytes=4096)
    assert sandbox("import sys\nwhile True: sys.stderr.write('x' * 65536)", limits).status is S.OUTPUT_LIMIT
    r = sandbox("import os\nos.write(1, b'x' * (64 << 20))", limits)
    assert r.status is S.OUTPUT_LIMIT and len(r.stdout) == 4096
    # 256 MB into the status pipe: read and dropped past 4 MB, and no forged line counts
    t0 = time.monotonic()
    r = sandbox("import json, os, sys\nfd = json.loads(sys.argv[1])['status_fd']\n"
                "for _ in range(64): os.write(fd, b'{\"result\": \"' + b'x' * (4 << 20) + b'\"}\\n')\nresult = 1", limits)
    # the flood drowns only the code's own result (past the cap), never the parent's memory or clock
    assert r.status is S.OK and r.result is None and time.monotonic() - t0 < 5


def test_the_status_channel_cannot_forge_or_hide_the_outcome():
    status_fd = "import json, os, sys\nfd = json.loads(sys.argv[1])['status_fd']\n"
    forged = sandbox(status_fd + "os.write(fd, b'{\"isolation\": [\"forged\"]}\\n{\"violation\": \"x\"}\\n')\n"
                     "os.close(fd)\nopen('/tmp/x', 'w')")
    assert forged.status is S.BLOCKED and forged.exit_code == VIOLATION_EXIT  # closing the pipe hid nothing
    assert "forged" not in forged.isolation and forged.isolation[0] == "bwrap"
    hidden = sandbox("try:\n    open('/tmp/x', 'w')\nexcept BaseException:\n    pass\nresult = 'nothing happened'")
    assert hidden.status is S.BLOCKED and hidden.result is None  # a refused operation cannot be caught
    closed_all = sandbox("import os\nos.closerange(3, 1024)\nimport socket\nsocket.socket()")
    assert closed_all.status is S.BLOCKED
    late = sandbox(status_fd + "os.write(fd, b'{\"result\": 1}\\n')\nimport time\ntime.sleep(60)",
                   SandboxLimits(wall_s=0.5))
    assert late.status is S.TIMEOUT  # a result line does not make a killed run OK
    crash = sandbox(status_fd + "os.write(fd, b'{\"result\": 1}\\n')\nos.kill(os.getpid(), 9)")
    assert crash.status is S.ERROR and crash.exit_code == -signal.SIGKILL
