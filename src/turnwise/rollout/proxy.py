"""A runtime whose chat route forwards to an external OpenAI-compatible endpoint.

`turnwise eval --endpoint URL` evaluates a model served elsewhere with the job's agent of any
kind: agents (in process, agent servers, pull workers) talk to this runtime exactly as they talk
to the embedded one (chat completions with the trajectory header, complete-rollout,
update-reward, the task queue), and the dispatchers run them unchanged. Each non-streaming chat
exchange is forwarded with `$OPENAI_API_KEY`, answered verbatim, and recorded: the conversation,
finish reason and usage as a `TurnView` (the endpoint returns no token ids), and a turn without
token ids in the store so that the rollout's lifecycle checks (a model call was made, one reward
per turn) hold as in training. Streaming requests are refused with a 400: they could not be
recorded.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import httpx
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from turnwise.config import JobConfig
from turnwise.runtime.deps import ApiError, CallerDep, RuntimeDep, TrajectoryIdDep, job_store
from turnwise.runtime.store import TrajectoryStore, TransitionError, UnknownTrajectory
from turnwise.types import FinishReason, Turn, TurnView, as_messages


class Recorder:
    """The chat exchanges of every trajectory, in order."""

    def __init__(self) -> None:
        self.turns: defaultdict[str, list[TurnView]] = defaultdict(list)

    def record(self, trajectory_id: str, body: dict[str, Any], data: dict[str, Any]) -> TurnView | None:
        try:
            choice = data["choices"][0]
            [message] = as_messages([{**choice["message"], "role": "assistant"}])
            request_messages = as_messages(body.get("messages") or [])
        except (KeyError, IndexError, TypeError, ValueError):
            return None  # an unusual reply: answered, not recorded
        usage = data.get("usage") or {}
        view = TurnView(request_messages=request_messages, message=message,
                        finish_reason=str(choice.get("finish_reason") or "stop"),
                        completion_tokens=int(usage.get("completion_tokens") or 0),
                        prompt_tokens=int(usage.get("prompt_tokens") or 0))
        self.turns[trajectory_id].append(view)
        return view


def proxy_router(upstream: str, api_key: str, recorder: Recorder) -> APIRouter:
    """`/v1/chat/completions` (and its `/sample` alias) forwarded to `upstream`; `/v1/models` too."""
    router = APIRouter(tags=["openai"])
    headers = {"Authorization": f"Bearer {api_key}"}
    clients: list[httpx.AsyncClient] = []  # one, made on the server's event loop at the first request

    def client() -> httpx.AsyncClient:
        if not clients:
            clients.append(httpx.AsyncClient(base_url=upstream, headers=headers,
                                             timeout=httpx.Timeout(600.0, connect=10.0)))
        return clients[0]

    async def chat(request: Request, rt: RuntimeDep, caller: CallerDep, trajectory_id: TrajectoryIdDep) -> Any:
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise ApiError(400, "body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        if body.get("stream"):
            raise ApiError(400, "stream: true is not supported when evaluating an endpoint (the exchange "
                                "could not be recorded); send stream: false")
        store = job_store(rt, caller)
        if store.get(trajectory_id, last_turn_only=True) is None:
            raise ApiError(404, f"unknown trajectory {trajectory_id!r}")
        try:
            r = await client().post("/v1/chat/completions", json=body)
        except httpx.HTTPError as e:
            raise ApiError(503, f"endpoint {upstream} unreachable: {type(e).__name__}: {e}") from None
        try:
            data = r.json()
        except ValueError:
            raise ApiError(503, f"endpoint {upstream} answered HTTP {r.status_code} without JSON") from None
        if r.status_code == 200 and (view := recorder.record(trajectory_id, body, data)) is not None:
            index = len(recorder.turns[trajectory_id]) - 1
            finish = FinishReason.LENGTH if view.finish_reason == "length" else FinishReason.STOP
            try:
                store.append_turn(trajectory_id, Turn(index=index, prompt_ids=(), completion_ids=(), logprobs=(),
                                                      version=0, finish_reason=finish, message=view.message,
                                                      request_messages=view.request_messages))
            except (TransitionError, UnknownTrajectory) as e:
                raise ApiError(409, str(e)) from None
        return JSONResponse(data, status_code=r.status_code)

    async def models() -> Any:
        try:
            r = await client().get("/v1/models")
            return JSONResponse(r.json(), status_code=r.status_code)
        except (httpx.HTTPError, ValueError) as e:
            raise ApiError(503, f"endpoint {upstream}: {type(e).__name__}: {e}") from None

    router.add_api_route("/v1/chat/completions", chat, methods=["POST"])
    router.add_api_route("/sample", chat, methods=["POST"])
    router.add_api_route("/v1/models", models, methods=["GET"])
    return router


def proxy_app(cfg: JobConfig, *, upstream: str, api_key: str, store: TrajectoryStore, model_name: str,
              recorder: Recorder) -> FastAPI:
    """The runtime app for `cfg` with its chat route forwarded to `upstream`."""
    from turnwise.runtime.app import create_app

    return create_app(sampler=None, chat=None, store=store, model_name=model_name,
                      default_params=cfg.sampling_params(), api_keys=cfg.runtime.api_keys,
                      max_body_bytes=cfg.runtime.max_body_bytes,
                      opaque_tokens_on_loopback=cfg.runtime.opaque_tokens_on_loopback, seed=cfg.seed,
                      sampling_overrides=cfg.runtime.sampling_overrides, chat_router=proxy_router(upstream.rstrip("/"), api_key, recorder))
