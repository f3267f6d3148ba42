"""`turnwise worker` killed mid-rollout (kill -9): its lease expires, the task is queued again with
a fresh trajectory, a second worker finishes it, and the trainer counts it once."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from turnwise.rollout.pull import WorkerDispatcher
from turnwise.runtime.server import RuntimeServer
from turnwise.runtime.store import TrajectoryStore
from turnwise.runtime.tasks import TaskQueue, TaskStatus
from turnwise.runtime.testing import stub_app
from turnwise.types import FailureKind, Task, TrajectoryStatus

AGENT = textwrap.dedent("""
    import asyncio, os

    async def agent(task, client, ctx):
        await client.chat.completions.create(model=ctx.model, messages=[{"role": "user", "content": task["prompt"]}])
        if os.environ.get("HANG_AFTER_FIRST_TURN"):
            await asyncio.sleep(3600)
        return 1.0
""")


def start_worker(cwd, url: str, hang: bool) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "HANG_AFTER_FIRST_TURN"}
    if hang:
        env["HANG_AFTER_FIRST_TURN"] = "1"
    return subprocess.Popen([sys.executable, "-m", "turnwise.cli", "worker", "--agent", "kill_agent:agent",
                             "--server", url, "--concurrency", "2", "--lease-seconds", "1", "--poll-interval", "0.05"],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_killed_worker_task_is_requeued_and_counted_once(tmp_path):
    (tmp_path / "kill_agent.py").write_text(AGENT)
    store = TrajectoryStore(tmp_path / "t.db", "job-1")
    procs: list[subprocess.Popen] = []

    async def scenario(url: str):
        dispatcher = WorkerDispatcher(model="stub", store=store, timeout=30.0, max_retries=2, poll_interval=0.02)
        trainer = asyncio.create_task(dispatcher.run_groups([Task("t", {"id": "t", "prompt": "hello"})], 1, {}))
        procs.append(start_worker(tmp_path, url, hang=True))
        deadline = time.monotonic() + 60
        while not any(t.turns for t in store.list()):  # the first worker is mid-rollout
            assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].stdout.read()
            await asyncio.sleep(0.02)
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait()
        procs.append(start_worker(tmp_path, url, hang=False))
        return await asyncio.wait_for(trainer, 60)

    try:
        with RuntimeServer(stub_app(store, reply="Done.")) as server:
            [group] = asyncio.run(scenario(server.base_url))
            procs[1].send_signal(signal.SIGTERM)  # graceful: stops leasing, exits 0
            out, _ = procs[1].communicate(timeout=30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[1].returncode == 0, out
    assert "1 done, 0 failed" in out
    [result] = group.rollouts_G
    assert result.trajectory.status == TrajectoryStatus.REWARDED and result.trajectory.rewards == (1.0,)
    first, second = sorted(t.id for t in store.list())
    task_id = first.removesuffix(".a1")
    assert (first, second, result.trajectory.id) == (f"{task_id}.a1", f"{task_id}.a2", f"{task_id}.a2")
    dead = store.get(f"{task_id}.a1")
    assert dead.status == TrajectoryStatus.FAILED and "lease expired" in dead.error and len(dead.turns) == 1
    state = TaskQueue(store).get(task_id)
    assert (state.status, state.attempt) == (TaskStatus.DONE, 2)
    assert store.stats().trajectories_by_status == {"in_progress": 0, "ready": 0, "failed": 1, "rewarded": 1,
                                                    "abandoned": 0}
    assert dead.failure == FailureKind.WORKER_LOST and result.retried == (FailureKind.WORKER_LOST,)
