"""kill -9 of the runtime server mid-step: every acknowledged turn, completion and reward survives,
and agents that were mid-rollout finish against the restarted server without losing a turn."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import httpx

from turnwise.adapter import FeedbackClient, RolloutContext
from turnwise.runtime.capture import build_segments
from turnwise.runtime.store import TrajectoryStore
from turnwise.types import TrajectoryStatus


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(db, port) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "turnwise.runtime.testing", "--db", str(db), "--job", "job",
                             "--port", str(port), "--reply", "Done."])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("stub runtime server did not start")


async def rollout(base_url: str, trajectory_id: str, after_turn_1: asyncio.Event | None,
                  reached: asyncio.Queue | None) -> None:
    ctx = RolloutContext(trajectory_id, base_url, "stub", {})
    client = ctx.async_openai(max_retries=8)  # the SDK's own retries carry it over the restart
    messages = [{"role": "user", "content": f"task {trajectory_id}"}]
    r = await client.chat.completions.create(model="stub", messages=messages)
    if after_turn_1 is not None:
        await reached.put(trajectory_id)
        await after_turn_1.wait()
    messages += [r.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": "next"}]
    await client.chat.completions.create(model="stub", messages=messages)
    await client.close()
    async with FeedbackClient(base_url, retries=10, backoff=0.2) as feedback:
        await feedback.complete_rollout(trajectory_id, "ready")
        await feedback.update_reward(trajectory_id, [0.5, 1.0])


def test_kill_9_mid_step_loses_nothing(tmp_path):
    db, port = tmp_path / "trajectories.db", free_port()
    base_url = f"http://127.0.0.1:{port}"
    proc = start_server(db, port)

    async def step() -> None:
        nonlocal proc
        # half the step finished before the crash ...
        await asyncio.gather(*(rollout(base_url, f"done-{i}", None, None) for i in range(8)))
        # ... the other half is mid-rollout (turn 1 recorded) when the server is killed
        go_on, reached = asyncio.Event(), asyncio.Queue()
        running = [asyncio.create_task(rollout(base_url, f"mid-{i}", go_on, reached)) for i in range(8)]
        for _ in running:
            await reached.get()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        go_on.set()  # agents now hit a dead server and retry
        await asyncio.sleep(0.3)
        proc = await asyncio.to_thread(start_server, db, port)
        await asyncio.gather(*running)

    try:
        asyncio.run(step())
    finally:
        proc.kill()
        proc.wait()

    store = TrajectoryStore(db, "job")
    trajectories = {t.id: t for t in store.list()}
    assert len(trajectories) == 16
    for t in trajectories.values():
        assert t.status == TrajectoryStatus.REWARDED and t.rewards == (0.5, 1.0)
        assert len(t.turns) == 2, t.id
        # the restarted server planned turn 2 from the durable turn 1: still one exact segment
        assert t.turns[1].reused_prompt_tokens == len(t.turns[0].prompt_ids) + len(t.turns[0].completion_ids)
        assert len(build_segments(t)) == 1
    stats = store.stats()
    assert stats.trajectories_by_status["rewarded"] == 16 and stats.usage.turns == 32
