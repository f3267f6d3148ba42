"""Tools: a JSON Schema, a validator and a function, and the `ToolBox` that calls them.

Two ways to make a `Tool`:
- `@tool` on a typed Python function: its signature becomes a pydantic model, whose JSON
  Schema is the tool's `parameters` and which validates the arguments (strict by default:
  "5" is not an integer). The docstring's first paragraph is the description; a Google-style
  `Args:` section gives each parameter's description.
  `@tool(schema=production_entry)` keeps the function typed but offers the model the
  production schema verbatim (byte for byte), validates against it, then converts the
  arguments to the function's types; the function and the schema must agree on the
  parameters, or the decorator fails.
- `Tool.from_schema(openai_schema, fn)`: an explicit OpenAI function schema (for example the
  production one, verbatim), validated by `turnwise.env.schema.validate`.

The rollout's state reaches the function through the one parameter annotated with its type
(`Episode` by default, `state_type=` for another): found by annotation, never by name, so a
real argument called `state` (a US state) stays an argument.

`ToolBox.call` never raises for a bad call: unknown tool, invalid JSON, invalid arguments,
`ToolError` and any other exception become a `ToolResult(is_error=True)` whose content the
model reads. Cancellation and `EnvironmentFault` (a broken environment, not a bad call) still
propagate. Per tool, or for a whole `ToolBox`, three choices keep production's exact text:
- `serialize`: how a non-`str` return value becomes the message (a `str` is always verbatim):
  "canonical" (default: sorted keys, no whitespace; deterministic whatever the dict order),
  "json" (`json.dumps` defaults, as most Python services write), "str" (`str(value)`), or a
  function;
- `errors`: "wrap" (default: "Error: {message}" for a `ToolError`, "Error: {name} failed:
  {Type}: {e}" for any other exception), "raw" (the exception's text verbatim), or a function
  of the exception;
- `validate=False`: no argument validation or conversion at all; the function gets the parsed
  JSON object as keywords and its own checks (and a `TypeError` for a missing argument) speak.
`terminal=True` marks a tool that ends the episode (a transfer to a human): every call of it,
whatever its outcome, returns `ToolResult(terminal=True)` and `run_tool_loop` stops there.
Sync functions run in a bounded thread pool (`turnwise.env.offload`) so they never block the
event loop other rollouts share; `offload=False` runs one inline.
"""

from __future__ import annotations

import copy
import inspect
import json
import re
import types
import typing
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pydantic
import pydantic_core

from turnwise.env.episode import Episode
from turnwise.env.offload import run_blocking
from turnwise.env.schema import validate as validate_schema
from turnwise.types import json_dumps_canonical

