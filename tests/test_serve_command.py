"""`turnwise serve` as a subprocess: prints its URL, answers /health and a chat completion from the
real OpenAI SDK with the built-in tiny model, records the trajectory, stops on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading

import httpx
import pytest

from turnwise.adapter import RolloutContext
from turnwise.runtime.store import TrajectoryStore


def turnwise(*args: str, cwd) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "turnwise.cli", *args], cwd=cwd, env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def first_line(proc: subprocess.Popen, timeout: float) -> str:
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return box[0] if box else ""


@pytest.mark.slow
def test_serve_answers_the_openai_sdk_and_records_the_trajectory(tmp_path):
    db = tmp_path / "serve.db"
    proc = turnwise("serve", "--port", "0", "--db", str(db), "--job", "served", "--set", "sampling_max_tokens=8",
                    cwd=tmp_path)
    try:
        line = first_line(proc, 120)
        match = re.search(r"at (http://127\.0\.0\.1:\d+) ", line)
        assert match, (line, proc.poll(), proc.stderr.read() if proc.poll() is not None else "")
        url = match.group(1)
        assert httpx.get(url + "/health").status_code == 200
        client = RolloutContext("traj-serve-1", url, "served").openai()
        r = client.chat.completions.create(model="served", messages=[{"role": "user", "content": "Hello"}],
                                           max_tokens=4, temperature=0)
        assert r.model == "served" and 1 <= r.usage.completion_tokens <= 4
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    t = TrajectoryStore(db, "served").get("traj-serve-1")
    assert t is not None and len(t.turns) == 1 and len(t.turns[0].completion_ids) == r.usage.completion_tokens


def test_serve_refuses_to_bind_beyond_loopback_without_keys(tmp_path):
    proc = turnwise("serve", "--host", "0.0.0.0", "--port", "0", cwd=tmp_path)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "refusing to serve on 0.0.0.0: beyond loopback the runtime needs API keys" in err
