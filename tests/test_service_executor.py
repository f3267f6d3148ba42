"""The local executor and the scheduler's decisions, on real processes: a job outlives the
executor that started it and is found again by its handle (never a recycled pid); a stop is a
SIGTERM the job answers by checkpointing; `max_runtime_s` stops it; a job whose process vanished
is resumed from its checkpoint, then failed with the reason once `max_resumes` is spent."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from turnwise.service import scheduler as scheduler_module
from turnwise.service.db import ServiceStore
from turnwise.service.executors import Launch, LocalExecutor
from turnwise.service.jobs import CreateJob, create_job
from turnwise.service.scheduler import Scheduler
from turnwise.service.settings import ServiceConfig

ROOT = Path(__file__).parent.parent
DEMO = ROOT / "examples" / "support_desk" / "config.yaml"
# a stand-in for `turnwise train`: checkpoints on SIGTERM and exits 130, as the trainer does
SLEEPER = ("import signal, sys, time, pathlib\n"
           "def stop(*_):\n    pathlib.Path(sys.argv[1]).write_text('checkpoint'); sys.exit(130)\n"
           "signal.signal(signal.SIGTERM, stop)\nprint('ready', flush=True)\ntime.sleep(120)\n")


def _wait(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.1)


def _launch(tmp_path: Path) -> Launch:
    return Launch(name="j-0", argv=(sys.executable, "-c", SLEEPER, str(tmp_path / "ckpt")), cwd=tmp_path,
                  log_path=tmp_path / "log.txt", exit_path=tmp_path / "exit_code")


def test_a_job_outlives_its_executor_and_stops_gracefully(tmp_path: Path) -> None:
    launch = _launch(tmp_path)
    handle = LocalExecutor().start(launch)
    _wait(lambda: "ready" in launch.log_path.read_text())
    restarted = LocalExecutor()  # a new service process knows the job only by its handle
    assert restarted.state(handle, launch).running
    pid, started = handle.split(":")
    assert not restarted.state(f"{pid}:{float(started) - 5}", launch).running  # same pid, other process
    restarted.stop(handle)
    _wait(lambda: not restarted.state(handle, launch).running)
    assert restarted.state(handle, launch).exit_code == 130  # passed on by the launch wrapper
    assert (tmp_path / "ckpt").read_text() == "checkpoint"


def test_a_killed_job_has_no_exit_code(tmp_path: Path) -> None:
    launch = _launch(tmp_path)
    ex = LocalExecutor()
    handle = ex.start(launch)
    _wait(lambda: "ready" in launch.log_path.read_text())
    os.kill(int(handle.split(":")[0]), signal.SIGKILL)
    _wait(lambda: not ex.state(handle, launch).running)
    assert ex.state(handle, launch).exit_code is None


@pytest.fixture()
def queue(tmp_path: Path, monkeypatch):
    """A scheduler whose jobs run the stand-in instead of `turnwise train` (everything else is real)."""
    calls: list[bool] = []

    def command(job, port: int, resume: bool) -> list[str]:
        calls.append(resume)
        return [sys.executable, "-c", SLEEPER, str(Path(job.job_dir) / "ckpt")]

    monkeypatch.setattr(scheduler_module, "command", command)
    svc = ServiceConfig(state_dir=str(tmp_path / "state"), workdir=str(ROOT), max_concurrent_jobs=1, max_resumes=1)
    store = ServiceStore(svc.db_url())
    tenant = store.create_tenant("t")
    return svc, store, tenant.id, Scheduler(svc, store, LocalExecutor()), calls


def _job(queue, name: str, **kwargs):
    svc, store, tenant_id, _, _ = queue
    job, _ = create_job(CreateJob(name=name, config=str(DEMO.read_text()), **kwargs), svc, store, tenant_id, "http://x")
    return job


def test_capacity_max_runtime_and_resume_after_a_lost_process(queue) -> None:
    svc, store, _, sched, calls = queue
    first = _job(queue, "first", max_runtime_s=1.0)
    second = _job(queue, "second")
    sched.tick()
    assert [store.job(j.id).status for j in (first, second)] == ["InProgress", "Pending"]  # capacity 1
    _wait(lambda: (Path(first.job_dir) / "log.txt").is_file() and "ready" in (Path(first.job_dir) / "log.txt").read_text())
    time.sleep(1.1)
    sched.tick()
    assert store.job(first.id).status == "Stopping"
    _wait(lambda: (sched.tick(), store.job(first.id).status)[1] == "Stopped")
    row = store.job(first.id)
    assert row.reason == "max_runtime_s (1 s) reached" and (Path(row.job_dir) / "ckpt").is_file()

    # the second job starts; its process is killed (no exit code): resumed once, then failed
    sched.tick()
    assert store.job(second.id).status == "InProgress"
    run = Path(second.job_dir) / "run" / "r"
    (run / "checkpoints" / "step_1").mkdir(parents=True)
    (run / "config.yaml").write_text("{}\n")
    for attempt in range(2):
        job = store.job(second.id)
        log = Path(job.job_dir) / "log.txt"
        _wait(lambda log=log, n=attempt + 1: log.is_file() and log.read_text().count("ready") == n)
        os.kill(int(job.handle.split(":")[0]), signal.SIGKILL)
        _wait(lambda n=attempt + 1: (sched.tick(), store.job(second.id).resumes)[1] == n or
              store.job(second.id).status == "Failed")
    row = store.job(second.id)
    assert calls == [False, False, True] and row.resumes == 1
    assert row.status == "Failed" and "died without an exit code" in row.reason
