"""Tool-call parsers for formats whose arguments are JSON: Hermes (Qwen2.5/3), Llama 3, Mistral, Kimi K2.

Every parser takes the completion text after any reasoning and the offered tools (name -> JSON
Schema of the parameters, or None when unknown), and returns `(content, calls)`, or None when
the text attempts a call that is malformed (bad JSON, unknown tool, unclosed block). Parsers
never raise.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Callable, Mapping
from typing import Any

from turnwise.types import ToolCall

ToolSpecs = Mapping[str, Mapping[str, Any] | None] | None
"""Offered tools: name -> parameters schema (None: unknown). None: no tools were offered."""
Parsed = tuple[str, tuple[ToolCall, ...]] | None
CallParser = Callable[[str, ToolSpecs], Parsed]

_HERMES_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_PYTHON_TAG = "<|python_tag|>"


def new_call_id(alphabet: str = string.ascii_lowercase + string.digits, length: int = 12, prefix: str = "call_") -> str:
    """A random tool-call id."""
    return prefix + "".join(secrets.choice(alphabet) for _ in range(length))


def loads(text: str) -> Any:
    """JSON value of `text`, or None."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def make_call(name: Any, args: Any, tools: ToolSpecs, call_id: str | None = None) -> ToolCall | None:
    """A ToolCall when `name` is an offered tool and `args` a JSON object (or its text), else None."""
    if isinstance(args, str):
        args = loads(args)
    if not isinstance(name, str) or not name or not isinstance(args, dict):
        return None
    if tools is not None and name not in tools:
        return None
    try:
        arguments = json.dumps(args, ensure_ascii=False, separators=(",", ":"))
    except (ValueError, RecursionError, TypeError):
        return None
    return ToolCall(id=call_id or new_call_id(), name=name, arguments=arguments)


def _call_from_object(value: Any, tools: ToolSpecs) -> ToolCall | None:
    if not isinstance(value, dict):
        return None
    return make_call(value.get("name"), value.get("arguments", value.get("parameters")), tools)


def parse_hermes(text: str, tools: ToolSpecs) -> Parsed:
    """`<tool_call>\\n{"name": .., "arguments": {..}}\\n</tool_call>` blocks after optional text."""
    bodies = _HERMES_CALL.findall(text)
    if text.count("<tool_call>") != len(bodies) or text.count("</tool_call>") != len(bodies):
        return None
    calls = []
    for body in bodies:
        call = _call_from_object(loads(body.strip()), tools)
        if call is None:
            return None
        calls.append(call)
    return _HERMES_CALL.sub("", text).strip(), tuple(calls)


def parse_llama3(text: str, tools: ToolSpecs) -> Parsed:
    """The whole turn is `{"name": .., "parameters": {..}}` (after an optional `<|python_tag|>`;
    several calls separated by `;`). Other JSON, without a "name", is content."""
    body = text.strip()
    tagged = body.startswith(_PYTHON_TAG)
    if tagged:
        body = body[len(_PYTHON_TAG):].strip()
    if not body.startswith("{"):
        return None if tagged else (body, ())
    decoder = json.JSONDecoder()
    if not tagged:
        try:
            first, _ = decoder.raw_decode(body)
        except (ValueError, RecursionError):
            return None
        if isinstance(first, dict) and "name" not in first:
            return body, ()
    calls = []
    pos = 0
    while pos < len(body):
        try:
            value, end = decoder.raw_decode(body, pos)
        except (ValueError, RecursionError):
            return None
        call = _call_from_object(value, tools)
        if call is None:
            return None
        calls.append(call)
        pos = end
        while pos < len(body) and (body[pos].isspace() or body[pos] == ";"):
            pos += 1
    return "", tuple(calls)


def parse_mistral(text: str, tools: ToolSpecs) -> Parsed:
    """`content[TOOL_CALLS]name[CALL_ID]id[ARGS]{..}` repeated (Mistral Small 3.2; the id is
    optional, 9 alphanumerics when absent, as the template requires), or the older
    `[TOOL_CALLS][{"name": .., "arguments": {..}}, ..]`."""
    if "[TOOL_CALLS]" not in text:
        return text.strip(), ()
    content, _, rest = text.partition("[TOOL_CALLS]")
    if rest.lstrip().startswith("["):
        value = loads(rest.strip())
        if not isinstance(value, list) or not value:
            return None
        calls = [_call_from_object(v, tools) for v in value]
        return None if any(c is None for c in calls) else (content.strip(), tuple(calls))  # type: ignore[misc]
    out = []
    for chunk in rest.split("[TOOL_CALLS]"):
        head, sep, args = chunk.partition("[ARGS]")
        if not sep:
            return None
        name, _, call_id = head.partition("[CALL_ID]")
        call = make_call(name.strip(), args.strip(), tools,
                         call_id.strip() or new_call_id(string.ascii_letters + string.digits, 9, ""))
        if call is None:
            return None
        out.append(call)
    return content.strip(), tuple(out)


_KIMI_CALL = re.compile(r"<\|tool_call_begin\|>\s*(.+?)\s*<\|tool_call_argument_begin\|>(.*?)<\|tool_call_end\|>",
                        re.DOTALL)


def parse_kimi(text: str, tools: ToolSpecs) -> Parsed:
    """`content<|tool_calls_section_begin|>` then `<|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{..}
    <|tool_call_end|>` per call and `<|tool_calls_section_end|>`. The id is the model's `functions.f:idx`."""
    begin, end = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
    if begin not in text and "<|tool_call_begin|>" not in text:
        return text.strip(), ()
    content, _, section = text.partition(begin)
    if text.count(begin) != 1 or end not in section:
        return None
    section, _, tail = section.partition(end)
    if tail.strip() or section.count("<|tool_call_begin|>") != len(_KIMI_CALL.findall(section)):
        return None
    calls = []
    for call_id, args in _KIMI_CALL.findall(section):
        match = re.fullmatch(r"(?:functions\.)?(.+?)(?::\d+)?", call_id)
        call = make_call(match.group(1) if match else None, args.strip(), tools, call_id)
        if call is None:
            return None
        calls.append(call)
    return content.strip(), tuple(calls)
