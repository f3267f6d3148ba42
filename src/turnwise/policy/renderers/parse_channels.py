"""Parsers for channel formats: GPT-OSS harmony and Gemma 4.

Harmony: a completion is a run of messages, `<|channel|>C<|message|>body<|end|>` each, later ones
opened with `<|start|>assistant`; the last ends with the stop token the sampler removed
(`<|call|>` after a tool call, `<|return|>` after the final answer). Channel `analysis` is
reasoning, `final` the answer, `commentary` with recipient `to=functions.f` a tool call (its
header may hold the recipient before or after the channel, and `<|constrain|>json` or ` json`).
The template takes one tool call per assistant message, so the model writes one call per turn.

Gemma 4: optional `<|channel>thought\\n...<channel|>` reasoning, then content and
`<|tool_call>call:f{k:v,..}<tool_call|>` blocks, whose arguments are Gemma's own notation:
bare keys, strings in `<|"|>` quotes, JSON numbers and booleans, nested `{}` and `[]`.
"""

from __future__ import annotations

import json
import re
from typing import Any

from turnwise.policy.renderers.parse_json import Parsed, ToolSpecs, make_call

_H_START, _H_MSG, _H_END, _H_CH = "<|start|>", "<|message|>", "<|end|>", "<|channel|>"
_RECIPIENT = re.compile(r"to=functions\.([^\s<]+)")


def _harmony_messages(text: str) -> list[tuple[str, str | None, str]] | None:
    """(channel, tool name or None, body) per message; None when a message is malformed."""
    out = []
    for i, chunk in enumerate(text.split(_H_START)):
        if i > 0:
            if not chunk.startswith("assistant"):
                return None
            chunk = chunk[len("assistant"):]
        elif not chunk.strip():
            continue
        header, sep, body = chunk.partition(_H_MSG)
        if not sep or _H_CH not in header:
            return None
        channel = re.match(r"\w*", header.split(_H_CH, 1)[1]).group(0)  # type: ignore[union-attr]
        recipient = _RECIPIENT.search(header)
        if body.endswith(_H_END):
            body = body[:-len(_H_END)]
        if _H_END in body or _H_MSG in body:
            return None
        out.append((channel, recipient.group(1) if recipient else None, body))
    return out


def split_harmony(text: str) -> tuple[str, str] | None:
    """(analysis text, the other messages as they were written)."""
    messages = _harmony_messages(text)
    if messages is None:
        return None
    reasoning = "\n".join(body for channel, to, body in messages if channel == "analysis" and to is None)
    rest = [chunk for chunk in text.split(_H_START) if chunk.strip()]
    kept = [c for c, (channel, to, _) in zip(rest, messages, strict=True) if not (channel == "analysis" and to is None)]
    return reasoning, _H_START.join(kept)


def parse_harmony_calls(text: str, tools: ToolSpecs) -> Parsed:
    """Final and commentary bodies are the content; a message to `functions.f` is a call."""
    messages = _harmony_messages(text)
    if messages is None:
        return None
    content, calls = [], []
    for channel, to, body in messages:
        if to is not None:
            call = make_call(to, body.strip(), tools)
            if call is None:
                return None
            calls.append(call)
        elif channel in ("final", "commentary"):
            content.append(body)
        else:
            return None
    return "\n".join(content).strip(), tuple(calls)


_G_Q = '<|"|>'
_G_CALL = re.compile(r"<\|tool_call>call:([^{\s]+)(\{.*?\})<tool_call\|>", re.DOTALL)


def split_gemma(text: str) -> tuple[str, str] | None:
    """(thought channel text, the rest)."""
    stripped = text.lstrip()
    if not stripped.startswith("<|channel>"):
        return "", text
    body, sep, rest = stripped[len("<|channel>"):].partition("<channel|>")
    if not sep:
        return None
    return body.removeprefix("thought").strip("\n"), rest


def _gemma_value(s: str, i: int) -> tuple[Any, int]:
    if s.startswith(_G_Q, i):
        end = s.index(_G_Q, i + len(_G_Q))
        return s[i + len(_G_Q):end], end + len(_G_Q)
    if s[i] == "{":
        out: dict[str, Any] = {}
        i += 1
        while s[i] != "}":
            if s.startswith(_G_Q, i):
                key, i = _gemma_value(s, i)
            else:
                colon = s.index(":", i)
                key, i = s[i:colon], colon
            if s[i] != ":":
                raise ValueError("expected ':'")
            out[key], i = _gemma_value(s, i + 1)
            if s[i] == ",":
                i += 1
        return out, i + 1
    if s[i] == "[":
        items = []
        i += 1
        while s[i] != "]":
            item, i = _gemma_value(s, i)
            items.append(item)
            if s[i] == ",":
                i += 1
        return items, i + 1
    end = i
    while s[end] not in ",}]":
        end += 1
    return json.loads(s[i:end]), end


def gemma_arguments(text: str) -> dict[str, Any] | None:
    """Gemma's `{k:v,..}` notation as a dict, or None when it is not that notation."""
    try:
        value, end = _gemma_value(text, 0)
    except (ValueError, IndexError, RecursionError):
        return None
    return value if isinstance(value, dict) and end == len(text) else None


def parse_gemma_calls(text: str, tools: ToolSpecs) -> Parsed:
    """Content around `<|tool_call>call:f{..}<tool_call|>` blocks."""
    if "<|tool_call>" not in text:
        return text.strip(), ()
    blocks = _G_CALL.findall(text)
    if len(blocks) != text.count("<|tool_call>"):
        return None
    calls = []
    for name, args in blocks:
        call = make_call(name, gemma_arguments(args), tools)
        if call is None:
            return None
        calls.append(call)
    return _G_CALL.sub("", text).strip(), tuple(calls)
