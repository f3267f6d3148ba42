"""Supervised warm start: demonstration conversations -> datums for the `cross_entropy` loss.

A demonstration is tokenized exactly the way the runtime records a live conversation: the
first prompt from the chat template, each assistant message as the completion the model
would have sampled (ending at its end-of-turn token), and the messages in between as the
template's delta. So what the warm start teaches is token for token what RL later samples.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from turnwise.policy.chat import ChatFormat
from turnwise.types import Datum, Message, Segment, as_messages


class DemoFileError(ValueError):
    """A demonstration file is malformed; the message names the file and line."""


def load_demos(path: str | Path) -> list[tuple[tuple[Message, ...], list[Mapping[str, Any]]]]:
    path = Path(path)
    if not path.is_file():
        raise DemoFileError(f"demonstration file not found: {path}")
    demos = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            messages = as_messages(row["messages"])
            tools = list(row.get("tools") or [])
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise DemoFileError(f"{path}:{n}: expected {{\"messages\": [...], \"tools\": [...]}} ({e})") from None
        if not any(m.role == "assistant" for m in messages):
            raise DemoFileError(f"{path}:{n}: a demonstration needs at least one assistant message")
        demos.append((messages, tools))
    if not demos:
        raise DemoFileError(f"{path}: no demonstrations")
    return demos


def completion_ids(chat: ChatFormat, prev: Sequence[Message], reply: Message,
                   tools: Sequence[Mapping[str, Any]] | None) -> list[int]:
    """The tokens the model must sample after prompt(prev) to produce `reply`, end-of-turn included."""
    prompt = chat.render_text(prev, tools, add_generation_prompt=True)
    full = chat.render_text([*prev, reply], tools, add_generation_prompt=False)
    if not full.startswith(prompt):
        raise DemoFileError("the chat template renders an assistant message differently from its "
                            "generation prompt; cannot build a warm-start target")
    ids = chat.encode(full[len(prompt):])
    end = next((i for i, t in enumerate(ids) if t in chat.stop_token_ids), len(ids) - 1)
    return ids[: end + 1]


def demo_to_datum(chat: ChatFormat, messages: Sequence[Message],
                  tools: Sequence[Mapping[str, Any]] | None, trajectory_id: str = "demo") -> Datum:
    assistant_at = [i for i, m in enumerate(messages) if m.role == "assistant"]
    tokens = list(chat.prompt_ids(messages[: assistant_at[0]], tools))
    mask = [0] * len(tokens)
    turn_T = [-1] * len(tokens)
    for turn, i in enumerate(assistant_at):
        reply = completion_ids(chat, messages[:i], messages[i], tools)
        tokens += reply
        mask += [1] * len(reply)
        turn_T += [turn] * len(reply)
        if turn + 1 < len(assistant_at):
            delta = chat.delta_ids(messages[: i + 1], messages[i + 1 : assistant_at[turn + 1]], tools)
            if delta is None:
                raise DemoFileError("the chat template does not extend the conversation by appending; "
                                    "multi-turn demonstrations need a prefix-stable template")
            tokens += delta
            mask += [0] * len(delta)
            turn_T += [-1] * len(delta)
    segment = Segment(trajectory_id=trajectory_id, tokens_T=tuple(tokens), loss_mask_T=tuple(mask),
                      logprobs_T=(0.0,) * len(tokens), turn_T=tuple(turn_T), versions_T=(-1,) * len(tokens))
    return Datum(segment=segment, advantages_T=tuple(float(m) for m in mask))
