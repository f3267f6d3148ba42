"""Run blocking work off the event loop, in one bounded thread pool shared by every episode.

Sync tools and state hashes block: a 2 MB JSON state takes tens of milliseconds to hash, and
with a thousand rollouts on one event loop every blocked millisecond delays every other
rollout's next model request. `run_blocking` hands such work to a pool of `max_threads()`
threads (2 unless `configure` says otherwise), so the loop keeps serving between them.

Why so few: tools and hashes are mostly Python holding the GIL, so more threads add no
throughput, only contention for the GIL with the event loop's thread. Measured with
`bench/env_state.py`'s workload (256 episodes, 2 MB JSON state each, 2-core machine), the
event loop's p99 lag was 850 ms with 6 threads (`ThreadPoolExecutor`'s default here), 82 ms
with 2 and 29 ms with 1, at about the same wall time. Tools that mostly wait (a sync HTTP
call, a slow disk) want more: `configure(max_threads=16)`.

Cancellation: the awaiting task is cancelled only after the thread has finished, so a tool
never runs on an episode that its rollout has already closed.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

_max_threads = 2
_pool: ThreadPoolExecutor | None = None
_lock = threading.Lock()


def max_threads() -> int:
    """Threads in the pool: blocking calls that can run at once."""
    return _max_threads


def configure(*, max_threads: int) -> None:
    """Resize the pool; calls already running finish on the old one."""
    global _max_threads, _pool
    if max_threads < 1:
        raise ValueError(f"max_threads must be >= 1, got {max_threads}")
    with _lock:
        _max_threads = max_threads
        old, _pool = _pool, None
    if old is not None:
        old.shutdown(wait=False)


def executor() -> ThreadPoolExecutor:
    """The shared pool, created on first use."""
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=_max_threads, thread_name_prefix="turnwise-env")
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
