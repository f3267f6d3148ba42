"""Oracle and null rollouts: the two reference agents `turnwise verify` scores an environment with.

An environment is fit for training when the oracle (gold actions, then the gold answer)
scores 1, the null agent (answers at once, calls nothing) scores 0, and running the oracle
twice gives identical messages and state hashes. Both produce a `LoopResult` without any
model, through the same `ToolBox.call` path an agent uses, so tool errors and serialization
are exercised exactly as in training. The oracle honours terminal tools: a gold action that
calls one ends the rollout there (`StopReason.TERMINAL_TOOL`, no final answer), and a gold
action after it is an error in the task, reported as such.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from turnwise.env.loop import LoopResult, StopReason
from turnwise.env.tools import ToolBox
from turnwise.types import Message, ToolCall, as_messages, json_dumps_canonical


def format_final_output(answer: Any) -> str:
    """The answer block graders read: `<final_output>{canonical JSON}</final_output>`."""
    return f"<final_output>{json_dumps_canonical(answer)}</final_output>"


async def oracle_rollout(toolbox: ToolBox, state: Any, messages: Sequence[Message | Mapping[str, Any]],
                         actions: Sequence[Mapping[str, Any]], answer: Any = None, *,
                         reply: str | None = None) -> LoopResult:
    """Run the gold `actions` (`[{"name", "arguments"}]`), one assistant turn each, then answer:
    `reply` verbatim when given, else `format_final_output(answer)`."""
    history = [m if isinstance(m, Message) else as_messages([m])[0] for m in messages]
    errors = 0
    for i, action in enumerate(actions):
        arguments = json_dumps_canonical(action.get("arguments", {}))
        call = ToolCall(id=f"call_{i}", name=str(action["name"]), arguments=arguments)
        history.append(Message(role="assistant", tool_calls=(call,)))
        result = await toolbox.call(call.name, arguments, state)
        errors += result.is_error
        history.append(Message(role="tool", content=result.content, tool_call_id=call.id, name=call.name))
        if result.terminal:
            if i + 1 < len(actions):
                raise ValueError(f"gold action {i + 2} ({actions[i + 1]['name']}) comes after the terminal tool "
                                 f"{call.name}, so no episode can reach it")
            return LoopResult(tuple(history), StopReason.TERMINAL_TOOL, turns=len(actions),
                              tool_calls=len(actions), tool_errors=errors, terminal_tool=call.name)
    history.append(Message(role="assistant", content=reply if reply is not None else format_final_output(answer)))
    return LoopResult(tuple(history), StopReason.FINAL_ANSWER, turns=len(actions) + 1,
                      tool_calls=len(actions), tool_errors=errors)


def null_rollout(messages: Sequence[Message | Mapping[str, Any]], content: str = "") -> LoopResult:
    """An agent that answers at once with `content` and touches nothing."""
    history = [m if isinstance(m, Message) else as_messages([m])[0] for m in messages]
    history.append(Message(role="assistant", content=content))
    return LoopResult(tuple(history), StopReason.FINAL_ANSWER, turns=1, tool_calls=0, tool_errors=0)
