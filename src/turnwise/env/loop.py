"""The standard OpenAI tool loop, for agent authors who want one.

    for turn in 1..max_turns:
        reply = chat.completions.create(messages, tools)
        stop if the request failed (error), was cut by max_tokens (max_tokens),
             or asked for no tool (final_answer)
        run each requested tool call in order; append one tool message per call
        stop if a call was to a terminal tool (terminal_tool)
    stop (max_turns)

Tool calls run sequentially in the order the model wrote them, so the same replies give the
same messages. A failed tool call is a tool message ("Error: ..."), counted in `tool_errors`;
only a failed chat request ends the loop early with `StopReason.ERROR`. A call of a terminal
tool (`@tool(terminal=True)`, "transfer to a human") ends the episode right after its tool
message, whatever its outcome (as tau-bench's environments do); later calls of the same turn
are not run, and the model is not asked again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from turnwise.env.tools import ToolBox
from turnwise.types import Message, StopReason, ToolCall, as_messages

if TYPE_CHECKING:
    import openai

# Keyword arguments of `chat.completions.create`; other inference params go in `extra_body`.
_OPENAI_PARAMS = frozenset({
    "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed", "n",
    "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs", "parallel_tool_calls",
})


@dataclass(frozen=True)
class LoopResult:
    """The conversation a tool loop produced and how it ended."""

    messages: tuple[Message, ...]
    """The input messages followed by every assistant and tool message."""
    stop_reason: StopReason
    """Why it ended."""
    turns: int
    """Chat requests that returned a reply."""
    tool_calls: int
    """Tool calls executed."""
    tool_errors: int
    """Tool calls whose result was an error."""
    error: str | None = None
    """The failed request's error, when stop_reason is ERROR."""
    terminal_tool: str | None = None
    """The terminal tool that ended the episode, when stop_reason is TERMINAL_TOOL."""

    @property
    def final_text(self) -> str:
        """Content of the last assistant message ("" when there is none)."""
        return next((m.content for m in reversed(self.messages) if m.role == "assistant"), "")

    def metrics(self) -> dict[str, float]:
        """Per-rollout numbers for `RolloutResult.metrics`."""
        return {"rollout/turns": float(self.turns), "rollout/tool_calls": float(self.tool_calls),
                "rollout/tool_errors": float(self.tool_errors),
                f"rollout/stop/{self.stop_reason.value}": 1.0}


async def run_tool_loop(
    client: openai.AsyncOpenAI,
    model: str,
    messages: Sequence[Message | Mapping[str, Any]],
    toolbox: ToolBox,
    state: Any = None,
    *,
    max_turns: int = 10,
    inference_params: Mapping[str, Any] | None = None,
    extra_headers: Mapping[str, str] | None = None,
) -> LoopResult:
    """Run the tool loop against an OpenAI-compatible endpoint (see the module docstring)."""
    import openai  # here, not at module level: importing the SDK takes about a second
    if max_turns < 1:
        raise ValueError("max_turns must be >= 1")
    history = [m if isinstance(m, Message) else as_messages([m])[0] for m in messages]
    params = dict(inference_params or {})
    kwargs = {k: v for k, v in params.items() if k in _OPENAI_PARAMS}
    extra_body = {k: v for k, v in params.items() if k not in _OPENAI_PARAMS}
    tools = toolbox.schemas()
    turns = n_calls = n_errors = 0
    for _ in range(max_turns):
        try:
            response = await client.chat.completions.create(
                model=model, messages=[m.to_openai() for m in history],  # type: ignore[misc]
                tools=tools or openai.NOT_GIVEN,  # type: ignore[arg-type]
                extra_headers=dict(extra_headers or {}), extra_body=extra_body or None, **kwargs)
        except openai.OpenAIError as e:
            return LoopResult(tuple(history), StopReason.ERROR, turns, n_calls, n_errors,
                              error=f"{type(e).__name__}: {e}")
        if not response.choices:
            return LoopResult(tuple(history), StopReason.ERROR, turns, n_calls, n_errors,
                              error="the response has no choices")
        turns += 1
        choice = response.choices[0]
        calls = tuple(ToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments)
                      for c in (choice.message.tool_calls or ()) if c.type == "function")
        history.append(Message(role="assistant", content=choice.message.content or "", tool_calls=calls))
        if choice.finish_reason == "length":
            return LoopResult(tuple(history), StopReason.MAX_TOKENS, turns, n_calls, n_errors)
        if not calls:
            return LoopResult(tuple(history), StopReason.FINAL_ANSWER, turns, n_calls, n_errors)
        for call in calls:
            result = await toolbox.call(call.name, call.arguments, state)
            n_calls += 1
            n_errors += result.is_error
            history.append(Message(role="tool", content=result.content, tool_call_id=call.id, name=call.name))
            if result.terminal:
                return LoopResult(tuple(history), StopReason.TERMINAL_TOOL, turns, n_calls, n_errors,
                                  terminal_tool=call.name)
    return LoopResult(tuple(history), StopReason.MAX_TURNS, turns, n_calls, n_errors)
