"""Tools: a JSON Schema, a validator and a function, and the `ToolBox` that calls them.

Two ways to make a `Tool`:
- `@tool` on a typed Python function: its signature becomes a pydantic model, whose JSON
  Schema is the tool's `parameters` and which validates the arguments (strict by default:
  "5" is not an integer). The docstring's first paragraph is the description; a Google-style
  `Args:` section gives each parameter's description.
- `Tool.from_schema(openai_schema, fn)`: an explicit OpenAI function schema (for example the
  production one, verbatim), validated by `turnwise.env.schema.validate`.

A parameter named `state` (configurable) is not part of the schema: `ToolBox.call` passes the
rollout's state object there (an `Episode`, a dict, anything).

`ToolBox.call` never raises for a bad call: unknown tool, invalid JSON, invalid arguments,
`ToolError` and any other exception become a `ToolResult(is_error=True)` whose content the
model reads ("Error: ..."). Cancellation and `EnvironmentFault` (a broken environment, not a
bad call) still propagate. Results are serialized deterministically: a `str` is passed
through, anything else goes through `json_dumps_canonical` (sorted keys, no whitespace).
"""

from __future__ import annotations

import inspect
import json
import re
import typing
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pydantic
import pydantic_core

from turnwise.env.schema import validate
from turnwise.types import json_dumps_canonical

_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


class ToolError(Exception):
    """Raise inside a tool for an expected failure; the model sees only the message."""


class EnvironmentFault(Exception):
    """A fault of the environment, not of the model's call (a cassette miss under the "raise"
    policy): it propagates out of `ToolBox.call` instead of becoming a tool message."""


@dataclass(frozen=True)
class ToolResult:
    """What one tool call returned, as the tool message the model will read."""

    content: str
    """The tool message's content."""
    is_error: bool = False
    """True when the call failed (counted as `rollout/tool_errors`)."""
    error_kind: str | None = None
    """unknown_tool | invalid_json | invalid_arguments | tool_error | exception; None on success."""


