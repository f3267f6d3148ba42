"""OpenAI-compatible routes: chat completions (plain and SSE streaming), the Sample alias, models.

Streaming is real where the sampler takes `on_token` (the local engine): text leaves as the
tokens are sampled. Text from the first character that may open markup (`<`, or `{` / `[`
when tools are offered: a tool call, an end-of-turn token) or a stop string on is held back
until the turn is parsed, then sent as the rest of the parsed content, followed by its tool
calls; so a client sees exactly the message that was recorded.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse

from turnwise.runtime.capture import PromptPlan
from turnwise.runtime.deps import ApiError, CallerDep, Runtime, RuntimeDep, TrajectoryIdDep, job_store
from turnwise.runtime.schemas import ChatCompletionRequest, ChatCompletionResponse, ErrorResponse, ModelList
from turnwise.runtime.service import SampledTurn, sample_turn
from turnwise.runtime.store import TrajectoryStore

router = APIRouter(tags=["openai"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in [(400, "Malformed body or missing trajectory header"), (401, "Missing or invalid API key"),
                       (403, "Key not valid for this job"), (409, "Trajectory not in valid status"),
                       (413, "Body too large")]
}
_STREAM = {"description": "OpenAI chat completion, or with stream=true an SSE stream of chunks",
           "content": {"text/event-stream": {"schema": {"type": "string"}}}}


def _finish_reason(s: SampledTurn) -> str:
    return "tool_calls" if s.turn.message.tool_calls else s.turn.finish_reason.value


def _usage(s: SampledTurn) -> dict[str, Any]:
    n_prompt, n_completion = len(s.turn.prompt_ids), len(s.turn.completion_ids)
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion,
            "prompt_tokens_details": {"cached_tokens": s.turn.reused_prompt_tokens}}


def _logprobs(rt: RuntimeDep, s: SampledTurn) -> dict[str, Any]:
    """Each sampled token's logprob (as recorded) and, when asked, the most likely tokens at its position."""
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = rt.chat.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    tops = s.completion.top_logprobs or [()] * len(s.turn.completion_ids)
    content = [{**entry(token_id, logprob), "top_logprobs": [entry(i, lp) for i, lp in top]}
               for token_id, logprob, top in zip(s.turn.completion_ids, s.turn.logprobs, tops, strict=True)]
    return {"content": content}


def _message(s: SampledTurn) -> dict[str, Any]:
    m = s.turn.message
    out: dict[str, Any] = {"role": "assistant", "content": m.content if m.content or not m.tool_calls else None}
    if m.reasoning_content:
        out["reasoning_content"] = m.reasoning_content
    if m.tool_calls:
        out["tool_calls"] = [c.to_openai() for c in m.tool_calls]
    return out


def _headers(s: SampledTurn) -> dict[str, str]:
    return {"X-Turnwise-Turn-Index": str(s.turn.index), "X-Turnwise-Policy-Version": str(s.turn.version),
            "X-Turnwise-Prompt-Plan": s.plan.reason.value}


