"""Sandbox: results come back; every escape attempt is stopped, reported, and leaves the host intact.

Limits are tight so each case takes well under a second (the CPU case about one). Where a
check depends on an OS layer the host may refuse (namespaces), it is skipped unless that
layer was active, and the layer is read from the result itself.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import threading
import uuid
from pathlib import Path

import pytest

from turnwise.env import sandbox
from turnwise.env.sandbox import SandboxLimits, SandboxStatus, SandboxUnavailable, run_python, run_sql

TIGHT = SandboxLimits(wall_s=5, cpu_s=1, memory_mb=256, file_size_mb=1, processes=8, output_bytes=4096)
S = SandboxStatus


def run(code: str, limits: SandboxLimits = TIGHT, **kw):
    return asyncio.run(run_python(code, limits=limits, **kw))


def sandbox_processes() -> list[int]:
    """Processes still running our sandbox child (there must be none after a run)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if b"_sandbox_child.py" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            pass
    return found


def test_result_stdout_inputs_files():
    r = run("import helper\nprint('hello')\nresult = {'sum': sum(inputs['xs']), 'h': helper.VALUE}",
            inputs={"xs": [1, 2, 3]}, files={"helper.py": "VALUE = 7\n"})
    assert r.status is S.OK, r.stderr
    assert (r.stdout, r.exit_code, r.result) == ("hello\n", 0, {"sum": 6, "h": 7})
    assert "audit" in r.isolation and "rlimits" in r.isolation


def test_exception_and_exit_code():
    r = run("raise ValueError('bad input')")
    assert r.status is S.ERROR and r.exit_code == 1
    assert r.error == "ValueError: bad input" and "ValueError: bad input" in r.stderr
    assert run("import sys; sys.exit(3)").exit_code == 3


def test_infinite_loop_hits_cpu_limit():
    r = run("while True: pass")
    assert r.status is S.CPU_LIMIT
    assert r.wall_s < 4


def test_sleeping_forever_hits_wall_limit():
    r = run("import time; time.sleep(60)", SandboxLimits(wall_s=0.5))
    assert r.status is S.TIMEOUT and r.exit_code is None
    assert r.wall_s < 2
    assert sandbox_processes() == []


def test_cancelling_the_caller_kills_the_child():
    async def main():
        task = asyncio.create_task(run_python("import time; time.sleep(60)", limits=TIGHT))
        await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert sandbox_processes() == []


@pytest.mark.parametrize("code", ["x = bytearray(1 << 34)", "xs = []\nwhile True: xs.append(' ' * 10**7)"])
def test_memory_bomb_is_stopped(code):
    r = run(code)
    assert r.status is S.MEMORY_LIMIT, (r.status, r.stderr[-300:])


def test_fork_bomb_is_blocked_by_default():
    r = run("import os\nwhile True: os.fork()")
    assert r.status is S.BLOCKED
    assert r.violations == ("starting a process (os.fork)",)
    assert run("import subprocess; subprocess.run(['true'])").status is S.BLOCKED
    assert sandbox_processes() == []


def test_fork_bomb_with_subprocesses_allowed_is_bounded_and_cleaned_up():
    limits = SandboxLimits(wall_s=1.5, cpu_s=1, memory_mb=256, processes=8, allow_subprocess=True)
    r = run("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", limits)
    # bounded by the pids cgroup / RLIMIT_NPROC, then CPU or wall limits end the spinning survivors;
    # a root host with neither layer refuses to start processes at all
    assert r.status in (S.CPU_LIMIT, S.TIMEOUT, S.PROCESS_LIMIT, S.BLOCKED), r.status
    assert sandbox_processes() == []
    r = run("import os\nwhile True: os.fork()", limits)
    assert r.status in (S.PROCESS_LIMIT, S.BLOCKED), r.status
    assert sandbox_processes() == []