@dataclass(frozen=True)
class Tool:
    """One callable tool: name, description, JSON Schema of its arguments, and the function."""

    name: str
    """Function name the model calls."""
    description: str
    """What the model reads about the tool."""
    parameters: Mapping[str, Any]
    """JSON Schema of the arguments object."""
    fn: Callable[..., Any]
    """Called with the validated arguments as keywords (plus the state); sync or async."""
    validate_args: Callable[[Any], dict[str, Any]]
    """Parsed JSON arguments to keyword arguments; raises `ValueError` listing every problem."""
    state_param: str | None = None
    """Keyword through which `fn` receives the rollout state; None when it takes none."""

    def schema(self) -> dict[str, Any]:
        """The OpenAI `tools` entry."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description,
                             "parameters": dict(self.parameters)}}

    @classmethod
    def from_function(cls, fn: Callable[..., Any], *, name: str | None = None,
                      description: str | None = None, state_param: str = "state",
                      strict: bool = True) -> Tool:
        """A tool from a typed function (see the module docstring)."""
        name = name or fn.__name__
        _check_name(name)
        doc_summary, arg_docs = _parse_docstring(inspect.getdoc(fn) or "")
        hints = typing.get_type_hints(fn, include_extras=True)
        fields: dict[str, Any] = {}
        takes_state = False
        for p in inspect.signature(fn).parameters.values():
            if p.name == state_param:
                takes_state = True
                continue
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise TypeError(f"tool {name}: *args/**kwargs cannot be described by a schema")
            if p.name not in hints:
                raise TypeError(f"tool {name}: parameter {p.name!r} needs a type annotation")
            default = ... if p.default is p.empty else p.default
            fields[p.name] = (hints[p.name], pydantic.Field(default, description=arg_docs.get(p.name)))
        model = pydantic.create_model(  # type: ignore[call-overload]
            f"{name}_arguments", __config__=pydantic.ConfigDict(extra="forbid", strict=strict), **fields)
        parameters = _strip_titles(model.model_json_schema())

        def validate_args(args: Any) -> dict[str, Any]:
            try:
                # JSON mode: strict still accepts "2024-01-01" for a date and "red" for an enum
                parsed = model.model_validate_json(json.dumps(args))
            except pydantic.ValidationError as e:
                raise ValueError("\n".join(_pydantic_lines(e))) from None
            return {k: getattr(parsed, k) for k in fields}

        return cls(name=name, description=description if description is not None else doc_summary,
                   parameters=parameters, fn=fn, validate_args=validate_args,
                   state_param=state_param if takes_state else None)

    @classmethod
    def from_schema(cls, schema: Mapping[str, Any], fn: Callable[..., Any], *,
                    state_param: str | None = None) -> Tool:
        """A tool from an OpenAI function schema (`{"type": "function", "function": {...}}` or
        the inner `{"name", "description", "parameters"}`); `fn` gets the arguments as keywords."""
        spec = schema.get("function", schema)
        name = str(spec["name"])
        _check_name(name)
        parameters = spec.get("parameters") or {"type": "object", "properties": {}}

        def validate_args(args: Any) -> dict[str, Any]:
            errors = validate(args, parameters)
            if errors:
                raise ValueError("\n".join(errors))
            return dict(args)

        return cls(name=name, description=str(spec.get("description", "")), parameters=parameters,
                   fn=fn, validate_args=validate_args, state_param=state_param)


def tool(fn: Callable[..., Any] | None = None, *, name: str | None = None, description: str | None = None,
         state_param: str = "state", strict: bool = True) -> Any:
    """Decorator form of `Tool.from_function`: `@tool` or `@tool(name=..., strict=False)`."""
    def wrap(f: Callable[..., Any]) -> Tool:
        return Tool.from_function(f, name=name, description=description, state_param=state_param, strict=strict)
    return wrap(fn) if fn is not None else wrap


class ToolBox:
    """A fixed set of tools, shared by every rollout (per-rollout data lives in the state)."""

    def __init__(self, tools: Iterable[Tool | Callable[..., Any]]):
        self._tools: dict[str, Tool] = {}
        for t in tools:
            t = t if isinstance(t, Tool) else Tool.from_function(t)
            if t.name in self._tools:
                raise ValueError(f"duplicate tool name {t.name!r}")
            self._tools[t.name] = t

    @property
    def names(self) -> list[str]:
        return list(self._tools)

    def __getitem__(self, name: str) -> Tool:
        return self._tools[name]

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def schemas(self) -> list[dict[str, Any]]:
        """The OpenAI `tools` list, in registration order."""
        return [t.schema() for t in self._tools.values()]

    async def call(self, name: str, arguments_json: str | Mapping[str, Any], state: Any = None) -> ToolResult:
        """Run one call; every failure becomes an error result the model can read."""
        t = self._tools.get(name)
        if t is None:
            return _error("unknown_tool", f"unknown tool {name!r}; available tools: {', '.join(self._tools)}")
        if isinstance(arguments_json, str):
            try:  # models send "" for a call without arguments
                args = json.loads(arguments_json) if arguments_json.strip() else {}
            except json.JSONDecodeError as e:
                return _error("invalid_json", f"arguments for {name} are not valid JSON ({e})")
        else:
            args = dict(arguments_json)
        if not isinstance(args, dict):
            return _error("invalid_arguments", f"arguments for {name} must be a JSON object")
        try:
            kwargs = t.validate_args(args)
        except ValueError as e:
            return _error("invalid_arguments", f"invalid arguments for {name}:\n{e}")
        if t.state_param is not None:
            kwargs[t.state_param] = state
        try:
            out = t.fn(**kwargs)
            if inspect.isawaitable(out):
                out = await typing.cast(Awaitable[Any], out)
            return ToolResult(content=serialize_result(out))
        except ToolError as e:
            return _error("tool_error", str(e))
        except EnvironmentFault:
            raise
        except Exception as e:  # the model must see it; the agent's loop must not crash
            return _error("exception", f"{name} failed: {type(e).__name__}: {e}")

    async def replay(self, actions: Sequence[Mapping[str, Any]], state: Any = None) -> list[ToolResult]:
        """Run gold actions `[{"name": ..., "arguments": {...}}, ...]` in order (for state hashes)."""
        return [await self.call(a["name"], a.get("arguments", {}), state) for a in actions]


def serialize_result(value: Any) -> str:
    """A tool's return value as message text: str unchanged, anything else canonical JSON."""
    if isinstance(value, str):
        return value
    return json_dumps_canonical(pydantic_core.to_jsonable_python(value))


def _error(kind: str, message: str) -> ToolResult:
    return ToolResult(content=f"Error: {message}", is_error=True, error_kind=kind)


def _check_name(name: str) -> None:
    if not _NAME_RE.match(name):
        raise ValueError(f"tool name {name!r} must match {_NAME_RE.pattern}")


def _pydantic_lines(e: pydantic.ValidationError) -> list[str]:
    out = []
    for err in e.errors(include_url=False):
        loc = ".".join(str(x) for x in err["loc"]) or "(arguments)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unexpected argument"
        elif err["type"] != "missing":
            msg += f" (got {json.dumps(err.get('input'), default=str)})"
        out.append(f"- {loc}: {msg}")
    return out


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """First paragraph, and the descriptions of a Google-style `Args:` section."""
    summary = doc.split("\n\n", 1)[0].strip().replace("\n", " ")
    args: dict[str, str] = {}
    m = re.search(r"^(?:Args|Arguments|Parameters):\s*\n((?:[ \t]+.*\n?|\s*\n)+)", doc, re.M)
    if m:
        current, indent = None, 0
        for line in m.group(1).splitlines():
            item = re.match(r"^\s{1,8}(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$", line)
            if item and (current is None or len(line) - len(line.lstrip()) <= indent):
                current, indent = item.group(1), len(line) - len(line.lstrip())
                args[current] = item.group(2).strip()
            elif current and line.strip():
                args[current] = f"{args[current]} {line.strip()}".strip()
    return summary, args


def _strip_titles(schema: Any, in_properties: bool = False) -> Any:
    """pydantic's schemas carry `title` on every node; OpenAI does not need them."""
    if isinstance(schema, dict):
        return {k: _strip_titles(v, in_properties=(k in ("properties", "$defs")) and not in_properties)
                for k, v in schema.items() if in_properties or k != "title" or not isinstance(v, str)}
    if isinstance(schema, list):
        return [_strip_titles(v) for v in schema]
    return schema