def _chunk(base: dict[str, Any], delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
    """One SSE event of a streamed chat completion."""
    choice = {"index": 0, "delta": delta, "finish_reason": finish, **extra}
    return "data: " + json.dumps({**base, "object": "chat.completion.chunk", "choices": [choice]}) + "\n\n"


def _stream_end(s: SampledTurn, message: dict[str, Any], body: ChatCompletionRequest,
                base: dict[str, Any]) -> Iterator[str]:
    """The tool calls, the finish reason, the usage (when asked) and [DONE]."""
    for i, call in enumerate(message.get("tool_calls", ())):
        yield _chunk(base, {"tool_calls": [{"index": i, **call}]})
    yield _chunk(base, {}, _finish_reason(s))
    if body.stream_options is not None and body.stream_options.include_usage:
        yield "data: " + json.dumps({**base, "object": "chat.completion.chunk", "choices": [],
                                     "usage": _usage(s)}) + "\n\n"
    yield "data: [DONE]\n\n"


def _stream(rt: RuntimeDep, s: SampledTurn, body: ChatCompletionRequest, base: dict[str, Any]) -> Iterator[str]:
    """The whole (already sampled) completion as OpenAI chunks (samplers without `on_token`)."""
    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        return _chunk(base, delta, finish, **extra)

    message = _message(s)
    yield chunk({"role": "assistant", "content": ""})
    if message.get("reasoning_content"):
        yield chunk({"reasoning_content": message["reasoning_content"]})
    if message["content"]:
        extra = {"logprobs": _logprobs(rt, s)} if body.logprobs else {}
        yield chunk({"content": message["content"]}, **extra)
    yield from _stream_end(s, message, body, base)


def _streamable(text: str, body: ChatCompletionRequest) -> str:
    """The part of the text so far that can be sent before the turn is parsed (module docstring)."""
    openers = "<{[" if body.tools and body.tool_choice != "none" else "<"
    cut = min((i for i in (text.find(c) for c in openers) if i >= 0), default=len(text))
    stops = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if stops:
        cut = min([cut, *(i for i in (text.find(st[:1]) for st in stops if st) if i >= 0)])
    return text[:cut].rstrip("\ufffd").strip()


async def _live(rt: Runtime, task: asyncio.Task[SampledTurn], tokens: asyncio.Queue[int],
                body: ChatCompletionRequest, base: dict[str, Any]) -> AsyncIterator[str]:
    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        return _chunk(base, delta, finish, **extra)

    try:
        yield chunk({"role": "assistant", "content": ""})
        ids: list[int] = []
        sent = ""
        while not task.done():
            get = asyncio.ensure_future(tokens.get())
            await asyncio.wait({get, task}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                break
            ids.append(get.result())
            safe = _streamable(rt.chat.decode(ids), body)
            if len(safe) > len(sent) and safe.startswith(sent):
                yield chunk({"content": safe[len(sent):]})
                sent = safe
        try:
            s = task.result()
        except ApiError as e:  # after the 200 went out: OpenAI's in-stream error event
            yield "data: " + json.dumps(e.body()) + "\n\n"
            return
        message = _message(s)
        final = message["content"] or ""
        rest = final[len(sent):] if final.startswith(sent) else (
            final.lstrip()[len(sent):] if final.lstrip().startswith(sent) else "")
        if rest or body.logprobs:
            yield chunk({"content": rest}, **({"logprobs": _logprobs(rt, s)} if body.logprobs else {}))
        for event in _stream_end(s, message, body, base):
            yield event
    finally:
        if not task.done():  # the client went away: the turn is still sampled and recorded
            await asyncio.shield(task)


async def _stream_live(rt: Runtime, store: TrajectoryStore, trajectory_id: str,
                       body: ChatCompletionRequest) -> Any:
    loop = asyncio.get_running_loop()
    tokens: asyncio.Queue[int] = asyncio.Queue()
    planned: asyncio.Future[tuple[PromptPlan, int]] = loop.create_future()
    task = asyncio.create_task(sample_turn(
        rt, store, trajectory_id, body, on_plan=lambda plan, index: planned.set_result((plan, index)),
        on_token=lambda token, _lp: loop.call_soon_threadsafe(tokens.put_nowait, token)))
    await asyncio.wait({task, planned}, return_when=asyncio.FIRST_COMPLETED)
    if not planned.done():  # refused before sampling (409, 400): a plain error response
        task.result()
    plan, index = planned.result()
    version = rt.sampler.version
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": rt.model_name,
            "system_fingerprint": f"turnwise-v{version}"}
    headers = {"X-Turnwise-Turn-Index": str(index), "X-Turnwise-Policy-Version": str(version),
               "X-Turnwise-Prompt-Plan": plan.reason.value, "Cache-Control": "no-cache"}
    return StreamingResponse(_live(rt, task, tokens, body, base), media_type="text/event-stream", headers=headers)


async def chat_completions(body: ChatCompletionRequest, rt: RuntimeDep, caller: CallerDep,
                           trajectory_id: TrajectoryIdDep) -> Any:
    """Sample the next assistant turn of the trajectory named in the header, and record it token-exactly."""
    store = job_store(rt, caller)
    if body.stream and rt.sampler_takes_on_token:
        return await _stream_live(rt, store, trajectory_id, body)
    s = await sample_turn(rt, store, trajectory_id, body)
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": rt.model_name,
            "system_fingerprint": f"turnwise-v{s.turn.version}"}
    if body.stream:  # a sampler without on_token: the whole completion, cut into chunks
        return StreamingResponse(_stream(rt, s, body, base), media_type="text/event-stream",
                                 headers={**_headers(s), "Cache-Control": "no-cache"})
    choice: dict[str, Any] = {"index": 0, "message": _message(s), "finish_reason": _finish_reason(s),
                              "logprobs": _logprobs(rt, s) if body.logprobs else None}
    return JSONResponse({**base, "object": "chat.completion", "choices": [choice], "usage": _usage(s)},
                        headers=_headers(s))


router.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"], response_model=None,
                     responses={200: {**_STREAM, "model": ChatCompletionResponse}, **_ERRORS},
                     summary="OpenAI chat completion (recorded as one turn of a trajectory)")
router.add_api_route("/sample", chat_completions, methods=["POST"], response_model=None,
                     responses={200: {**_STREAM, "model": ChatCompletionResponse}, **_ERRORS},
                     summary="The managed API's Sample operation: an alias of chat completions",
                     operation_id="sample")


@router.get("/v1/models", response_model=ModelList, responses={401: _ERRORS[401]})
async def models(rt: RuntimeDep, caller: CallerDep) -> dict[str, Any]:
    """The one model served: the policy being trained."""
    return {"object": "list", "data": [{"id": rt.model_name, "object": "model", "created": 0, "owned_by": "turnwise"}]}
