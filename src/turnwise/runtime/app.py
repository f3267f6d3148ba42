"""The runtime server's app factory: OpenAI-compatible and rollout routes over one trajectory store.

    app = create_app(sampler=engine, chat=chat_format, store=TrajectoryStore(path, job_id),
                     model_name="policy", default_params=default_sampling_params())
    with RuntimeServer(app) as server:   # turnwise.runtime.server
        ...  # agents call server.base_url + "/v1/chat/completions"

Every error is JSON in OpenAI's shape, `{"error": {"message", "type", "code"}}`: 400 malformed
body or missing trajectory header, 401 bad key, 403 key of another job, 404 unknown trajectory,
409 "not in valid status", 413 body too large, 500 without a traceback.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from turnwise.config import AgentConfig, RuntimeConfig
from turnwise.runtime import openai_routes, rollout_routes, task_routes
from turnwise.runtime.auth import Auth
from turnwise.runtime.deps import TRAJECTORY_HEADERS, ApiError, Runtime
from turnwise.runtime.protocols import Chat, Sampler
from turnwise.runtime.store import TrajectoryStore
from turnwise.types import SamplingParams

DEFAULT_MAX_BODY_BYTES = RuntimeConfig().max_body_bytes
"""The config's default (`runtime.max_body_bytes`): defaults live in `JobConfig` alone."""


class BodyLimit:
    """Refuse request bodies over `max_bytes` (by Content-Length up front, else while reading)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> StarletteHTTPException:
        return StarletteHTTPException(413, f"request body larger than {self.max_bytes} bytes")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await _send_error(send, ApiError(413, str(self._too_large().detail)))
                return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise self._too_large()  # FastAPI passes HTTPExceptions from body reading through
            return message

        await self.app(scope, limited, send)


async def _send_error(send: Send, error: ApiError) -> None:
    response = JSONResponse(error.body(), status_code=error.status)
    await send({"type": "http.response.start", "status": error.status, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            parts.append(f"body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})")
        elif not loc and err.get("type") == "missing":
            parts.append("a JSON body is required")
        else:
            parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg')}")
    return "invalid request: " + "; ".join(parts)


def _error_response(error: ApiError) -> JSONResponse:
    # OpenAI clients retry 409 and 5xx by default; a refused request would only be refused again.
    no_retry = {"x-should-retry": "false"} if error.status in (400, 401, 403, 404, 409, 413) else None
    return JSONResponse(error.body(), status_code=error.status, headers=no_retry)


def _takes(sampler: Sampler, name: str) -> bool:
    """Whether `sampler.generate` accepts the optional keyword `name` (asked once, not per call)."""
    try:
        return name in inspect.signature(sampler.generate).parameters
    except (TypeError, ValueError):
        return False


def create_app(*, sampler: Sampler | None, chat: Chat | None, store: TrajectoryStore, model_name: str,
               default_params: SamplingParams, api_keys: Sequence[str] | Mapping[str, str] = (),
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, opaque_tokens_on_loopback: bool = False,
               task_max_attempts: int = AgentConfig().rollout_max_retries + 1, seed: int | None = 0,
               sampling_overrides: str = "warn", chat_router: APIRouter | None = None) -> FastAPI:
    """The runtime server app (see the module docstring; auth modes in `turnwise.runtime.auth`).
    `chat_router` replaces the OpenAI routes (with `sampler` and `chat` None): the eval proxy of an
    external endpoint (`turnwise.rollout.proxy`)."""
    if chat_router is None and (sampler is None or chat is None):
        raise ValueError("create_app needs a sampler and a chat format (or a chat_router)")
    app = FastAPI(title="turnwise runtime", version="1",
                  description="OpenAI-compatible sampling with token-exact trajectory capture, "
                              "and the rollout feedback API of the managed multi-turn RL service.")
    app.state.runtime = Runtime(
        sampler=sampler, chat=chat, store=store, model_name=model_name, default_params=default_params,
        auth=Auth(api_keys, default_job=store.job_id, opaque_tokens_on_loopback=opaque_tokens_on_loopback),
        task_max_attempts=task_max_attempts,
        sampler_takes_cache_key=sampler is not None and _takes(sampler, "cache_key"),
        sampler_takes_on_token=sampler is not None and _takes(sampler, "on_token"),
        sampler_takes_context=sampler is not None and _takes(sampler, "context"), seed=seed,
        sampler_supports_grammar=bool(getattr(sampler, "supports_grammar", False)),
        sampler_supports_top_logprobs=bool(getattr(sampler, "supports_top_logprobs", False)),
        sampling_overrides=sampling_overrides)
    if sampling_overrides not in ("allow", "warn", "deny"):
        raise ValueError(f"sampling_overrides must be allow, warn or deny, not {sampling_overrides!r}")
    app.include_router(chat_router or openai_routes.router)
    app.include_router(rollout_routes.router)
    app.include_router(task_routes.router)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    def openapi() -> dict[str, Any]:
        """FastAPI's spec, minus its 422 responses: this app reports validation errors as 400."""
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for item in spec.get("paths", {}).values():
                for op in item.values():
                    for param in op.get("parameters", ()):  # one of the two names is required; the spec
                        if param.get("in") == "header" and param.get("name") == TRAJECTORY_HEADERS[0]:
                            param["required"] = True  # names the canonical one (the alias works too)
                            param["schema"] = {"type": "string", "minLength": 1, "maxLength": 512}
                    if op.get("responses", {}).pop("422", None) is not None:
                        op["responses"].setdefault("400", {"description": "Malformed request",
                                                           "content": {"application/json": {"schema": {
                                                               "$ref": "#/components/schemas/ErrorResponse"}}}})
            for name in ("HTTPValidationError", "ValidationError"):
                spec.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(ApiError(400, _validation_message(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error_response(ApiError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        return _error_response(ApiError(500, f"internal error ({type(exc).__name__}); see the server log"))

    return app


def runtime_of(app: Any) -> Runtime:
    """The `Runtime` an app was created with."""
    return app.state.runtime
