"""Tool-call parsers for formats that write each argument as text: Qwen3-Coder/3.5/3.6 XML, GLM 4.x, DeepSeek V3.2 DSML.

An argument's text becomes a JSON value by the tool's parameter schema, as the serving parsers
do: a `string` parameter keeps its text; other types are read as JSON (Python's `True`/`False`/
`None`, which Qwen's template writes for booleans, are accepted); without a schema, text that
is valid JSON is read as JSON and anything else stays a string.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from turnwise.policy.renderers.parse_json import Parsed, ToolSpecs, make_call
from turnwise.types import ToolCall

_PY_LITERALS = {"True": True, "False": False, "None": None}


def _param_type(tools: ToolSpecs, name: str, key: str) -> Any:
    params = (tools or {}).get(name) or {}
    props = params.get("properties") if isinstance(params, Mapping) else None
    spec = props.get(key) if isinstance(props, Mapping) else None
    return spec.get("type") if isinstance(spec, Mapping) else None


def typed_value(text: str, kind: Any) -> Any:
    """The JSON value of one argument's text, given its schema type (None: unknown)."""
    if kind == "string" or (isinstance(kind, list) and "string" in kind and len(kind) == 1):
        return text
    if text in _PY_LITERALS and kind is not None:
        return _PY_LITERALS[text]
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


def _call(name: str, pairs: list[tuple[str, str]], tools: ToolSpecs, strict_types: dict[str, bool] | None = None
          ) -> ToolCall | None:
    args: dict[str, Any] = {}
    for key, raw in pairs:
        if key in args:
            return None
        if strict_types is not None and key in strict_types:  # DSML says itself whether it is a string
            args[key] = raw if strict_types[key] else typed_value(raw, "json")
        else:
            args[key] = typed_value(raw, _param_type(tools, name, key))
    return make_call(name, args, tools)


_QWEN_CALL = re.compile(r"<tool_call>\s*<function=([^>\n]+)>(.*?)</function>\s*</tool_call>", re.DOTALL)
_QWEN_PARAM = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.DOTALL)


def parse_qwen_xml(text: str, tools: ToolSpecs) -> Parsed:
    """`<tool_call>\\n<function=f>\\n<parameter=k>\\nv\\n</parameter>\\n</function>\\n</tool_call>` blocks."""
    if "<tool_call>" not in text and "<function=" not in text:
        return text.strip(), ()
    blocks = _QWEN_CALL.findall(text)
    if len(blocks) != text.count("<tool_call>") or len(blocks) != text.count("<function="):
        return None
    calls = []
    for name, body in blocks:
        pairs = _QWEN_PARAM.findall(body)
        if _QWEN_PARAM.sub("", body).strip() or len(pairs) != body.count("<parameter="):
            return None
        call = _call(name.strip(), pairs, tools)
        if call is None:
            return None
        calls.append(call)
    return _QWEN_CALL.sub("", text).strip(), tuple(calls)


_GLM_CALL = re.compile(r"<tool_call>([^<]*)(.*?)</tool_call>", re.DOTALL)
_GLM_ARG = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)


def parse_glm(text: str, tools: ToolSpecs) -> Parsed:
    """`<tool_call>f<arg_key>k</arg_key><arg_value>v</arg_value>..</tool_call>` blocks (GLM 4.5-4.7)."""
    if "<tool_call>" not in text:
        return None if "<arg_key>" in text else (text.strip(), ())
    blocks = _GLM_CALL.findall(text)
    if len(blocks) != text.count("<tool_call>") or len(blocks) != text.count("</tool_call>"):
        return None
    calls = []
    for name, body in blocks:
        pairs = _GLM_ARG.findall(body)
        if _GLM_ARG.sub("", body).strip():
            return None
        call = _call(name.strip(), pairs, tools)
        if call is None:
            return None
        calls.append(call)
    return _GLM_CALL.sub("", text).strip(), tuple(calls)


_D = "｜DSML｜"
_DSML_BLOCK = re.compile(f"<{_D}function_calls>(.*?)</{_D}function_calls>", re.DOTALL)
_DSML_INVOKE = re.compile(f'<{_D}invoke name="([^"]+)">(.*?)</{_D}invoke>', re.DOTALL)
_DSML_PARAM = re.compile(f'<{_D}parameter name="([^"]+)" string="(true|false)">(.*?)</{_D}parameter>', re.DOTALL)


def parse_dsml(text: str, tools: ToolSpecs) -> Parsed:
    """DeepSeek V3.2: `<｜DSML｜function_calls>` holding `<｜DSML｜invoke name="f">` blocks of
    `<｜DSML｜parameter name="k" string="true|false">v</｜DSML｜parameter>`."""
    if _D not in text:
        return text.strip(), ()
    blocks = _DSML_BLOCK.findall(text)
    if len(blocks) != 1 or text.count(f"<{_D}function_calls>") != 1:
        return None
    body = blocks[0]
    invokes = _DSML_INVOKE.findall(body)
    if _DSML_INVOKE.sub("", body).strip() or len(invokes) != body.count(f"<{_D}invoke "):
        return None
    calls = []
    for name, inner in invokes:
        params = _DSML_PARAM.findall(inner)
        if _DSML_PARAM.sub("", inner).strip():
            return None
        call = _call(name, [(k, v) for k, _, v in params], tools, {k: s == "true" for k, s, _ in params})
        if call is None:
            return None
        calls.append(call)
    return _DSML_BLOCK.sub("", text).strip(), tuple(calls)
