"""`serve_agent(fn)`: host an agent for push dispatch, the managed agent SDK's contract.

    POST /rollout  {"instance", "prompt", "metadata": {"job_arn", "trajectory_id", "endpoint", ...},
                    "inference_params", "model_name"}  -> runs fn under `rollout_handler`
                   or AgentCore's {"prompt", "metadata": {"jobArn", "rolloutId"}, "inferenceParams"}
    GET  /health   -> {"status": "healthy"}

Either payload reaches `fn` with both sets of names filled in (`normalize_payload`).

By default `/rollout` answers when the rollout is over: 200 `{"status": "completed" | "failed",
"trajectory_id", "error"?}` (the outcome was already reported to the runtime server). With
`wait=False` it answers 202 at once and runs the rollout in the background.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
from collections.abc import Callable
from typing import Annotated, Any

import anyio
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from turnwise.adapter.context import normalize_payload
from turnwise.adapter.handler import rollout_handler

LOOPBACK = ("127.0.0.1", "::1", "localhost")


class RolloutMetadataIn(BaseModel):
    model_config = ConfigDict(extra="allow")

    job_arn: str | None = None
    jobArn: str | None = None
    trajectory_id: str | None = None
    rolloutId: str | None = None
    endpoint: str | None = None
    region: str | None = None


class RolloutRequestIn(BaseModel):
    """The push payload (field names as the managed service sends them)."""

    model_config = ConfigDict(extra="allow")

    instance: dict[str, Any] | None = Field(None, description="The task row (SDK payload)")
    prompt: str | list[Any] | dict[str, Any] | None = Field(None, description="The prompt (AgentCore payload)")
    metadata: RolloutMetadataIn
    inference_params: dict[str, Any] | None = None
    inferenceParams: dict[str, Any] | None = None
    model_name: str | None = None


class RolloutAccepted(BaseModel):
    status: str = Field(description="completed | failed (wait=True), accepted (wait=False)")
    trajectory_id: str
    error: str | None = None


def create_agent_app(fn: Callable[..., Any], *, base_url: str | None = None, api_key: str | None = None,
                     inbound_api_key: str | None = None, max_concurrency: int = 64, wait: bool = True) -> FastAPI:
    """The agent server app. `fn` is an agent function (wrapped in `rollout_handler` unless it is);
    `base_url`/`api_key`: the runtime server to report to; `inbound_api_key`: the bearer key the
    trainer must send to `/rollout`."""
    handler = fn if getattr(fn, "__turnwise_rollout_handler__", False) else rollout_handler(
        fn, base_url=base_url, api_key=api_key)
    is_async = inspect.iscoroutinefunction(handler)
    limit = asyncio.Semaphore(max_concurrency)
    background: set[asyncio.Task[Any]] = set()
    app = FastAPI(title="turnwise agent", version="1")
    app.state.background = background

    async def run(payload: dict[str, Any]) -> dict[str, Any]:
        trajectory_id = str(payload["metadata"]["trajectory_id"])
        async with limit:
            try:
                if is_async:
                    await handler(payload)
                else:  # contextvars are copied into the worker thread
                    await anyio.to_thread.run_sync(handler, payload)
            except Exception as e:  # already reported as failed by rollout_handler
                return {"status": "failed", "trajectory_id": trajectory_id, "error": f"{type(e).__name__}: {e}"}
        return {"status": "completed", "trajectory_id": trajectory_id}

    @app.post("/rollout", response_model=RolloutAccepted)
    async def rollout(body: RolloutRequestIn,
                      authorization: Annotated[str | None, Header()] = None) -> Any:
        """Run one rollout of the agent."""
        if inbound_api_key is not None and not hmac.compare_digest(
                (authorization or "").encode(), f"Bearer {inbound_api_key}".encode()):
            return JSONResponse({"error": {"message": "invalid API key", "code": 401}}, status_code=401)
        payload = normalize_payload(body.model_dump(exclude_none=True))
        if not payload["metadata"].get("trajectory_id"):
            return JSONResponse({"error": {"message": "metadata.trajectory_id (or metadata.rolloutId) is required",
                                           "code": 400}}, status_code=400)
        if payload.get("instance") is None:
            return JSONResponse({"error": {"message": "the payload needs instance (SDK) or prompt (AgentCore)",
                                           "code": 400}}, status_code=400)
        if wait:
            return await run(payload)
        task = asyncio.create_task(run(payload))
        background.add(task)
        task.add_done_callback(background.discard)
        return JSONResponse({"status": "accepted", "trajectory_id": payload["metadata"]["trajectory_id"]},
                            status_code=202)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "healthy"}

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}" for e in exc.errors()]
        return JSONResponse({"error": {"message": "invalid rollout request: " + "; ".join(parts), "code": 400}},
                            status_code=400)

    return app


def serve_agent(fn: Callable[..., Any], *, host: str = "127.0.0.1", port: int = 8080, **kwargs: Any) -> None:
    """Serve `create_agent_app(fn, **kwargs)` with uvicorn until interrupted (blocks).

    Binding beyond loopback requires `inbound_api_key`, which the trainer then sends."""
    import uvicorn

    if host not in LOOPBACK and not kwargs.get("inbound_api_key"):
        raise ValueError(f"refusing to serve the agent on {host} without inbound_api_key")
    uvicorn.run(create_agent_app(fn, **kwargs), host=host, port=port, log_level="warning")
