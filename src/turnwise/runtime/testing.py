"""Stand-ins for a policy, for tests and benchmarks of the runtime: a byte-level ChatML chat
format and samplers that answer instantly with scripted tokens.

`ByteChat` tokenizes UTF-8 bytes as ids 0..255 plus three special tokens; tool calls are
written Hermes-style, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from turnwise.config import default_sampling_params
from turnwise.types import (
    Completion,
    FinishReason,
    Message,
    SampleContext,
    SamplingParams,
    ToolCall,
    json_dumps_canonical,
)

IM_START, IM_END, PAD = 256, 257, 258
_SPECIAL = {"<|im_start|>": IM_START, "<|im_end|>": IM_END, "<|pad|>": PAD}
_SPECIAL_TEXT = {v: k for k, v in _SPECIAL.items()}
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(s) for s in _SPECIAL) + ")")
_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


class ByteChat:
    """A small, exact chat format: what `turnwise.policy.chat.ChatFormat` does, without a model."""

    stop_token_ids: frozenset[int] = frozenset({IM_END})

    def render_text(self, messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None,
                    add_generation_prompt: bool) -> str:
        parts = []
        if tools:
            parts.append("<|im_start|>system\n# Tools\n" + json_dumps_canonical(list(tools)) + "<|im_end|>\n")
        for m in messages:
            body = m.content
            for c in m.tool_calls:
                body += '<tool_call>{"name": ' + json.dumps(c.name) + ', "arguments": ' + c.arguments + "}</tool_call>"
            parts.append(f"<|im_start|>{m.role}\n{body}<|im_end|>\n")
        if add_generation_prompt:
            parts.append("<|im_start|>assistant\n")
        return "".join(parts)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in _SPECIAL_RE.split(text):
            if piece in _SPECIAL:
                ids.append(_SPECIAL[piece])
            elif piece:
                ids += piece.encode()
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        out, run = [], bytearray()
        for i in ids:
            if i < 256:
                run.append(i)
                continue
            out.append(run.decode(errors="replace"))
            run = bytearray()
            out.append(_SPECIAL_TEXT.get(i, ""))
        out.append(run.decode(errors="replace"))
        return "".join(out)

    def prompt_ids(self, messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None) -> list[int]:
        return self.encode(self.render_text(messages, tools, True))

    def delta_ids(self, prev: Sequence[Message], new: Sequence[Message],
                  tools: Sequence[Mapping[str, Any]] | None, stop_id: int | None = None) -> list[int] | None:
        before = self.render_text(prev, tools, False)
        after = self.render_text([*prev, *new], tools, True)
        end = before.rfind("<|im_end|>")
        if end < 0 or not after.startswith(before):
            return None
        return self.encode(after[end + len("<|im_end|>"):])

    def parse_assistant(self, completion_ids: Sequence[int], tool_names: Collection[str]) -> tuple[Message, bool]:
        ids = list(completion_ids)
        if ids and ids[-1] in self.stop_token_ids:
            ids.pop()
        text = self.decode(ids)
        calls, error = [], False
        for i, raw in enumerate(_CALL_RE.findall(text)):
            try:
                obj = json.loads(raw)
                name, args = obj["name"], obj.get("arguments", {})
                if name not in tool_names:
                    raise ValueError(name)
            except (ValueError, KeyError, TypeError):
                error = True
                continue
            calls.append(ToolCall(id=f"call_{i}", name=name,
                                  arguments=args if isinstance(args, str) else json.dumps(args)))
        if error:
            return Message(role="assistant", content=text), True
        content = _CALL_RE.sub("", text).strip() if calls else text
        return Message(role="assistant", content=content, tool_calls=tuple(calls)), False


Script = (Callable[[Sequence[int]], Sequence[int]]
          | Callable[[Sequence[int], SampleContext | None], Sequence[int]])


def _positional_parameters(fn: Callable[..., Any]) -> int:
    """How many positional arguments `fn` takes (2 for `*args`); 1 when its signature is hidden."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 1
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return 2
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


class ScriptedSampler:
    """Answers instantly: `script(prompt_ids)` gives the completion ids (or a list, one per call).

    A script of two positional parameters is called `script(prompt_ids, context)` with the
    runtime's `SampleContext` (trajectory, task id, turn), so it can answer per task while the
    agent's prompts are identical; `context` is None when `generate` is called without one."""

    def __init__(self, script: Script | Sequence[Sequence[int]], *, version: int = 0,
                 logprob: float = -0.5) -> None:
        self._script = script
        self._takes_context = callable(script) and _positional_parameters(script) >= 2
        self._calls = 0
        self.version = version
        self.logprob = logprob
        self.prompts: list[tuple[int, ...]] = []
        """Every prompt received, in order."""
        self.contexts: list[SampleContext | None] = []
        """The context of each prompt in `prompts` (None where the caller gave none)."""

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams,
                       context: SampleContext | None = None) -> Completion:
        self.prompts.append(tuple(prompt_ids))
        self.contexts.append(context)
        if callable(self._script):
            ids = tuple(self._script(prompt_ids, context) if self._takes_context  # type: ignore[call-arg]
                        else self._script(prompt_ids))  # type: ignore[call-arg]
        else:
            ids = tuple(self._script[self._calls % len(self._script)])
        self._calls += 1
        finish = FinishReason.STOP
        if len(ids) > params.max_tokens:
            ids, finish = ids[:params.max_tokens], FinishReason.LENGTH
        return Completion(token_ids=ids, logprobs=(self.logprob,) * len(ids), finish_reason=finish,
                          version=self.version, prompt_tokens=len(prompt_ids))


def stub_app(store: Any, *, reply: str = "ok", **kwargs: Any) -> Any:
    """A runtime app over `store` whose policy answers `reply` instantly (ByteChat tokens)."""
    from turnwise.runtime.app import create_app

    chat = ByteChat()
    ids = chat.encode(reply) + [IM_END]
    return create_app(sampler=ScriptedSampler(lambda _: ids), chat=chat, store=store, model_name="stub",
                      default_params=default_sampling_params(max_tokens=256), **kwargs)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m turnwise.runtime.testing --db PATH --port N`: a runtime server with a stub policy
    (for crash tests and benchmarks of the runtime alone)."""
    import argparse

    import uvicorn

    from turnwise.runtime.store import TrajectoryStore

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--db", required=True)
    parser.add_argument("--job", default="job")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--reply", default="ok")
    args = parser.parse_args(argv)
    app = stub_app(TrajectoryStore(args.db, args.job), reply=args.reply)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
