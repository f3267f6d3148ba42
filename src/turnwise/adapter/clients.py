"""HTTP clients that put the current rollout's headers on every request.

For agent frameworks that take an httpx client rather than default headers, e.g. LangChain:

    llm = ChatOpenAI(base_url=ctx.openai_base_url, api_key="turnwise", model=ctx.model,
                     http_client=http_client(), http_async_client=async_http_client())

One client serves every rollout: each request reads `current_rollout` (a contextvar) when it is
sent, so concurrent rollouts in different asyncio tasks are told apart. Outside a rollout the
request goes out unchanged.
"""

from __future__ import annotations

from typing import Any

import httpx

from turnwise.adapter.context import current_rollout


def _inject(request: httpx.Request) -> None:
    ctx = current_rollout.get()
    if ctx is None:
        return
    request.headers.update(ctx.headers())
    if ctx.api_key:
        request.headers["Authorization"] = f"Bearer {ctx.api_key}"


async def _ainject(request: httpx.Request) -> None:
    _inject(request)


def _hooks(kwargs: dict[str, Any], hook: Any) -> dict[str, Any]:
    hooks = dict(kwargs.pop("event_hooks", None) or {})
    hooks["request"] = [*hooks.get("request", ()), hook]
    return hooks


def http_client(**kwargs: Any) -> httpx.Client:
    """An httpx.Client whose requests carry the current rollout's headers (kwargs go to httpx)."""
    kwargs.setdefault("timeout", httpx.Timeout(600.0, connect=10.0))
    return httpx.Client(event_hooks=_hooks(kwargs, _inject), **kwargs)


def async_http_client(**kwargs: Any) -> httpx.AsyncClient:
    """An httpx.AsyncClient whose requests carry the current rollout's headers."""
    kwargs.setdefault("timeout", httpx.Timeout(600.0, connect=10.0))
    return httpx.AsyncClient(event_hooks=_hooks(kwargs, _ainject), **kwargs)
