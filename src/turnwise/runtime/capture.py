"""Token-exact capture: plan each turn's prompt from the stored conversation, cut segments.

Pure functions, no I/O.

`plan_prompt`: when the agent's messages are exactly the previous turn's request messages plus
the assistant message we returned (compared with `Message.same_as`, so re-serialized tool-call
JSON and dropped reasoning still match), followed by new messages, the prompt is the previous
turn's `prompt_ids + completion_ids` (the tokens the sampler actually processed and produced,
never re-tokenized) plus the renderer's bridge: the template's rendering of the new messages
only. This holds for templates that are not append-only (Qwen3 decorates the last assistant
message and strips reasoning after a new query): see `policy.renderers.base`. Otherwise (history
rewritten, tools changed, the previous completion did not end with an end-of-turn token, or the
bridge cannot be shown exact) the full conversation is rendered again, and the turn starts a new
segment; each turn's reason is counted.

`build_segments`: consecutive turns whose prompt extends the previous segment's tokens join it;
the prompt tokens they add (tool results, user turns, the next generation prompt) get loss mask
0, sampled tokens mask 1.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from turnwise.runtime.protocols import Chat
from turnwise.types import Message, Segment, Trajectory, Turn, json_dumps_canonical


class PlanReason(str, enum.Enum):
    """Why a prompt was built the way it was (reported as a metric: re-renders are drift risks)."""

    FIRST = "first"
    """The trajectory's first turn."""
    EXTENDS = "extends"
    """The stored tokens were reused and the new messages appended as a delta."""
    REWRITTEN = "rewritten"
    """The agent's messages do not extend the stored conversation."""
    TOOLS_CHANGED = "tools_changed"
    """The agent offered other tools than on the first turn."""
    UNTERMINATED = "unterminated"
    """The previous completion did not end with an end-of-turn token (length or stop string)."""
    NO_DELTA = "no_delta"
    """The chat template's rendering of the stored conversation is not a prefix of the new one."""


@dataclass(frozen=True)
class PromptPlan:
    """The prompt for one turn."""

    prompt_ids: tuple[int, ...]
    """Every token the sampler will process."""
    reused_prompt_tokens: int
    """Leading tokens taken from the stored turn (0 when rendered in full)."""
    reason: PlanReason
    """How the prompt was built."""


def same_tools(a: Sequence[Mapping[str, Any]] | None, b: Sequence[Mapping[str, Any]] | None) -> bool:
    """Tool lists equal by value (key order and whitespace do not matter)."""
    a, b = tuple(a or ()), tuple(b or ())
    return len(a) == len(b) and json_dumps_canonical(list(a)) == json_dumps_canonical(list(b))


def plan_prompt(previous: Trajectory | None, messages: Sequence[Message],
                tools: Sequence[Mapping[str, Any]] | None, chat: Chat) -> PromptPlan:
    """The prompt for the next turn of `previous` (only its last turn and tools are read)."""
    messages = tuple(messages)
    if previous is None or not previous.turns:
        return PromptPlan(tuple(chat.prompt_ids(messages, tools)), 0, PlanReason.FIRST)

    def full(reason: PlanReason) -> PromptPlan:
        return PromptPlan(tuple(chat.prompt_ids(messages, tools)), 0, reason)

    last = previous.turns[-1]
    history = (*last.request_messages, last.message)
    if len(messages) <= len(history) or not all(
            m.same_as(h) for m, h in zip(messages, history, strict=False)):
        return full(PlanReason.REWRITTEN)
    if not same_tools(previous.tools, tools):
        return full(PlanReason.TOOLS_CHANGED)
    if not last.completion_ids or last.completion_ids[-1] not in chat.stop_token_ids:
        return full(PlanReason.UNTERMINATED)
    # the stored messages stand in for the agent's (equal, maybe differently serialized) echoes
    delta = chat.delta_ids(history, messages[len(history):], tools, last.completion_ids[-1])
    if delta is None:
        return full(PlanReason.NO_DELTA)
    reused = last.prompt_ids + last.completion_ids
    return PromptPlan(reused + tuple(delta), len(reused), PlanReason.EXTENDS)


class _SegmentBuilder:
    def __init__(self, trajectory_id: str, prompt_ids: Sequence[int]) -> None:
        self.trajectory_id = trajectory_id
        self.tokens_T: list[int] = []
        self.mask_T: list[int] = []
        self.logprobs_T: list[float] = []
        self.turn_T: list[int] = []
        self.versions_T: list[int] = []
        self.turns: list[Turn] = []
        self.add_prompt(prompt_ids)

    def extended_by(self, prompt_ids: Sequence[int]) -> bool:
        n = len(self.tokens_T)
        return len(prompt_ids) >= n and list(prompt_ids[:n]) == self.tokens_T

    def add_prompt(self, new_ids: Sequence[int]) -> None:
        n = len(new_ids)
        self.tokens_T += new_ids
        self.mask_T += [0] * n
        self.logprobs_T += [0.0] * n
        self.turn_T += [-1] * n
        self.versions_T += [-1] * n

    def add_completion(self, turn: Turn) -> None:
        n = len(turn.completion_ids)
        self.tokens_T += turn.completion_ids
        self.mask_T += [1] * n
        self.logprobs_T += turn.logprobs
        self.turn_T += [turn.index] * n
        self.versions_T += [turn.version] * n
        self.turns.append(turn)

    def build(self) -> Segment:
        tokens_T = tuple(self.tokens_T)
        for turn in self.turns:  # what the sampler processed for each turn is a prefix, at offset 0
            n_p, n_c = len(turn.prompt_ids), len(turn.completion_ids)
            if tokens_T[:n_p] != turn.prompt_ids or tokens_T[n_p:n_p + n_c] != turn.completion_ids:
                raise AssertionError(f"trajectory {self.trajectory_id}: segment tokens differ from what "
                                     f"the sampler processed in turn {turn.index}")
        return Segment(trajectory_id=self.trajectory_id, tokens_T=tokens_T, loss_mask_T=tuple(self.mask_T),
                       logprobs_T=tuple(self.logprobs_T), turn_T=tuple(self.turn_T),
                       versions_T=tuple(self.versions_T))


def build_segments(trajectory: Trajectory) -> list[Segment]:
    """Cut a trajectory into training sequences: one per run of turns that extend each other."""
    segments: list[Segment] = []
    current: _SegmentBuilder | None = None
    for turn in trajectory.turns:
        if len(turn.logprobs) != len(turn.completion_ids):
            raise ValueError(f"trajectory {trajectory.id} turn {turn.index}: "
                             f"{len(turn.logprobs)} logprobs for {len(turn.completion_ids)} tokens")
        if current is not None and current.extended_by(turn.prompt_ids):
            current.add_prompt(turn.prompt_ids[len(current.tokens_T):])
        else:
            if current is not None:
                segments.append(current.build())
            current = _SegmentBuilder(trajectory.id, turn.prompt_ids)
        current.add_completion(turn)
    if current is not None:
        segments.append(current.build())
    return segments