Serialize = Literal["canonical", "json", "str"] | Callable[[Any], str]
"""How a tool's non-`str` return value becomes the tool message."""
Errors = Literal["wrap", "raw"] | Callable[[Exception], str]
"""How an exception raised by a tool becomes the tool message."""
_SERIALIZE = ("canonical", "json", "str")
_ERRORS = ("wrap", "raw")

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
    terminal: bool = False
    """The call was to a terminal tool: the episode ends here."""


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
    entry: Mapping[str, Any] | None = None
    """The declared OpenAI tools entry, offered verbatim (None: built from the fields above)."""
    serialize: Serialize | None = None
    """Result serialization (module docstring); None: the ToolBox's choice."""
    errors: Errors | None = None
    """Exception text (module docstring); None: the ToolBox's choice."""
    terminal: bool = False
    """A call of this tool ends the episode."""
    offload: bool = True
    """Run a sync `fn` in the shared thread pool rather than on the event loop."""

    def schema(self) -> dict[str, Any]:
        """The OpenAI `tools` entry (a declared production entry, verbatim)."""
        if self.entry is not None:
            return copy.deepcopy(dict(self.entry))
        return {"type": "function",
                "function": {"name": self.name, "description": self.description,
                             "parameters": dict(self.parameters)}}

    @classmethod
    def from_function(cls, fn: Callable[..., Any], *, name: str | None = None,
                      description: str | None = None, schema: Mapping[str, Any] | None = None,
                      state_type: type | tuple[type, ...] = Episode, strict: bool = True,
                      validate: bool = True, serialize: Serialize | None = None, errors: Errors | None = None,
                      terminal: bool = False, offload: bool = True) -> Tool:
        """A tool from a typed function (see the module docstring)."""
        entry = _entry(schema) if schema is not None else None
        if entry is not None:
            declared = str(entry["function"]["name"])
            if name is not None and name != declared:
                raise ValueError(f"tool name {name!r} differs from its schema's name {declared!r}")
            if description is not None:
                raise ValueError(f"tool {declared}: the description comes from its schema; drop description=")
            name = declared
        name = name or fn.__name__
        _check_name(name)
        _check_modes(name, serialize, errors)
        doc_summary, arg_docs = _parse_docstring(inspect.getdoc(fn) or "")
        hints = typing.get_type_hints(fn, include_extras=True)
        fields: dict[str, Any] = {}
        state_param: str | None = None
        takes_kwargs = False
        for p in inspect.signature(fn).parameters.values():
            if p.kind is p.VAR_KEYWORD and entry is not None:
                takes_kwargs = True
                continue
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise TypeError(f"tool {name}: *args/**kwargs cannot be described by a schema")
            if p.name not in hints:
                raise TypeError(f"tool {name}: parameter {p.name!r} needs a type annotation")
            if _is_state(hints[p.name], state_type):
                if state_param is not None:
                    raise TypeError(f"tool {name}: parameters {state_param!r} and {p.name!r} both take the state")
                state_param = p.name
                continue
            default = ... if p.default is p.empty else p.default
            fields[p.name] = (hints[p.name], pydantic.Field(default, description=arg_docs.get(p.name)))
        model = pydantic.create_model(  # type: ignore[call-overload]
            f"{name}_arguments", __config__=pydantic.ConfigDict(extra="forbid", strict=strict), **fields)
        if entry is not None:
            spec = entry["function"]
            parameters = spec.get("parameters") or {"type": "object", "properties": {}}
            _check_agrees(name, parameters, fields, takes_kwargs)
            description = str(spec.get("description", ""))
        else:
            parameters = _strip_titles(model.model_json_schema())
            description = description if description is not None else doc_summary

        def validate_args(args: Any) -> dict[str, Any]:
            if not validate:
                return dict(args)
            extra: dict[str, Any] = {}
            if entry is not None:
                problems = validate_schema(args, parameters)
                if problems:  # production's schema decides what is valid
                    raise ValueError("\n".join(problems))
                if takes_kwargs:  # properties the schema allows and `**kwargs` takes, passed as they are
                    extra = {k: v for k, v in args.items() if k not in fields}
                    args = {k: v for k, v in args.items() if k in fields}
            try:
                # JSON mode: strict still accepts "2024-01-01" for a date and "red" for an enum
                parsed = model.model_validate_json(json.dumps(args))
            except pydantic.ValidationError as e:
                raise ValueError("\n".join(_pydantic_lines(e))) from None
            return {**{k: getattr(parsed, k) for k in fields}, **extra}

        return cls(name=name, description=description, parameters=parameters, fn=fn, validate_args=validate_args,
                   state_param=state_param, entry=entry, serialize=serialize, errors=errors, terminal=terminal,
                   offload=offload)

    @classmethod
    def from_schema(cls, schema: Mapping[str, Any], fn: Callable[..., Any], *,
                    state_param: str | None = None, validate: bool = True, serialize: Serialize | None = None,
                    errors: Errors | None = None, terminal: bool = False, offload: bool = True) -> Tool:
        """A tool from an OpenAI function schema (`{"type": "function", "function": {...}}` or
        the inner `{"name", "description", "parameters"}`), offered verbatim; `fn` gets the
        arguments as keywords, and the state through `state_param` when given."""
        entry = _entry(schema)
        spec = entry["function"]
        name = str(spec["name"])
        _check_name(name)
        _check_modes(name, serialize, errors)
        parameters = spec.get("parameters") or {"type": "object", "properties": {}}

        def validate_args(args: Any) -> dict[str, Any]:
            problems = validate_schema(args, parameters) if validate else []
            if problems:
                raise ValueError("\n".join(problems))
            return dict(args)

        return cls(name=name, description=str(spec.get("description", "")), parameters=parameters,
                   fn=fn, validate_args=validate_args, state_param=state_param, entry=entry,
                   serialize=serialize, errors=errors, terminal=terminal, offload=offload)


