"""Which vLLM replica serves a request (`policy.vllm_engine.VLLMEngine`'s routing)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Collection

_AFFINITY_ENTRIES = 100_000


class Router:
    """Which replica serves a request: prefix affinity by `cache_key`, else the least loaded.
    Thread-safe; the caller `release`s what `pick` returned."""

    def __init__(self, n: int) -> None:
        self.load = [0] * n
        self.up = [True] * n
        self._home: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def pick(self, cache_key: str | None, exclude: Collection[int] = ()) -> int | None:
        """A live replica not in `exclude` (None: there is none now); counts the request on it."""
        with self._lock:
            live = [i for i, ok in enumerate(self.up) if ok and i not in exclude]
            if not live:
                return None
            home = self._home.get(cache_key) if cache_key is not None else None
            choice = home if home in live else min(live, key=lambda i: (self.load[i], i))
            if cache_key is not None:
                self._home[cache_key] = choice
                self._home.move_to_end(cache_key)
                while len(self._home) > _AFFINITY_ENTRIES:
                    self._home.popitem(last=False)
            self.load[choice] += 1
            return choice

    def release(self, i: int) -> None:
        with self._lock:
            self.load[i] -= 1

    def set_up(self, i: int, up: bool) -> None:
        with self._lock:
            self.up[i] = up
