"""turnwise.adapter: what the agent side imports.

- `RolloutContext`, `current_rollout`, `headers()`, `rollout_scope`: which trajectory a model call
  belongs to (contextvars, so concurrent rollouts are told apart).
- `RolloutContext.async_openai()` / `.openai()`: OpenAI clients that send the trajectory headers;
  `http_client()` / `async_http_client()`: httpx clients whose hooks add them per request (for
  LangChain's `ChatOpenAI(http_client=..., http_async_client=...)` and similar).
- `FeedbackClient` / `SyncFeedbackClient`: complete-rollout and update-reward, retried and idempotent.
- `@rollout_handler`: run an agent function on a push payload and report its outcome.
- `serve_agent(fn)` / `create_agent_app(fn)`: host `POST /rollout` and `GET /health`.

Agents written for the managed service's agent SDK (`sagemaker.train.rft`) need no change: point
`metadata.endpoint` (and the OpenAI base URL) at the turnwise runtime. Its feedback client sends
opaque signed AWS bearer tokens that turnwise cannot verify; a runtime without API keys (loopback
only) ignores them, and a runtime with keys accepts them from loopback peers only when created
with `opaque_tokens_on_loopback=True` (see `turnwise.runtime.auth`).
"""

from turnwise.adapter.agent_server import create_agent_app, serve_agent
from turnwise.adapter.clients import async_http_client, http_client
from turnwise.adapter.context import (
    RolloutContext,
    current_rollout,
    headers,
    normalize_payload,
    rollout_scope,
)
from turnwise.adapter.feedback import FeedbackClient, FeedbackError, SyncFeedbackClient
from turnwise.adapter.handler import outcome_of, rollout_handler

__all__ = [
    "FeedbackClient", "FeedbackError", "RolloutContext", "SyncFeedbackClient", "async_http_client",
    "create_agent_app", "current_rollout", "headers", "http_client", "normalize_payload", "outcome_of",
    "rollout_handler", "rollout_scope", "serve_agent",
]
