"""plan_prompt and build_segments: reuse exactly the stored tokens, cut segments where history changes."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from turnwise.runtime.capture import PlanReason, build_segments, plan_prompt
from turnwise.runtime.testing import IM_END, ByteChat
from turnwise.types import FinishReason, Message, ToolCall, Trajectory, TrajectoryStatus, Turn

CHAT = ByteChat()
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]


def turn_for(messages, completion_text: str, prompt_ids=None, index: int = 0, reused: int = 0,
             eos: bool = True, tools=TOOLS) -> Turn:
    completion = tuple(CHAT.encode(completion_text)) + ((IM_END,) if eos else ())
    message, _ = CHAT.parse_assistant(completion, ["lookup"])
    prompt = tuple(prompt_ids) if prompt_ids is not None else tuple(CHAT.prompt_ids(messages, tools))
    return Turn(index=index, prompt_ids=prompt, completion_ids=completion, logprobs=(-1.0,) * len(completion),
                version=0, finish_reason=FinishReason.STOP if eos else FinishReason.LENGTH, message=message,
                reused_prompt_tokens=reused, request_messages=tuple(messages))


def traj(*turns: Turn, tools=TOOLS) -> Trajectory:
    return Trajectory(id="t", job_id="j", status=TrajectoryStatus.IN_PROGRESS, turns=turns, tools=tuple(tools))


USER = (Message(role="system", content="be brief"), Message(role="user", content="find x"))
CALL_TEXT = '<tool_call>{"name": "lookup", "arguments": {"q": "x", "limit": 2}}</tool_call>'


def test_first_turn_renders_everything():
    plan = plan_prompt(None, USER, TOOLS, CHAT)
    assert plan.reason == PlanReason.FIRST and plan.reused_prompt_tokens == 0
    assert list(plan.prompt_ids) == CHAT.prompt_ids(USER, TOOLS)


def test_extension_reuses_stored_tokens_and_appends_delta():
    t0 = turn_for(USER, CALL_TEXT)
    # the agent re-serializes the arguments with other key order and whitespace
    call = t0.message.tool_calls[0]
    echoed = Message(role="assistant", content="", tool_calls=(
        ToolCall(id=call.id, name="lookup", arguments=json.dumps({"limit": 2, "q": "x"}, indent=2)),))
    messages = (*USER, echoed, Message(role="tool", content="x=1", tool_call_id=call.id))
    plan = plan_prompt(traj(t0), messages, TOOLS, CHAT)
    assert plan.reason == PlanReason.EXTENDS
    stored = t0.prompt_ids + t0.completion_ids
    assert plan.reused_prompt_tokens == len(stored) and plan.prompt_ids[:len(stored)] == stored
    # the delta is what the template adds after the assistant's end-of-turn token
    assert CHAT.decode(plan.prompt_ids[len(stored):]) == "\n<|im_start|>tool\nx=1<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("change, reason", [
    ("drop_first", PlanReason.REWRITTEN),
    ("edit_answer", PlanReason.REWRITTEN),
    ("no_new_message", PlanReason.REWRITTEN),
    ("tools", PlanReason.TOOLS_CHANGED),
    ("unterminated", PlanReason.UNTERMINATED),
])
def test_anything_else_renders_in_full(change, reason):
    t0 = turn_for(USER, "answer", eos=change != "unterminated")
    history = [*USER, t0.message, Message(role="user", content="more")]
    tools = TOOLS
    if change == "drop_first":
        history = history[1:]
    elif change == "edit_answer":
        history[2] = Message(role="assistant", content="an edited answer")
    elif change == "no_new_message":
        history = history[:3]
    elif change == "tools":
        tools = [*TOOLS, {"type": "function", "function": {"name": "other"}}]
    plan = plan_prompt(traj(t0), history, tools, CHAT)
    assert plan.reason == reason and plan.reused_prompt_tokens == 0
    assert list(plan.prompt_ids) == CHAT.prompt_ids(history, tools)


def test_template_that_is_not_a_prefix_falls_back():
    class NoDelta(ByteChat):
        def delta_ids(self, prev, new, tools, stop_id=None):
            return None

    t0 = turn_for(USER, "answer")
    plan = plan_prompt(traj(t0), (*USER, t0.message, Message(role="user", content="more")), TOOLS, NoDelta())
    assert plan.reason == PlanReason.NO_DELTA and plan.reused_prompt_tokens == 0


def test_segments_join_extending_turns_and_mask_only_sampled_tokens():
    t0 = turn_for(USER, CALL_TEXT)
    m1 = (*USER, t0.message, Message(role="tool", content="x=1", tool_call_id="call_0"))
    p1 = plan_prompt(traj(t0), m1, TOOLS, CHAT)
    t1 = turn_for(m1, "x is 1", prompt_ids=p1.prompt_ids, index=1, reused=p1.reused_prompt_tokens)
    m2 = (Message(role="user", content="only the question"),)  # history dropped: new segment
    t2 = turn_for(m2, "ok", index=2)
    segs = build_segments(traj(t0, t1, t2))
    assert len(segs) == 2
    s0 = segs[0]
    assert s0.tokens_T == t1.prompt_ids + t1.completion_ids
    assert sum(s0.loss_mask_T) == len(t0.completion_ids) + len(t1.completion_ids)
    sampled = [tok for tok, m in zip(s0.tokens_T, s0.loss_mask_T, strict=True) if m]
    assert tuple(sampled) == t0.completion_ids + t1.completion_ids
    assert set(s0.turn_T) == {-1, 0, 1} and s0.logprobs_T.count(-1.0) == sum(s0.loss_mask_T)
    assert segs[1].tokens_T == t2.prompt_ids + t2.completion_ids and set(segs[1].turn_T) == {-1, 2}


def test_segments_refuse_inconsistent_turns():
    t0 = turn_for(USER, "answer")
    bad = Turn(**{**t0.__dict__, "logprobs": (0.0,)})
    with pytest.raises(ValueError, match="logprobs"):
        build_segments(traj(bad))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.lists(st.integers(0, 255), min_size=1, max_size=5),
                          st.lists(st.integers(0, 255), min_size=0, max_size=5)), min_size=1, max_size=6))
def test_every_turn_is_a_prefix_of_its_segment(steps):
    """Random extend/restart sequences: each turn's prompt+completion is its segment's prefix."""
    turns, stream = [], []
    for i, (extend, new_prompt, completion) in enumerate(steps):
        prompt = (stream + new_prompt) if extend and stream else new_prompt
        turns.append(Turn(index=i, prompt_ids=tuple(prompt), completion_ids=tuple(completion),
                          logprobs=(-0.5,) * len(completion), version=i, finish_reason=FinishReason.STOP,
                          message=Message(role="assistant")))
        stream = prompt + completion
    segs = build_segments(traj(*turns))
    assert sum(sum(s.loss_mask_T) for s in segs) == sum(len(t.completion_ids) for t in turns)
    for s in segs:
        assert len(s.tokens_T) == len(s.loss_mask_T) == len(s.logprobs_T) == len(s.turn_T) == len(s.versions_T)
        for i in sorted(set(s.turn_T) - {-1}):
            t = turns[i]
            assert s.tokens_T[:len(t.prompt_ids) + len(t.completion_ids)] == t.prompt_ids + t.completion_ids
