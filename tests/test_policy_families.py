"""Every model family on its real chat template: rendering, parsing and bridging against `apply_chat_template`.

For each template the conversation has a system prompt, tools, reasoning, parallel tool calls
(one call per message where the format allows only one), tool results and two user queries.
The model's completion of each assistant turn is what the template renders for that message
(what a model trained on the template writes), cut after the end-of-turn token it samples.
Checks: our prompt tokens equal `apply_chat_template(tokenize=True)`; parsing each completion
gives back the message; bridging from the stored tokens renders exactly the template's text for
the new messages, and within one tool cycle the bridged stream *is* the template's full render.
"""

from __future__ import annotations

import json

import pytest

from family_fixtures import NEW_SEGMENT_AFTER, SPECS, TOOLS, completion_text, renderer_for
from turnwise.policy.renderers import Renderer
from turnwise.types import Message


def _hf_ids(r: Renderer, msgs: list[Message]) -> list[int]:
    out = r.tokenizer.apply_chat_template([r.template_message(m) for m in msgs], tools=TOOLS, tokenize=True,
                                          add_generation_prompt=True, return_dict=False, **r.render_kwargs)
    return list(out)


def _same_message(got: Message, want: Message, completion: str) -> None:
    assert got.content == want.content
    # reasoning the template does not render (Gemma's on final answers) is not in the completion
    assert got.reasoning_content == (want.reasoning_content if want.reasoning_content in completion else "")
    assert [(c.name, json.loads(c.arguments)) for c in got.tool_calls] == \
        [(c.name, json.loads(c.arguments)) for c in want.tool_calls]


@pytest.fixture(scope="module", params=sorted(SPECS))
def case(request: pytest.FixtureRequest) -> tuple[Renderer, list[Message]]:
    return renderer_for(request.param)


def test_prompt_tokens_equal_apply_chat_template(case: tuple[Renderer, list[Message]]) -> None:
    r, msgs = case
    for i, m in enumerate(msgs):
        if m.role == "assistant":
            assert r.prompt_ids(msgs[:i], TOOLS) == _hf_ids(r, msgs[:i])


def test_parse_round_trip(case: tuple[Renderer, list[Message]]) -> None:
    r, msgs = case
    for i, m in enumerate(msgs):
        if m.role != "assistant":
            continue
        text = completion_text(r, msgs, i)
        ids = r.encode(text)
        assert ids[-1] in r.stop_token_ids
        got, error = r.parse_assistant(ids, {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS})
        assert not error
        _same_message(got, m, text)


def test_bridge_renders_the_new_messages_as_the_template_does(case: tuple[Renderer, list[Message]]) -> None:
    """One stream through the whole conversation: stored tokens + bridge, never re-rendered."""
    r, msgs = case
    turns = [i for i, m in enumerate(msgs) if m.role == "assistant"]
    stream = r.prompt_ids(msgs[:turns[0]], TOOLS)
    prev = turns[0]
    stream += r.encode(completion_text(r, msgs, prev))
    second_query = msgs.index(Message("user", "Thanks! And order 777?"))
    for i in turns[1:]:
        delta = r.delta_ids(msgs[:prev + 1], msgs[prev + 1:i], TOOLS, stream[-1])
        if delta is None and r.decode(stream[-1:]) in NEW_SEGMENT_AFTER.get(r.family.name, ()):
            stream = r.prompt_ids(msgs[:i], TOOLS)  # a new segment, by design
            stream += r.encode(completion_text(r, msgs, i))
            prev = i
            continue
        assert delta is not None, f"turn at message {i} could not be bridged"
        full = r.render_text(msgs[:i], TOOLS, add_generation_prompt=True)
        assert full.endswith(r.decode(delta)) and r.encode(r.decode(delta)) == delta
        stream += delta
        if i < second_query:  # one tool cycle: the template keeps the history, so the stream is its render
            assert stream == _hf_ids(r, msgs[:i])
        stream += r.encode(completion_text(r, msgs, i))
        prev = i


SAME_FORMAT = [{"hermes", "qwen3"}]
NO_MARKER = {"llama3"}  # its calls are bare JSON objects: nothing tells them apart from JSON content


def test_another_familys_tool_call_is_a_parse_error() -> None:
    """A model writing another family's call format gets no calls and the turn is flagged."""
    renderers = {t: renderer_for(t) for t in sorted(SPECS)}
    calls = {}
    for t, (r, msgs) in renderers.items():
        first_call = next(i for i, m in enumerate(msgs) if m.role == "assistant" and m.tool_calls)
        calls[t] = completion_text(r, msgs, first_call)
    specs = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
    checked = 0
    for t, (r, _) in renderers.items():
        for other, text in calls.items():
            fam, other_fam = SPECS[t].family, SPECS[other].family
            if fam == other_fam or other_fam in NO_MARKER or any({fam, other_fam} <= s for s in SAME_FORMAT):
                continue
            for stop in SPECS[other].specials + ("<|im_end|>",):  # the other family's end of turn, as text
                text = text.removesuffix(stop)
            message, error = r.parse_assistant(r.encode(text) + [next(iter(r.stop_token_ids))], specs)
            assert error and not message.tool_calls, f"{other} output parsed by {t}: {message}"
            checked += 1
    assert checked > 100
