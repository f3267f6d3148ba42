"""Read-only tools that replay recorded responses from a cassette file.

A cassette is JSONL, one recorded call per line:

    {"tool": "get_weather", "arguments": {"city": "Paris"}, "response": {"temp_c": 18}}
    {"tool": "get_order", "arguments": {"order_id": "ord_9"}, "error": "order ord_9 not found"}

`response` is any JSON value (a string is the tool message verbatim, anything else is
serialized canonically, exactly as a live tool's return value); `error` replays a `ToolError`.

Lookup key: the tool name and the canonical JSON of the arguments after (1) filling in the
schema's top-level defaults and (2) writing integral floats as integers. So key order,
whitespace, `1` vs `1.0` vs `1e0`, and an omitted argument that has a default do not matter.

On a miss the policy decides: `error` (the model reads "Error: no recorded response ..."),
`nearest` (the recorded call of the same tool sharing the most argument leaves, by Jaccard
similarity; ties go to the earliest line), or `raise` (`CassetteMiss`, an `EnvironmentFault`
that propagates out of `ToolBox.call`; use it in verify and tests).

Record mode: a miss calls the live function once, passes the record through the `redact`
hook (strip secrets, tokens, personal data), appends it to the file and returns the
redacted response, so the recording run sees what every replay will see. Hits are never
re-recorded. Redact responses, not arguments: the lookup key is computed from arguments.
Replay tools are read-only: a live function's `state` parameter receives None.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pydantic_core

from turnwise.env.tools import EnvironmentFault, Tool, ToolError
from turnwise.types import json_dumps_canonical


class CassetteMiss(EnvironmentFault):
    """No recorded response matches a call (miss policy "raise")."""


class MissPolicy(str, enum.Enum):
    """What a replay tool does when no recording matches."""

    ERROR = "error"
    NEAREST = "nearest"
    RAISE = "raise"


def normalize_json(value: Any) -> Any:
    """Integral floats as ints, recursively, so 1, 1.0 and 1e0 key the same."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {str(k): normalize_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [normalize_json(v) for v in value]
    return value


def _leaves(value: Any, prefix: str = "") -> set[str]:
    if isinstance(value, dict):
        return {leaf for k, v in value.items() for leaf in _leaves(v, f"{prefix}/{k}")} or {f"{prefix}={{}}"}
    if isinstance(value, list):
        return {leaf for i, v in enumerate(value) for leaf in _leaves(v, f"{prefix}/{i}")} or {f"{prefix}=[]"}
    return {f"{prefix}={json_dumps_canonical(value)}"}


class Cassette:
    """Recorded tool calls from one JSONL file, shared read-only by every rollout."""

    def __init__(self, path: str | os.PathLike[str], *, miss: MissPolicy | str = MissPolicy.ERROR,
                 record: bool = False, redact: Callable[[dict[str, Any]], dict[str, Any]] | None = None):
        self.path = Path(path)
        self.miss = MissPolicy(miss)
        self.record = record
        self.redact = redact
        self.records: list[dict[str, Any]] = []
        """Every recorded call, in file order."""
        self.stats = {"hits": 0, "misses": 0, "nearest": 0, "recorded": 0}
        """Counts across all rollouts (verify reports them)."""
        if self.path.exists():
            for n, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    rec = json.loads(line)
                    if not isinstance(rec, dict) or "tool" not in rec or ("response" not in rec and "error" not in rec):
                        raise ValueError(f"{self.path}:{n}: a record needs tool, arguments and response or error")
                    self.records.append(rec)
        elif not record:
            raise FileNotFoundError(f"cassette not found: {self.path}")

    def tool(self, spec: Callable[..., Any] | Mapping[str, Any], live: Callable[..., Any] | None = None) -> Tool:
        """A replay tool. `spec` is a typed function (its signature is the schema, and it is the
        live function in record mode) or an OpenAI function schema (then `live` records)."""
        base = Tool.from_schema(spec, live or _no_live) if isinstance(spec, Mapping) else Tool.from_function(spec)
        live_fn = live or (None if isinstance(spec, Mapping) else spec)
        defaults = {k: v["default"] for k, v in base.parameters.get("properties", {}).items()
                    if isinstance(v, Mapping) and "default" in v}

        def key(arguments: Mapping[str, Any]) -> str:
            return json_dumps_canonical(normalize_json({**defaults, **dict(arguments)}))

        index: dict[str, dict[str, Any]] = {}
        for rec in self.records:
            if rec["tool"] == base.name:
                index.setdefault(key(rec.get("arguments", {})), rec)

        async def replay(**kwargs: Any) -> Any:
            arguments = pydantic_core.to_jsonable_python(kwargs)
            k = key(arguments)
            rec = index.get(k)
            if rec is not None:
                self.stats["hits"] += 1
            elif self.record and live_fn is not None:
                live_kwargs = {**kwargs, base.state_param: None} if base.state_param else kwargs
                rec = await self._record(base.name, arguments, live_fn, live_kwargs)
                index.setdefault(k, rec)
            else:
                rec = self._on_miss(base.name, k, arguments, index)
            if "error" in rec:
                raise ToolError(str(rec["error"]))
            return rec["response"]

        return dataclasses.replace(base, fn=replay, state_param=None)

    def _on_miss(self, tool: str, key: str, arguments: Any, index: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
        self.stats["misses"] += 1
        if self.miss is MissPolicy.RAISE:
            raise CassetteMiss(f"{self.path}: no recording of {tool} with arguments {key}")
        if self.miss is MissPolicy.NEAREST and index:
            want = _leaves(normalize_json(arguments))

            def similarity(rec: dict[str, Any]) -> float:
                have = _leaves(normalize_json(rec.get("arguments", {})))
                return len(want & have) / max(1, len(want | have))

            self.stats["nearest"] += 1
            return max(index.values(), key=similarity)  # max keeps the first of equals
        return {"error": f"no recorded response for {tool} with these arguments"}

    async def _record(self, tool: str, arguments: Any, live: Callable[..., Any], kwargs: Mapping[str, Any]) -> dict:
        try:
            out = live(**kwargs)
            if inspect.isawaitable(out):
                out = await out
            rec: dict[str, Any] = {"tool": tool, "arguments": arguments,
                                   "response": pydantic_core.to_jsonable_python(out)}
        except ToolError as e:
            rec = {"tool": tool, "arguments": arguments, "error": str(e)}
        if self.redact is not None:
            rec = self.redact(rec)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json_dumps_canonical(rec) + "\n")
        self.records.append(rec)
        self.stats["recorded"] += 1
        return rec


def _no_live(**_: Any) -> Any:
    raise EnvironmentFault("replay tool has no live function")