def tool(fn: Callable[..., Any] | None = None, *, name: str | None = None, description: str | None = None,
         schema: Mapping[str, Any] | None = None, state_type: type | tuple[type, ...] = Episode,
         strict: bool = True, validate: bool = True, serialize: Serialize | None = None,
         errors: Errors | None = None, terminal: bool = False, offload: bool = True) -> Any:
    """Decorator form of `Tool.from_function`: `@tool`, `@tool(schema=PRODUCTION["name"])`,
    `@tool(terminal=True)`, `@tool(validate=False, errors="raw")`, ..."""
    def wrap(f: Callable[..., Any]) -> Tool:
        return Tool.from_function(f, name=name, description=description, schema=schema, state_type=state_type,
                                  strict=strict, validate=validate, serialize=serialize, errors=errors,
                                  terminal=terminal, offload=offload)
    return wrap(fn) if fn is not None else wrap


class ToolBox:
    """A fixed set of tools, shared by every rollout (per-rollout data lives in the state).

    `serialize` and `errors` apply to every tool that does not set its own (module docstring).
    """

    def __init__(self, tools: Iterable[Tool | Callable[..., Any]], *, serialize: Serialize = "canonical",
                 errors: Errors = "wrap"):
        _check_modes("ToolBox", serialize, errors)
        self.serialize = serialize
        self.errors = errors
        self._tools: dict[str, Tool] = {}
        for t in tools:
            t = t if isinstance(t, Tool) else Tool.from_function(t)
            if t.name in self._tools:
                raise ValueError(f"duplicate tool name {t.name!r}")
            self._tools[t.name] = t

    @property
    def names(self) -> list[str]:
        return list(self._tools)

    @property
    def terminal(self) -> frozenset[str]:
        """Names of the tools that end the episode."""
        return frozenset(n for n, t in self._tools.items() if t.terminal)

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
            return _error("unknown_tool", f"Error: unknown tool {name!r}; available tools: {', '.join(self._tools)}")
        result = await self._call(t, arguments_json, state)
        return ToolResult(result.content, result.is_error, result.error_kind, terminal=True) if t.terminal else result

    async def _call(self, t: Tool, arguments_json: str | Mapping[str, Any], state: Any) -> ToolResult:
        name = t.name
        if isinstance(arguments_json, str):
            try:  # models send "" for a call without arguments
                args = json.loads(arguments_json) if arguments_json.strip() else {}
            except json.JSONDecodeError as e:
                return _error("invalid_json", f"Error: arguments for {name} are not valid JSON ({e})")
        else:
            args = dict(arguments_json)
        if not isinstance(args, dict):
            return _error("invalid_arguments", f"Error: arguments for {name} must be a JSON object")
        try:
            kwargs = t.validate_args(args)
        except ValueError as e:
            return _error("invalid_arguments", f"Error: invalid arguments for {name}:\n{e}")
        if t.state_param is not None:
            kwargs[t.state_param] = state
        errors = t.errors if t.errors is not None else self.errors
        try:
            if t.offload and not _is_async(t.fn):
                out = await run_blocking(t.fn, **kwargs)
            else:
                out = t.fn(**kwargs)
            if inspect.isawaitable(out):
                out = await typing.cast(Awaitable[Any], out)
            return ToolResult(content=serialize_result(out, t.serialize if t.serialize is not None else self.serialize))
        except EnvironmentFault:
            raise
        except Exception as e:  # the model must see it; the agent's loop must not crash
            kind = "tool_error" if isinstance(e, ToolError) else "exception"
            if callable(errors):
                return _error(kind, errors(e))
            if errors == "raw":
                return _error(kind, str(e))
            return _error(kind, f"Error: {e}" if kind == "tool_error" else f"Error: {name} failed: {type(e).__name__}: {e}")

    async def replay(self, actions: Sequence[Mapping[str, Any]], state: Any = None) -> list[ToolResult]:
        """Run gold actions `[{"name": ..., "arguments": {...}}, ...]` in order (for state hashes);
        stops after a terminal tool, as an episode would."""
        results = []
        for a in actions:
            results.append(await self.call(a["name"], a.get("arguments", {}), state))
            if results[-1].terminal:
                break
        return results


