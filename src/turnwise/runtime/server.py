"""Run an ASGI app with uvicorn in a background thread, on a free port by default.

    with RuntimeServer(app) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="turnwise")

Binds 127.0.0.1 unless told otherwise, and refuses to bind beyond loopback when the app (a
`create_app` app) has no API keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import threading
import time
from typing import Any

import uvicorn


def _is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RuntimeServer:
    """uvicorn in a daemon thread; `start()` returns once the port accepts connections."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning",
                 start_timeout: float = 30.0) -> None:
        runtime = getattr(getattr(app, "state", None), "runtime", None)
        if not _is_loopback_host(host) and runtime is not None and not runtime.auth.enabled:
            raise ValueError(f"refusing to bind {host}: beyond loopback the runtime needs API keys "
                             "(create_app(api_keys=...))")
        self.app = app
        self.host = host
        self.port = port
        self.log_level = log_level
        self.start_timeout = start_timeout
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> RuntimeServer:
        if self._thread is not None:
            raise RuntimeError("server already started")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted sockets only for that proto
        # (without it, Nagle + delayed ACK add ~40 ms to every response)
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level=self.log_level, access_log=False, lifespan="off",
                                timeout_keep_alive=30, backlog=4096)
        self._server = uvicorn.Server(config)

        def run() -> None:
            try:
                asyncio.run(self._server.serve(sockets=[sock]))  # type: ignore[union-attr]
            except BaseException as e:  # reported by start()
                self._error = e
            finally:
                sock.close()

        self._thread = threading.Thread(target=run, name=f"turnwise-runtime-{self.port}", daemon=True)
        self._thread.start()
        self._wait_until_accepting()
        return self

    def _wait_until_accepting(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._error is not None or not self._thread.is_alive():  # type: ignore[union-attr]
                raise RuntimeError(f"runtime server failed to start: {self._error!r}")
            if self._server is not None and self._server.started:
                with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=1.0):
                    return
            time.sleep(0.01)
        self.stop()
        raise RuntimeError(f"runtime server did not start within {self.start_timeout} s")

    def stop(self, timeout: float = 10.0) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout)
        self._server = self._thread = None

    def __enter__(self) -> RuntimeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
