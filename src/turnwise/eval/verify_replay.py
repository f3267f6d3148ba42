"""The pieces `turnwise verify` replays and compares rollouts with.

`RoutingSampler` is the policy the verify runtime serves. It routes each request by its
trajectory id (the runtime passes `cache_key="<job>/<trajectory id>"`):
- a trajectory given a script (`replay`) gets, turn by turn, the completion token ids the first
  run sampled, so the agent receives the same assistant messages while every tool runs again;
- a trajectory marked `empty` gets an immediate end of turn (the null policy: it says nothing);
- any other trajectory is sampled by the real policy.

`tool_responses` reads the tool messages of a recorded trajectory back from its turns'
`request_messages`, and `json_diff` / `content_diff` say where two values differ, as
`path: got != expected` lines.
"""

from __future__ import annotations

import difflib
import inspect
import json
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from turnwise.runtime.protocols import Sampler
from turnwise.types import (
    Completion,
    FinishReason,
    SampleContext,
    SamplingParams,
    Trajectory,
    json_dumps_canonical,
)


class ReplayExhausted(ValueError):
    """The agent asked for more turns than the first run had (the runtime answers 400)."""


class RoutingSampler:
    """A `Sampler` that replays, stays silent or samples, per trajectory (module docstring)."""

    def __init__(self, policy: Sampler, stop_token_ids: Collection[int]) -> None:
        self.policy = policy
        self._stop_id = min(stop_token_ids)
        self._scripts: dict[str, tuple[Completion, ...]] = {}
        self._next: dict[str, int] = {}
        self._empty: set[str] = set()
        self._policy_takes = set(inspect.signature(policy.generate).parameters) & {"cache_key", "context"}

    @property
    def version(self) -> int:
        return self.policy.version

    def replay(self, trajectory_id: str, recorded: Trajectory) -> None:
        """Serve `recorded`'s completions, in order, to the trajectory `trajectory_id`."""
        self._scripts[trajectory_id] = tuple(
            Completion(token_ids=t.completion_ids, logprobs=t.logprobs, finish_reason=t.finish_reason,
                       version=t.version, prompt_tokens=len(t.prompt_ids))
            for t in recorded.turns)
        self._next[trajectory_id] = 0

    def empty(self, trajectory_id: str) -> None:
        """Answer every turn of `trajectory_id` with an immediate end of turn."""
        self._empty.add(trajectory_id)

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams,
                       cache_key: str | None = None, context: SampleContext | None = None) -> Completion:
        trajectory_id = (cache_key or "").partition("/")[2]
        if trajectory_id in self._scripts:
            script, i = self._scripts[trajectory_id], self._next[trajectory_id]
            if i >= len(script):
                raise ReplayExhausted(f"replay: the agent asked for turn {i + 1}, "
                                      f"but the first run had {len(script)} turns")
            self._next[trajectory_id] = i + 1
            return script[i]
        if trajectory_id in self._empty:
            return Completion(token_ids=(self._stop_id,), logprobs=(0.0,), finish_reason=FinishReason.STOP,
                              version=self.version, prompt_tokens=len(prompt_ids))
        extra = {k: v for k, v in (("cache_key", cache_key), ("context", context)) if k in self._policy_takes}
        return await self.policy.generate(prompt_ids, params, **extra)  # type: ignore[call-arg]


@dataclass(frozen=True)
class ToolResponse:
    """One tool message of a recorded rollout, with the call it answers."""

    turn: int
    """1-based assistant turn whose tool call this answers."""
    call: int
    """0-based position among that turn's tool messages."""
    tool: str
    """Tool name (from the message, else from the matching call, else "?")."""
    arguments: str
    """The call's arguments as the model wrote them ("" when the call is not found)."""
    content: str
    """The tool message's content."""

    @property
    def where(self) -> str:
        return f"turn {self.turn}, call {self.call}"


def tool_responses(trajectory: Trajectory) -> list[ToolResponse]:
    """The tool messages the agent sent back after each turn, in order.

    Turn k's request ends with the tool messages answering turn k-1's calls; tool calls made
    after the last model call are never sent to the model, so they are not recorded here
    (the final state still covers their effects).
    """
    out = []
    for k, turn in enumerate(trajectory.turns[1:], start=1):
        msgs = turn.request_messages
        j = len(msgs)
        while j > 0 and msgs[j - 1].role == "tool":
            j -= 1
        calls = {c.id: c for c in msgs[j - 1].tool_calls} if j > 0 else {}
        for pos, m in enumerate(msgs[j:]):
            call = calls.get(m.tool_call_id or "")
            out.append(ToolResponse(turn=k, call=pos, tool=m.name or (call.name if call else "?"),
                                    arguments=call.arguments if call else "", content=m.content))
    return out


def json_diff(got: Any, expected: Any, path: str = "$") -> list[str]:
    """Where two JSON values differ; lists of unequal length are compared as multisets."""
    if isinstance(got, Mapping) and isinstance(expected, Mapping):
        out = [f"{path}.{k}: missing" for k in sorted(set(expected) - set(got), key=str)]
        out += [f"{path}.{k}: unexpected" for k in sorted(set(got) - set(expected), key=str)]
        for k in sorted(set(got) & set(expected), key=str):
            out += json_diff(got[k], expected[k], f"{path}.{k}")
        return out
    if isinstance(got, list | tuple) and isinstance(expected, list | tuple):
        if len(got) == len(expected):
            return [d for i, (a, e) in enumerate(zip(got, expected, strict=True))
                    for d in json_diff(a, e, f"{path}[{i}]")]
        g, e = Counter(_canon(x) for x in got), Counter(_canon(x) for x in expected)
        out = [f"{path}: {len(got)} items, expected {len(expected)}"]
        out += [f"{path}: unexpected item {_short(x)}{_times(n)}" for x, n in (g - e).items()]
        out += [f"{path}: missing item {_short(x)}{_times(n)}" for x, n in (e - g).items()]
        return out
    if type(got) is type(expected) and got == expected:
        return []
    return [f"{path}: {_short(got)} != expected {_short(expected)}"]


def content_diff(got: str, expected: str) -> list[str]:
    """A tool message's difference: by JSON path when both are JSON, else by line."""
    if got == expected:
        return []
    try:
        return json_diff(json.loads(got), json.loads(expected)) or [f"{_short(got)} != expected {_short(expected)}"]
    except ValueError:
        pass
    if "\n" not in got and "\n" not in expected:
        return [f"{_short(got)} != expected {_short(expected)}"]
    lines = difflib.unified_diff(expected.splitlines(), got.splitlines(), "expected", "got", lineterm="", n=1)
    return list(lines)[:20]


def _canon(value: Any) -> str:
    try:
        return json_dumps_canonical(value)
    except (TypeError, ValueError):
        return repr(value)


def _times(n: int) -> str:
    return f" (x{n})" if n > 1 else ""


def _short(value: Any, limit: int = 160) -> str:
    text = value if isinstance(value, str) and value.startswith(("{", "[")) else repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