def serialize_result(value: Any, mode: Serialize = "canonical") -> str:
    """A tool's return value as message text: a `str` unchanged, anything else per `mode`
    (module docstring)."""
    if isinstance(value, str):
        return value
    if callable(mode):
        return mode(value)
    if mode == "str":
        return str(value)
    jsonable = pydantic_core.to_jsonable_python(value)
    return json.dumps(jsonable) if mode == "json" else json_dumps_canonical(jsonable)


def _error(kind: str, content: str) -> ToolResult:
    return ToolResult(content=content, is_error=True, error_kind=kind)


def _is_async(fn: Callable[..., Any]) -> bool:
    """Coroutine functions, and objects whose `__call__` is one, run on the loop."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


def _check_modes(name: str, serialize: Any, errors: Any) -> None:
    if serialize is not None and not callable(serialize) and serialize not in _SERIALIZE:
        raise ValueError(f"{name}: serialize must be one of {', '.join(_SERIALIZE)} or a function, got {serialize!r}")
    if errors is not None and not callable(errors) and errors not in _ERRORS:
        raise ValueError(f"{name}: errors must be one of {', '.join(_ERRORS)} or a function, got {errors!r}")


def _entry(schema: Mapping[str, Any]) -> dict[str, Any]:
    """An OpenAI tools entry, `{"type": "function", "function": {...}}`, from either form (a copy)."""
    if not isinstance(schema, Mapping):
        raise TypeError(f"a tool schema must be a mapping, got {type(schema).__name__}")
    entry = copy.deepcopy(dict(schema)) if "function" in schema else {"type": "function",
                                                                      "function": copy.deepcopy(dict(schema))}
    if not isinstance(entry["function"], Mapping) or "name" not in entry["function"]:
        raise ValueError(f"a tool schema needs a function name: {json.dumps(schema, default=str)[:120]}")
    return entry


def _is_state(hint: Any, state_type: type | tuple[type, ...]) -> bool:
    """Whether an annotation names the state type (or a subclass, or an Optional of it)."""
    if typing.get_origin(hint) is typing.Annotated:
        hint = typing.get_args(hint)[0]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_is_state(h, state_type) for h in typing.get_args(hint) if h is not type(None))
    return isinstance(hint, type) and issubclass(hint, state_type)


def _check_agrees(name: str, parameters: Mapping[str, Any], fields: Mapping[str, Any], takes_kwargs: bool) -> None:
    """A typed function and its declared schema must take the same arguments."""
    props = set(parameters.get("properties", {}))
    required = set(parameters.get("required", ()))
    problems = [f"the schema has {p!r}, the function does not take it" for p in sorted(props - set(fields))
                if not takes_kwargs]
    problems += [f"the function takes {p!r}, the schema does not have it" for p in sorted(set(fields) - props)]
    problems += [f"{p!r} has no default in the function but is optional in the schema"
                 for p in sorted(props & set(fields) - required) if fields[p][1].is_required()]
    if problems:
        raise TypeError(f"tool {name}: function and schema disagree: {'; '.join(problems)}")


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
