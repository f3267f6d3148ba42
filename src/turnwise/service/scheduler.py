"""The queue: start Pending jobs within `max_concurrent_jobs`, watch the running ones, finish them.

Each tick (every `poll_interval_s`, in one background thread):
1. For each running job (InProgress, Stopping): meter its run directory (`rollout.usage.run_usage`,
   recorded as events that only raise the totals), read progress and latest metrics, stop it
   when `max_runtime_s` is past, and when its command has exited, decide its end:
   exit 0 Completed (an eval whose gate failed, exit 1, too, with the reason); 130 after a stop
   Stopped; other codes Failed with the log's last error line; no exit code at all (the process
   vanished, e.g. the machine rebooted) resumed from its last checkpoint up to `max_resumes`
   times, else Failed with that reason.
2. Start the oldest Pending jobs while fewer than `max_concurrent_jobs` run.
Everything it decides is in the database before it acts on the next job, so a restarted service
(a new Scheduler on the same database) re-attaches running jobs by their handles and goes on.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from turnwise.rollout.usage import run_usage
from turnwise.service.db import Job, ServiceStore
from turnwise.service.executors import Executor, Launch
from turnwise.service.lifecycle import JobCategory, JobStatus
from turnwise.service.settings import ServiceConfig

log = logging.getLogger(__name__)

RUNNING = (JobStatus.IN_PROGRESS, JobStatus.STOPPING)
METRIC_PREFIXES = ("reward/", "loss/", "pass", "rollout/success", "exact_match", "mean_")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_run_dir(job: Job) -> Path | None:
    """Where the command writes: the eval directory, or the training run under `<job dir>/run/`."""
    if job.category == JobCategory.EVAL.value:
        return Path(job.job_dir) / "eval"
    runs = sorted(p for p in (Path(job.job_dir) / "run").glob("*/") if (p / "config.yaml").is_file())
    return runs[0] if runs else None


def command(job: Job, port: int, resume: bool) -> list[str]:
    """The job's `turnwise` command line (the CLI's code path: nothing of its own)."""
    cli = [sys.executable, "-m", "turnwise.cli"]
    port_set = ["--set", f"runtime.port={port}"]
    if job.category == JobCategory.TRAIN.value:
        if resume:
            return [*cli, "train", "--resume", str(job.run_dir), *port_set]
        return [*cli, "train", job.spec["config"], *port_set]
    target = job.spec["target"]
    which = ["--base"] if target == "base" else ["--checkpoint", target]
    out = ["--resume", str(Path(job.job_dir) / "eval")] if resume else ["--out", str(Path(job.job_dir) / "eval")]
    return [*cli, "eval", job.spec["config"], *which, *out, *port_set]


def error_line(log_path: Path) -> str:
    """The last line of a job's log that says what went wrong."""
    try:
        lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines()[-200:] if ln.strip()]
    except OSError:
        return "no log"
    for ln in reversed(lines):
        if ln.startswith(("turnwise: error:", "turnwise: stopped:")) or "Error:" in ln:
            return ln[:500]
    return (lines[-1] if lines else "no output")[:500]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_progress(job: Job, run_dir: Path) -> tuple[dict[str, Any], dict[str, float]]:
    """(progress {done, total, fraction}, latest metrics) from what the command has written."""
    total = int(job.spec.get("total") or 0)
    done, latest = 0, {}
    if job.category == JobCategory.TRAIN.value:
        path = run_dir / "metrics.jsonl"
        rows = []
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
        for row in rows:
            if "reward/mean" in row:
                done = max(done, int(row.get("step", 0)))
            latest |= {k: v for k, v in row.items() if isinstance(v, int | float) and k.startswith(METRIC_PREFIXES)}
    else:
        tasks = run_dir / "tasks.jsonl"
        done = len(tasks.read_text().splitlines()) if tasks.is_file() else 0
        summary = _read_json(run_dir / "summary.json") or {}
        latest = {k: v for k, v in summary.get("metrics", {}).items() if isinstance(v, int | float)}
    fraction = min(done / total, 1.0) if total else None
    return {"done": done, "total": total, "fraction": fraction}, latest


def artifacts(job: Job, run_dir: Path) -> dict[str, Any]:
    summary = _read_json(run_dir / "summary.json") or {}
    out: dict[str, Any] = {"run_dir": str(run_dir), "log": str(Path(job.job_dir) / "log.txt")}
    if (run_dir / "summary.json").is_file():
        out["summary"] = str(run_dir / "summary.json")
    if job.category == JobCategory.TRAIN.value:
        final = run_dir / "checkpoints" / "final"
        if final.is_dir():
            out["checkpoint"] = str(final)
        out |= {k: summary[k] for k in ("mlflow_tracking_uri", "mlflow_run_id", "registered_model", "reward_curve")
                if summary.get(k)}
    else:
        out |= {k: summary[k] for k in ("report", "mlflow_run_id", "passed") if k in summary}
    return out


def job_env() -> dict[str, str]:
    """What a job's command gets on top of its executor's environment: unbuffered output, and the
    service's PYTHONPATH (a Ray worker's environment is the cluster's, not the service's)."""
    env = {"PYTHONUNBUFFERED": "1"}
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env


