"""Run blocking work off the event loop, in one bounded thread pool shared by every episode.

Sync tools and state hashes block: a 2 MB JSON state takes tens of milliseconds to hash, and
with a thousand rollouts on one event loop every blocked millisecond delays every other
rollout's next model request. `run_blocking` hands such work to a pool of at most
`MAX_THREADS` threads (CPython's default for `ThreadPoolExecutor`: cpu count + 4, at most 32),
so at most that many blocking calls run at once and the loop keeps serving.

Cancellation: the awaiting task is cancelled only after the thread has finished, so a tool
never runs on an episode that its rollout has already closed.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

MAX_THREADS = min(32, (os.cpu_count() or 1) + 4)
"""Threads in the pool (blocking calls that can run at once)."""

_pool: ThreadPoolExecutor | None = None
_lock = threading.Lock()


def executor() -> ThreadPoolExecutor:
    """The shared pool, created on first use."""
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=MAX_THREADS, thread_name_prefix="turnwise-env")
        return _pool


async def run_blocking(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` in the shared pool, with the caller's context variables."""
    ctx = contextvars.copy_context()
    future = asyncio.get_running_loop().run_in_executor(executor(), functools.partial(ctx.run, fn, *args, **kwargs))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        # the thread cannot be interrupted: let it finish before the caller tears the episode down
        await asyncio.wait([future])
        raise
