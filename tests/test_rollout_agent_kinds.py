"""`turnwise verify` and `turnwise eval --endpoint` with every agent kind: the same agent function
in process (python), behind an agent server (http) and in a pull worker (worker), all run through
the shared dispatchers, give the same verdicts and the same hand-computed metrics."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from test_eval_endpoint import TASKS, scripted_app
from turnwise.adapter import create_agent_app
from turnwise.adapter.worker import Worker, as_rollout_handler
from turnwise.config import JobConfig, load_config
from turnwise.eval import evaluate
from turnwise.eval.verify import CheckStatus, verify_environment
from turnwise.runtime.server import RuntimeServer
from turnwise.types import Task
from verify_envs import notes
from verify_envs.policy import CHAT, scripted_policy

KINDS = ("python", "http", "worker")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def agent_of_kind(kind: str, fn: Any) -> Iterator[dict[str, Any]]:
    """Config overrides that run `fn` as an agent of `kind` (an agent server or a worker thread
    polling the runtime's fixed port while the block runs)."""
    if kind == "python":
        yield {"agent": {"kind": "python"}}
        return
    if kind == "http":
        with RuntimeServer(create_agent_app(as_rollout_handler(fn))) as server:
            yield {"agent": {"kind": "http", "url": server.base_url}}
        return
    port = _free_port()
    stop = threading.Event()
    worker = Worker(fn, f"http://127.0.0.1:{port}", concurrency=8, poll_interval=0.02)

    async def work() -> None:
        stopped = asyncio.Event()
        run = asyncio.create_task(worker.run(stopped))
        while not stop.is_set():
            await asyncio.sleep(0.02)
        stopped.set()
        await run

    thread = threading.Thread(target=asyncio.run, args=(work(),), daemon=True)
    thread.start()
    try:
        yield {"agent": {"kind": "worker", "rollout_timeout": 30, "queue_timeout": 60}, "runtime": {"port": port}}
    finally:
        stop.set()
        thread.join(30)


@pytest.mark.parametrize("kind", KINDS)
def test_verify_runs_every_agent_kind(kind):
    tasks = [Task(id=r["id"], row=r) for r in notes.TASKS[:3]]
    with agent_of_kind(kind, notes.agent) as overrides:
        cfg = JobConfig.model_validate({"sampling_max_tokens": 256, **overrides})
        agent = notes.agent if kind == "python" else cfg.agent
        report = asyncio.run(verify_environment(agent, tasks, policy=scripted_policy(), chat=CHAT, cfg=cfg,
                                                concurrency=4, production_schemas=notes.TOOLBOX.schemas(),
                                                oracle_agent=notes.oracle))
    checks = {c.name: c for c in report.checks}
    assert report.ok, report.render()
    assert all(c.status == CheckStatus.PASS for c in checks.values()), report.render()
    # the tool responses of every task were replayed and compared, whatever the kind
    assert checks["reproducibility"].summary.startswith("3 tasks replayed: 6 tool responses")
    assert checks["isolation"].summary.startswith("4 concurrent rollouts match")


def test_verify_of_a_broken_environment_fails_over_http_too():
    tasks = [Task(id=r["id"], row=r) for r in notes.TASKS[:2]]
    with agent_of_kind("http", notes.agent_nondeterministic) as overrides:
        cfg = JobConfig.model_validate({"sampling_max_tokens": 256, **overrides})
        report = asyncio.run(verify_environment(cfg.agent, tasks, policy=scripted_policy(), chat=CHAT, cfg=cfg))
    repro = next(c for c in report.checks if c.name == "reproducibility")
    assert repro.status == CheckStatus.FAIL and "add_note" in {f.tool for f in repro.findings}


@pytest.mark.parametrize("kind", KINDS)
def test_eval_endpoint_runs_every_agent_kind(kind, tmp_path, monkeypatch):
    import json
    from pathlib import Path

    import lookup_agent

    monkeypatch.chdir(Path(__file__).parent.parent)
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(t) + "\n" for t in TASKS))
    job = tmp_path / "job.yaml"
    job.write_text(f"output_dir: {tmp_path / 'runs'}\ndata: {{test_path: test.jsonl}}\n"
                   "agent: {function: 'lookup_agent:agent', rollout_timeout: 30}\n"
                   "tracking: {mlflow: false}\neval: {group_size: 4, bootstrap_samples: 50}\n")
    with RuntimeServer(scripted_app()) as endpoint, agent_of_kind(kind, lookup_agent.agent) as overrides:
        sets = [f"agent.{k}={v}" for k, v in overrides["agent"].items()]
        sets += [f"runtime.{k}={v}" for k, v in overrides.get("runtime", {}).items()]
        result = evaluate(load_config(job, sets), endpoint.base_url + "/v1", tmp_path / "ev")
    m = result.metrics
    # the scripted endpoint: t0 always right, t1 right on every other call, t2 never (the same
    # table as the in-process test of test_eval_endpoint.py)
    assert m["eval/exact_match"] == pytest.approx(0.5) and m["eval/failed/frac"] == 0
    assert m["eval/turns/mean"] == pytest.approx(2.0) and m["eval/tool_calls/mean"] == pytest.approx(1.0)
    assert m["eval/tokens/mean"] == pytest.approx(10.0)
