"""Where a job's command runs. Both executors run the same command line (`turnwise train` or
`turnwise eval` under `turnwise.service.launch`), so a job is the CLI's code path, nothing else.

- `LocalExecutor`: a subprocess of this machine in its own session (it survives the service);
  its handle `pid:start_time` finds it again after a restart, and never a recycled pid.
- `RayExecutor`: a Ray job through Ray's job submission API; its handle is the submission id.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import psutil


@dataclass(frozen=True)
class Launch:
    """One run of a job's command."""

    name: str
    """A unique name for this run (the job id and attempt)."""
    argv: tuple[str, ...]
    """The command, e.g. (python, -m, turnwise.cli, train, config.yaml)."""
    cwd: Path
    log_path: Path
    """Its stdout and stderr, appended."""
    exit_path: Path
    """Where `turnwise.service.launch` writes the exit code."""
    env: dict[str, str] = field(default_factory=dict)
    """Added to the service's environment."""
    num_gpus: float = 0.0
    memory_mb: int | None = None


@dataclass(frozen=True)
class RunState:
    running: bool
    exit_code: int | None
    """None while running, and for a process that vanished without an exit code (lost)."""


class Executor(Protocol):
    def start(self, launch: Launch) -> str:
        """Start the command; its handle."""
        ...

    def state(self, handle: str, launch: Launch) -> RunState: ...

    def stop(self, handle: str) -> None:
        """Ask the command to stop (SIGTERM: checkpoint, then exit)."""
        ...


def wrapped(launch: Launch) -> list[str]:
    return [sys.executable, "-m", "turnwise.service.launch", str(launch.exit_path), "--", *launch.argv]


def read_exit(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


class LocalExecutor:
    """Subprocesses of this machine."""

    def __init__(self) -> None:
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    def start(self, launch: Launch) -> str:
        launch.exit_path.unlink(missing_ok=True)
        with launch.log_path.open("ab") as log:
            proc = subprocess.Popen(wrapped(launch), cwd=launch.cwd, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, env={**os.environ, **launch.env})
        self._children[proc.pid] = proc
        return f"{proc.pid}:{psutil.Process(proc.pid).create_time()}"

    def _process(self, handle: str) -> psutil.Process | None:
        pid, _, started = handle.partition(":")
        if not pid.isdigit():
            return None
        child = self._children.get(int(pid))
        if child is not None and child.poll() is not None:  # reap our own exited children
            del self._children[int(pid)]
            return None
        try:
            proc = psutil.Process(int(pid))
            if abs(proc.create_time() - float(started)) > 1e-3 or proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
            return None

    def state(self, handle: str, launch: Launch) -> RunState:
        if self._process(handle) is not None:
            return RunState(True, None)
        return RunState(False, read_exit(launch.exit_path))

    def stop(self, handle: str) -> None:
        proc = self._process(handle)
        if proc is not None:
            proc.send_signal(signal.SIGTERM)


class RayExecutor:
    """Jobs on a Ray cluster, submitted through its job submission API (the dashboard address).
    The cluster's nodes must see the service's state directory and work directory at the same
    paths (a shared file system), as a job writes its run directory there."""

    TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}

    def __init__(self, address: str) -> None:
        from ray.job_submission import JobSubmissionClient

        self.client = JobSubmissionClient(address)

    def start(self, launch: Launch) -> str:
        launch.exit_path.unlink(missing_ok=True)
        entrypoint = (f"cd {shlex.quote(str(launch.cwd))} && {shlex.join(wrapped(launch))} "
                      f">> {shlex.quote(str(launch.log_path))} 2>&1")
        return self.client.submit_job(entrypoint=entrypoint, submission_id=launch.name,
                                      runtime_env={"env_vars": launch.env} if launch.env else None,
                                      entrypoint_num_gpus=launch.num_gpus or None,
                                      entrypoint_memory=launch.memory_mb * 1024 * 1024 if launch.memory_mb else None)

    def state(self, handle: str, launch: Launch) -> RunState:
        status = str(self.client.get_job_status(handle).value)
        if status not in self.TERMINAL:
            return RunState(True, None)
        code = read_exit(launch.exit_path)
        if code is None and status == "SUCCEEDED":
            code = 0
        return RunState(False, code)

    def stop(self, handle: str) -> None:
        self.client.stop_job(handle)


def make_executor(kind: str, ray_address: str | None) -> Executor:
    if kind == "ray":
        if not ray_address:
            raise ValueError("executor ray needs ray_address (the Ray dashboard URL, e.g. http://127.0.0.1:8265)")
        return RayExecutor(ray_address)
    return LocalExecutor()
