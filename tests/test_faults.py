"""Faults injected into real runs, each asserting that nothing recorded is lost or counted twice:
an agent server down for 3 s (dispatch pauses, the rollouts retry and all train), down for good
(the run stops with a checkpoint and one line, and resumes), the trainer killed with -9 mid-step
under default settings (it resumes from the automatic checkpoint; the cut step's trajectories are
abandoned, not counted), and an agent returning per-turn rewards of the wrong length (that
rollout fails with a typed reason, the step goes on)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from test_dispatch_push import PARAMS, TASKS, dispatcher, runtime
from test_train_resume import run, small_config
from turnwise.adapter import RolloutContext, create_agent_app
from turnwise.config import RunStopped
from turnwise.runtime.server import RuntimeServer
from turnwise.train.checkpoint import latest_checkpoint
from turnwise.types import FailureKind, TrajectoryStatus

ROOT = Path(__file__).parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def slow_push_agent(payload: dict, ctx: RolloutContext) -> float:
    await asyncio.sleep(0.3)
    client = ctx.async_openai()
    try:
        r = await client.chat.completions.create(model=ctx.model, messages=[{"role": "user", "content": "hi"}],
                                                 **ctx.sampling_kwargs())
    finally:
        await client.close()
    return float(bool(r.choices[0].message.content))


def test_an_agent_server_down_for_3s_pauses_dispatch_and_loses_no_rollout(tmp_path):
    port = _free_port()
    server = RuntimeServer(create_agent_app(slow_push_agent), port=port).start()

    def restart() -> None:
        time.sleep(0.5)
        server.stop()
        time.sleep(3.0)
        server.__init__(create_agent_app(slow_push_agent), port=port)
        server.start()

    with runtime(tmp_path) as (base_url, store):
        d = dispatcher(f"http://127.0.0.1:{port}", base_url, store, concurrency=2, max_retries=3,
                       unavailable_timeout=30.0, retry_backoff=0.05)
        restarter = threading.Thread(target=restart)
        restarter.start()
        try:
            groups = asyncio.run(d.run_groups(TASKS * 2, 2, PARAMS))
        finally:
            restarter.join()
            server.stop()
        results = [r for g in groups for r in g.rollouts_G]
        assert len(results) == 8 and all(r.trajectory.status == TrajectoryStatus.REWARDED for r in results)
        retried = [k for r in results for k in r.retried]
        assert retried and set(retried) == {FailureKind.TRANSPORT}
        stats = store.stats().trajectories_by_status
        assert stats["rewarded"] == 8 and stats["failed"] == len(retried) and stats["in_progress"] == 0


def test_an_agent_server_gone_for_good_stops_the_run_with_a_checkpoint_and_it_resumes(tmp_path):
    port = _free_port()
    handled = [0]

    async def agent(payload: dict, ctx: RolloutContext) -> float:
        handled[0] += 1
        if handled[0] == 4:  # the last rollout of step 1: the server goes away right after
            threading.Timer(0.2, server.stop).start()
        return await slow_push_agent(payload, ctx)

    server = RuntimeServer(create_agent_app(agent), port=port).start()
    cfg = small_config(tmp_path, **{"agent.kind": "http", "agent.url": f"http://127.0.0.1:{port}",
                                    "agent.unavailable_timeout": 1.0, "agent.retry_backoff": 0.05})
    run_dir = tmp_path / "run"
    with pytest.raises(RunStopped, match=r"is not healthy .* after 1s .*stopped after step 1, checkpoint .*"
                                         r"step_00001: resume with `turnwise train --resume"):
        run(cfg, None, run_dir)
    server.stop()
    assert latest_checkpoint(run_dir).name == "step_00001"
    with RuntimeServer(create_agent_app(slow_push_agent), port=port):
        result = run(cfg, None, run_dir)
    assert result.start_step == 1 and result.steps == 2
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["rollout/abandoned"] for r in rows if "rollout/abandoned" in r] == [0]  # step 2 never began
    db = sqlite3.connect(run_dir / "trajectories.db")
    counts = dict(db.execute("select status, count(*) from trajectories group by status").fetchall())
    assert counts == {"rewarded": 2 * 4}  # two steps of 2 tasks x 2 rollouts, none twice, none lost


AGENT = '''
import asyncio

async def agent(task, client, ctx):
    await asyncio.sleep(0.4)
    r = await client.chat.completions.create(model=ctx.model, messages=[{"role": "user", "content": task["question"]}],
                                             **ctx.inference_params)
    return min(1.0, len(r.choices[0].message.content or "") / 20)
'''


@pytest.mark.slow
def test_kill_9_mid_step_with_default_settings_resumes_and_counts_nothing_twice(tmp_path):
    (tmp_path / "slow_agent.py").write_text(AGENT)
    cfg = small_config(tmp_path, **{"max_steps": 3, "max_epochs": 2, "agent.function": "slow_agent:agent",
                                    "agent.concurrency": 1})
    assert cfg.save_every == "auto"  # the default
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({**cfg.model_dump(mode="json"), "output_dir": str(tmp_path / "runs")}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT / "src")])}
    trainer = subprocess.Popen([sys.executable, "-m", "turnwise.cli", "train", str(job)], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    runs = tmp_path / "runs"
    deadline = time.monotonic() + 300
    run_dir = None
    while time.monotonic() < deadline:  # step 1 checkpointed and step 2's rollouts under way
        dirs = [d for d in runs.glob("*") if d.is_dir()] if runs.exists() else []
        if dirs and latest_checkpoint(dirs[0]) is not None and (dirs[0] / "trajectories.db").exists():
            db = sqlite3.connect(dirs[0] / "trajectories.db")
            if db.execute("select count(*) from trajectories").fetchone()[0] > 4:
                run_dir = dirs[0]
                break
        time.sleep(0.1)
    assert run_dir is not None, trainer.stdout.read().decode() if trainer.poll() is not None else "timed out"
    trainer.send_signal(signal.SIGKILL)
    trainer.wait(30)
    saved = latest_checkpoint(run_dir).name
    resumed = subprocess.run([sys.executable, "-m", "turnwise.cli", "train", "--resume", str(run_dir)], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("rollout/abandoned", 0) for r in rows) >= 1
    assert max(r["step"] for r in rows if "speed/step_s" in r) == 3
    db = sqlite3.connect(run_dir / "trajectories.db")
    counts = dict(db.execute("select status, count(*) from trajectories group by status").fetchall())
    assert counts["rewarded"] == 3 * 4 and counts.get("in_progress", 0) == 0 and counts.get("ready", 0) == 0, \
        (saved, counts)


def test_wrong_length_rewards_fail_that_rollout_and_the_step_goes_on(tmp_path):
    calls = [0]

    async def agent(task, client, ctx):
        calls[0] += 1
        first = calls[0] == 1
        await client.chat.completions.create(model=ctx.model, messages=[{"role": "user", "content": "hi"}],
                                             **ctx.inference_params)
        return [1.0, 0.5, 0.0] if first else 1.0  # three rewards for a one-turn rollout

    result = run(small_config(tmp_path, max_steps=1), agent, tmp_path / "run")
    assert result.steps == 1
    rows = [json.loads(line) for line in (tmp_path / "run" / "rollouts" / "step_00001.jsonl").read_text().splitlines()]
    bad = [r for r in rows if r["status"] == "failed"]
    assert len(bad) == 1 and bad[0]["failure"] == "bad_reward" and "3 rewards for a trajectory of 1 turns" in bad[0]["error"]
    assert sum(r["status"] == "rewarded" for r in rows) == 3
    metrics = next(json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
                   if "rollout/failed" in line)
    assert metrics["rollout/failed_bad_reward"] == 1