@pytest.fixture
def listener():
    """A TCP server on the host's loopback that records whether anyone connected."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.1)
    hits: list[bool] = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                srv.accept()[0].close()
                hits.append(True)
            except OSError:
                pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1], hits
    stop.set()
    t.join()
    srv.close()


def test_without_bwrap_it_refuses_unless_told_to_run_weaker_layers(monkeypatch):
    monkeypatch.setattr(sandbox, "bwrap_problem", lambda: "bubblewrap (bwrap) is not installed")
    monkeypatch.setenv("TURNWISE_SANDBOX_REQUIRE_ISOLATION", "1")  # the default (conftest lowers it without bwrap)
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap.*require_isolation: false"):
        run("result = 1")
    r = run("result = 1", SandboxLimits(wall_s=5, require_isolation=False))
    assert r.status is S.OK and r.result == 1
    assert "bwrap" not in r.isolation and any("require_isolation off" in n for n in r.notes)
    monkeypatch.setenv("TURNWISE_SANDBOX_REQUIRE_ISOLATION", "0")  # what sandbox.require_isolation: false sets
    assert run("result = 2").result == 2


@pytest.mark.parametrize("namespaces", [True, False])
def test_network_call_is_blocked(listener, namespaces, monkeypatch):
    port, hits = listener
    if not namespaces:  # the weaker layers alone, without namespaces: the audit hook still refuses sockets
        monkeypatch.setattr(sandbox, "bwrap_problem", lambda: "bubblewrap (bwrap) is not installed")
    limits = SandboxLimits(wall_s=5, namespaces=namespaces, require_isolation=None if namespaces else False)
    r = run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)", limits)
    assert r.status is S.BLOCKED
    assert any(v.startswith("network access") for v in r.violations)
    assert namespaces or "netns" not in r.isolation  # without a namespace, sockets are disabled
    assert run("import urllib.request; urllib.request.urlopen('http://example.com', timeout=1)",
               limits).status is S.BLOCKED
    assert hits == []


def test_network_namespace_stops_a_subprocess_too(listener):
    port, hits = listener
    code = (f"import subprocess, sys\n"
            f"p = subprocess.run([sys.executable, '-c', 'import socket; socket.create_connection((\"127.0.0.1\", {port}), timeout=1)'],"
            f" capture_output=True, text=True)\nprint(p.stderr)")
    r = run(code, SandboxLimits(wall_s=5, allow_subprocess=True))
    if "netns" not in r.isolation or r.status is S.BLOCKED:
        pytest.skip(f"no network namespace or no subprocesses here: {r.isolation} {r.notes}")
    assert "unreachable" in r.stdout.lower() or "refused" in r.stdout.lower()
    assert hits == []


@pytest.mark.parametrize("code", [
    "open({target!r}, 'w').write('pwned')",
    "import os\nos.open({target!r}, os.O_CREAT | os.O_WRONLY)",
    "open('../{name}', 'w').write('pwned')",
    "import os\nos.symlink({outside!r}, 'link')\nopen('link/{name}', 'w').write('pwned')",
    "import os\nfd = os.open({outside!r}, os.O_RDONLY)\nos.open({name!r}, os.O_CREAT | os.O_WRONLY, dir_fd=fd)",
    "import os\nos.rename('main.py', {target!r})",
    "import shutil\nshutil.copy('main.py', {target!r})",
])
def test_write_outside_its_directory_is_blocked(tmp_path: Path, code: str):
    outside = tmp_path / "host"
    outside.mkdir()
    root = tmp_path / "sandboxes"
    name = f"escape-{uuid.uuid4().hex}"
    target = outside / name
    r = run(code.format(target=str(target), outside=str(outside), name=name), root=root)
    absent = "bwrap" in r.isolation and r.status is S.ERROR and "No such file or directory" in r.stderr
    assert r.status is S.BLOCKED or absent, (r.status, r.stderr[-300:])  # under bwrap the host dir is not there
    assert r.violations or absent
    assert not target.exists() and not (root / name).exists()


def test_write_outside_from_a_subprocess_is_stopped_by_the_mount_namespace(tmp_path: Path):
    target = Path("/tmp") / f"escape-{uuid.uuid4().hex}"
    r = run(f"import os\nprint(os.system('echo pwned > {target}'))", SandboxLimits(wall_s=5, allow_subprocess=True))
    if "mountns-ro" not in r.isolation or r.status is S.BLOCKED:
        pytest.skip(f"no read-only mount namespace or no subprocesses here: {r.isolation} {r.notes}")
    assert "Read-only file system" in r.stderr
    assert not target.exists()


def test_concurrent_sandboxes_cannot_touch_each_other(tmp_path: Path):
    async def main():
        victim = asyncio.create_task(run_python(
            "import os, time\nopen('secret.txt', 'w').write('mine')\nprint(os.getcwd(), flush=True)\n"
            "time.sleep(1.5)\nresult = open('secret.txt').read()", limits=TIGHT, root=tmp_path))
        await asyncio.sleep(0.7)
        victim_dir = next(p for p in tmp_path.iterdir() if p.is_dir())
        attacker = await run_python(f"open({str(victim_dir / 'secret.txt')!r}, 'w').write('stolen')",
                                    limits=TIGHT, root=tmp_path)
        return await victim, attacker

    victim, attacker = asyncio.run(main())
    assert attacker.status is S.BLOCKED
    assert victim.status is S.OK and victim.result == "mine"
    assert list(tmp_path.iterdir()) == []  # both directories are gone


def test_output_is_capped():
    r = run("while True: print('x' * 1000)")
    assert r.status is S.OUTPUT_LIMIT and r.truncated
    assert len(r.stdout) == TIGHT.output_bytes


def test_file_size_limit():
    r = run("open('big.bin', 'wb').write(b'x' * (2 << 20))")
    assert r.status is S.FILE_SIZE_LIMIT


def test_sql_on_a_private_copy(tmp_path: Path):
    db = tmp_path / "shop.sqlite3"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE orders (id TEXT, total REAL)")
    conn.executemany("INSERT INTO orders VALUES (?, ?)", [("a", 1.5), ("b", 2.5), ("c", 4.0)])
    conn.commit()
    conn.close()

    r = asyncio.run(run_sql("SELECT id, total FROM orders WHERE total > 2 ORDER BY id", db=db, limits=TIGHT))
    assert r.status is S.OK, r.stderr
    assert r.result == {"columns": ["id", "total"], "rows": [["b", 2.5], ["c", 4.0]], "truncated": False}
    r = asyncio.run(run_sql("SELECT count(*) FROM orders", db=db, setup="DELETE FROM orders;", limits=TIGHT))
    assert r.result["rows"] == [[0]]
    assert sqlite3.connect(db).execute("SELECT count(*) FROM orders").fetchone() == (3,)  # host copy untouched
    r = asyncio.run(run_sql("SELECT * FROM nope", limits=TIGHT))
    assert r.status is S.ERROR and "no such table" in (r.error or "")
    r = asyncio.run(run_sql("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
                            "SELECT x FROM c", max_rows=5, limits=TIGHT))
    assert r.result["rows"] == [[1], [2], [3], [4], [5]] and r.result["truncated"] is True
    r = asyncio.run(run_sql("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
                            "SELECT count(*) FROM c", limits=TIGHT))
    assert r.status is S.CPU_LIMIT
