"""The one command: start the SQL agent's server, train against it, stop it.

    .venv/bin/python -m examples.sql_agent.run [--set key=value ...]     # from the repository root

1. starts `agent.py` (uvicorn, `serve_agent`) as a separate process on a free 127.0.0.1 port and
   waits for its `GET /health`: the agent lives outside the trainer, as it would in production;
2. runs the training job of `config.yaml` (`agent.kind: http`, `agent.url` set to that server):
   warm start, validation, RL steps, validation;
3. prints the validation reward before and after RL and where the run went;
4. stops the server, also when training fails or is interrupted (Ctrl-C checkpoints and stops;
   the server runs in its own session, so it keeps serving until the trainer is done with it).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from turnwise.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
CONFIG = Path(__file__).with_name("config.yaml")
HEALTH_TIMEOUT_S = 30.0


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = HEALTH_TIMEOUT_S) -> None:
    """Poll `GET {url}/health` until 200; fail early if the server process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the agent server exited with code {proc.returncode} before it was healthy")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"the agent server at {url} was not healthy within {timeout:g}s")


def stop(proc: subprocess.Popen[bytes], grace_s: float = 5.0) -> None:
    """SIGTERM (uvicorn shuts down cleanly), then SIGKILL if it lingers."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def agent_server(port: int) -> Iterator[str]:
    """`python -m examples.sql_agent.agent --port PORT` in its own session; yields its URL."""
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "examples.sql_agent.agent", "--port", str(port)],
                            cwd=REPO, env=env, start_new_session=True)
    try:
        wait_healthy(url, proc)
        yield url
    finally:
        stop(proc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of config.yaml (repeatable), e.g. --set max_steps=10")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    port = free_port()
    try:  # a bad override fails here, before any process starts
        cfg = load_config(CONFIG, [*args.overrides, f"agent.url=http://127.0.0.1:{port}"])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from turnwise.train.job import run_train_checked

    with agent_server(port) as url:
        print(f"agent server: examples.sql_agent.agent on {url}; training {CONFIG.relative_to(REPO)}")
        try:
            result, summary = run_train_checked(cfg)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    print(f"val reward (temperature 0): after warm start {fmt(result.val_reward_before_rl)}, "
          f"after {result.steps} RL steps {fmt(result.val_reward_after_rl)}")
    print(f"wall time: {time.perf_counter() - started:.0f} s")
    if summary["mlflow_run_id"]:
        print(f"mlflow: {summary['mlflow_tracking_uri']} (run {summary['mlflow_run_id']})")
    print(f"run: {result.run_dir}")
    if result.interrupted:
        print(f"interrupted after step {result.steps} (checkpoint saved); resume with "
              f"turnwise train --resume {result.run_dir} --set agent.url=<a running agent server>")
        return 130
    return 0


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    sys.exit(main())
