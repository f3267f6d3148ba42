"""`turnwise worker --agent module:function --server URL [--concurrency N]`: a pull worker.

Leases rollouts from a runtime server (the trainer's, or `turnwise serve`), runs the agent on
each, heartbeats, and reports. SIGINT/SIGTERM: stop leasing and finish the running rollouts;
a second signal exits at once (those leases expire and their tasks are queued again).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from urllib.parse import urlparse

from turnwise.adapter.worker import Worker, WorkerError, load_function


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--agent", required=True, metavar="MODULE:FUNCTION",
                        help="agent function: async def agent(task, client, ctx), or a @rollout_handler function")
    parser.add_argument("--server", required=True, metavar="URL", help="runtime server, e.g. http://trainer:8000")
    parser.add_argument("--concurrency", type=int, default=1, metavar="N", help="rollouts at once (default 1)")
    parser.add_argument("--api-key", default=os.environ.get("TURNWISE_API_KEY"),
                        help="the runtime's bearer key (default: $TURNWISE_API_KEY)")
    parser.add_argument("--lease-seconds", type=float, default=60.0,
                        help="lease length; heartbeats every third of it (default 60)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per rollout (default: the trainer's agent.rollout_timeout)")
    parser.add_argument("--poll-interval", type=float, default=0.5, help="seconds between empty polls")
    parser.add_argument("--worker-id", default=None, help="name in the task queue (default: host-pid-random)")
    parser.add_argument("--max-tasks", type=int, default=None, help="exit after this many tasks")


def _check_url(url: str) -> str | None:
    """Why `url` cannot be a runtime server URL, or None."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return f"--server {url!r} is not an http(s) URL, e.g. http://127.0.0.1:8000"
    try:
        parsed.port  # noqa: B018 (validates the port)
    except ValueError as e:
        return f"--server {url!r}: {e}"
    return None


def run(args: argparse.Namespace) -> int:
    if (problem := _check_url(args.server)) is not None:
        print(f"turnwise worker: error: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll and heartbeat otherwise
    try:
        worker = Worker(load_function(args.agent), args.server, api_key=args.api_key,
                        concurrency=args.concurrency, lease_seconds=args.lease_seconds, timeout=args.timeout,
                        poll_interval=args.poll_interval, worker_id=args.worker_id, max_tasks=args.max_tasks)
    except ValueError as e:
        print(f"turnwise worker: error: {e}", file=sys.stderr)
        return 2
    print(f"turnwise worker {worker.worker_id}: leasing from {worker.server_url}, "
          f"concurrency {worker.concurrency}", flush=True)
    try:
        asyncio.run(_serve(worker))
    except WorkerError as e:
        print(f"turnwise worker: error: {e}", file=sys.stderr)
        return 2
    print(f"turnwise worker {worker.worker_id}: {worker.completed} done, {worker.failed} failed, "
          f"{worker.lost} leases lost", flush=True)
    return 0


async def _serve(worker: Worker) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()

    def on_signal() -> None:
        if stop.is_set() and main is not None:
            main.cancel()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    with contextlib.suppress(asyncio.CancelledError):
        await worker.run(stop)