class Scheduler:
    """Runs the queue in a daemon thread (`start`/`stop`), or one `tick()` at a time in tests."""

    def __init__(self, svc: ServiceConfig, store: ServiceStore, executor: Executor) -> None:
        self.svc, self.store, self.executor = svc, store, executor
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lock = threading.Lock()
        """Held while a tick changes jobs; the API's stop takes it too."""

    def launch_of(self, job: Job) -> Launch:
        job_dir = Path(job.job_dir)
        return Launch(name=f"{job.id}-{job.resumes}", argv=tuple(job.spec.get("argv") or ()), cwd=Path(self.svc.workdir).resolve(),
                      log_path=job_dir / "log.txt", exit_path=job_dir / "exit_code",
                      env=job_env(), num_gpus=self.svc.gpus_per_job,
                      memory_mb=self.svc.memory_mb_per_job)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="turnwise-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # one bad tick must not end the queue
                log.exception("scheduler tick failed")
            self._stop.wait(self.svc.poll_interval_s)

    def tick(self) -> None:
        with self.lock:
            for job in self.store.jobs(status=None):
                if JobStatus(job.status) in RUNNING:
                    self._watch(job)
            running = sum(1 for j in self.store.jobs() if JobStatus(j.status) in RUNNING)
            for job in self.store.jobs(status=JobStatus.PENDING):
                if running >= self.svc.max_concurrent_jobs:
                    break
                self._launch(job, resume=False)
                running += 1

    def _launch(self, job: Job, resume: bool) -> None:
        port = free_port()
        argv = command(job, port, resume)
        job = self.store.update_job(job.id, spec={**job.spec, "argv": argv}, runtime_port=port)
        try:
            handle = self.executor.start(self.launch_of(job))
        except Exception as e:  # the executor refused (Ray down, ...)
            self.store.update_job(job.id, status=JobStatus.FAILED, reason=f"could not start: {e}", ended_at=time.time())
            return
        values: dict[str, Any] = {"handle": handle}
        if not resume:
            values |= {"status": JobStatus.IN_PROGRESS, "started_at": time.time()}
        self.store.update_job(job.id, **values)

    def request_stop(self, job: Job, reason: str) -> Job:
        """Stop a job: a Pending one at once; a running one gracefully (checkpoint, then exit)."""
        status = JobStatus(job.status)
        if status == JobStatus.PENDING:
            return self.store.update_job(job.id, status=JobStatus.STOPPED, reason=reason, ended_at=time.time())
        if status == JobStatus.IN_PROGRESS:
            if job.handle:
                self.executor.stop(job.handle)
            return self.store.update_job(job.id, status=JobStatus.STOPPING, stop_reason=reason)
        return job

    def _watch(self, job: Job) -> None:
        run_dir = find_run_dir(job)
        if run_dir is not None:
            progress, latest = read_progress(job, run_dir)
            self.store.record_usage(job.id, run_usage(run_dir))
            job = self.store.update_job(job.id, run_dir=str(run_dir), progress=progress,
                                        metrics=latest or job.metrics)
        state = self.executor.state(job.handle or "", self.launch_of(job))
        if state.running:
            if (job.max_runtime_s and job.started_at and JobStatus(job.status) == JobStatus.IN_PROGRESS
                    and time.time() - job.started_at > job.max_runtime_s):
                self.request_stop(job, f"max_runtime_s ({job.max_runtime_s:g} s) reached")
            return
        self._finish(job, run_dir, state.exit_code)

    def _finish(self, job: Job, run_dir: Path | None, code: int | None) -> None:
        stopping = JobStatus(job.status) == JobStatus.STOPPING
        if code is None:
            resumable = run_dir is not None and (job.category == JobCategory.EVAL.value
                                                 or any((run_dir / "checkpoints").glob("*/")))
            if resumable and not stopping and job.resumes < self.svc.max_resumes:
                job = self.store.update_job(job.id, resumes=job.resumes + 1,
                                            reason=f"its process died; resumed from the last checkpoint "
                                                   f"({job.resumes + 1} of {self.svc.max_resumes})")
                self._launch(job, resume=True)
                return
            status, reason = JobStatus.FAILED, "its process died without an exit code" + (
                "" if resumable else " and there is no checkpoint to resume from")
            if stopping:
                status, reason = JobStatus.STOPPED, job.stop_reason
        elif code == 0 or (code == 1 and job.category == JobCategory.EVAL.value and run_dir is not None
                           and (run_dir / "summary.json").is_file()):
            status, reason = JobStatus.COMPLETED, None if code == 0 else "the evaluation's gate failed"
            if stopping:
                reason = f"completed before the stop took effect ({job.stop_reason})"
        elif stopping:
            status, reason = JobStatus.STOPPED, job.stop_reason
        else:
            status, reason = JobStatus.FAILED, f"exit code {code}: {error_line(Path(job.job_dir) / 'log.txt')}"
        values: dict[str, Any] = {"status": status, "reason": reason, "ended_at": time.time()}
        if run_dir is not None:
            summary = _read_json(run_dir / "summary.json") or {}
            self.store.record_usage(job.id, summary.get("usage") or run_usage(run_dir))
            values["artifacts"] = artifacts(job, run_dir)
        self.store.update_job(job.id, **values)
