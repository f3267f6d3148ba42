"""The Ray executor: a local Ray head on CPU, started by the test, runs a service job (a real
`turnwise eval` of the base tiny model on one task) through Ray's job submission API; the job
completes with its usage metered, exactly as under the local executor."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from turnwise.service.db import ServiceStore
from turnwise.service.jobs import CreateJob, create_job
from turnwise.service.scheduler import Scheduler
from turnwise.service.settings import ServiceConfig

ROOT = Path(__file__).parent.parent
DEMO = ROOT / "examples" / "support_desk" / "config.yaml"
RAY = shutil.which("ray") or (str(Path(os.sys.executable).parent / "ray")
                              if (Path(os.sys.executable).parent / "ray").exists() else None)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(RAY is None, reason="needs ray[default] (pip install -e '.[test]')")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def ray_head(tmp_path: Path):
    pytest.importorskip("ray.job_submission", reason="needs ray[default]")
    dashboard = _free_port()
    temp = Path("/tmp") / f"rt{os.getpid()}"  # Ray's socket paths must stay short
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([RAY, "start", "--head", "--num-cpus=2", f"--port={_free_port()}", "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--temp-dir={temp}",
                    "--disable-usage-stats"], check=True, env=env, capture_output=True, timeout=300)
    try:
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + 120
        while True:  # the dashboard's job API comes up after `ray start` returns
            try:
                JobSubmissionClient(f"http://127.0.0.1:{dashboard}").list_jobs()
                break
            except Exception:
                assert time.monotonic() < deadline, "the Ray dashboard did not come up"
                time.sleep(1)
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_executor_runs_a_job_to_completion(ray_head: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]))
    svc = ServiceConfig(state_dir=str(tmp_path / "state"), workdir=str(ROOT), executor="ray", ray_address=ray_head,
                        poll_interval_s=0.5, prices={"*": {"sample": 1.0}})
    from turnwise.service.executors import make_executor

    store = ServiceStore(svc.db_url())
    tenant = store.create_tenant("team-a")
    scheduler = Scheduler(svc, store, make_executor(svc.executor, svc.ray_address))
    body = CreateJob(name="ray-eval", category="eval", config=str(DEMO.read_text()), model="base",
                     overrides=[f"data.test_path={DEMO.parent / 'data' / 'test.jsonl'}", "agent.function=e2e_agent:agent",
                                "eval.max_tasks=1", "eval.group_size=1", "sampling_max_tokens=8",
                                "tracking.progress=false", "tracking.mlflow=false"])
    job, _ = create_job(body, svc, store, tenant.id, "http://127.0.0.1:1")
    deadline = time.monotonic() + 600
    while True:
        scheduler.tick()
        row = store.job(job.id)
        if row.status in ("Completed", "Failed", "Stopped"):
            break
        assert time.monotonic() < deadline, row.status
        time.sleep(1)
    log = (Path(row.job_dir) / "log.txt").read_text()[-2000:]
    assert row.status == "Completed", (row.reason, log)
    assert row.handle == f"{job.id}-0"  # the Ray submission id
    from ray.job_submission import JobSubmissionClient

    assert str(JobSubmissionClient(ray_head).get_job_status(row.handle).value) == "SUCCEEDED"
    assert row.usage["sample_tokens"] > 0 and row.progress["done"] == 1
