"""Usage x prices: what a job or a tenant owes, in USD, per dimension and in total."""

from __future__ import annotations

from collections.abc import Mapping

from turnwise.rollout.usage import USAGE_KEYS
from turnwise.service.settings import Prices

PRICE_OF = {"prefill_tokens": "prefill", "prefill_cached_tokens": "prefill_cached", "sample_tokens": "sample",
            "train_tokens": "train"}
"""Usage dimension -> its field in `Prices` (USD per million tokens)."""


def zero_usage() -> dict[str, int]:
    return {k: 0 for k in USAGE_KEYS}


def cost_of(usage: Mapping[str, int], prices: Prices | None) -> dict[str, float] | None:
    """{dimension: USD, ..., "total": USD}; None when the model has no price."""
    if prices is None:
        return None
    out = {k: int(usage.get(k, 0)) * getattr(prices, PRICE_OF[k]) / 1e6 for k in USAGE_KEYS}
    out["total"] = sum(out.values())
    return out


def add_usage(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
    return {k: int(a.get(k, 0)) + int(b.get(k, 0)) for k in USAGE_KEYS}
