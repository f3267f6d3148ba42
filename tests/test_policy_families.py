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

from family_fixtures import SPECS, family_tokenizer
from turnwise.policy.renderers import Renderer
from turnwise.types import Message, ToolCall

TOOLS = [
    {"type": "function", "function": {
        "name": "lookup_order", "description": "Look up an order.",
        "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}}},
    {"type": "function", "function": {
        "name": "issue_refund", "description": "Refund an order.",
        "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}, "amount": {"type": "number"},
                                                        "full": {"type": "boolean"}},
                       "required": ["order_id", "amount"]}}},
]
ONE_CALL_PER_MESSAGE = {"gpt_oss", "llama3"}
NEW_SEGMENT_AFTER = {"gpt_oss": ("<|return|>",)}  # history renders a final answer's <|return|> as <|end|>
THINKING_ON = {"deepseek_v3": {"thinking": True}, "gemma4": {"enable_thinking": True}}


def _call(i: int, name: str, **args: object) -> ToolCall:
    return ToolCall(id=f"call{i:05d}", name=name, arguments=json.dumps(args, separators=(",", ":")))


def conversation(family: str, think: bool) -> list[Message]:
    """System, tools, reasoning (when the template renders it), parallel calls, tool results, a second query."""

    def asst(reasoning: str, content: str = "", calls: tuple[ToolCall, ...] = ()) -> Message:
        return Message("assistant", content, tool_calls=calls, reasoning_content=reasoning if think else "")

    refund, look = _call(2, "issue_refund", order_id="12345", amount=40.5, full=True), _call(3, "lookup_order",
                                                                                           order_id="999")
    parallel = [asst("Both at once.", calls=(refund, look))] if family not in ONE_CALL_PER_MESSAGE else [
        asst("Refund first.", calls=(refund,)), Message("tool", "refunded", tool_call_id=refund.id),
        asst("Now the other.", calls=(look,))]
    results = [Message("tool", "refunded", tool_call_id=refund.id)] if family not in ONE_CALL_PER_MESSAGE else []
    return [
        Message("system", "You are a support desk agent."),
        Message("user", "Where is order 12345? Refund it if damaged, and check 999."),
        asst("Look it up first.", calls=(_call(1, "lookup_order", order_id="12345"),)),
        Message("tool", '{"status": "damaged", "amount": 40.5}', tool_call_id="call00001"),
        *parallel, *results,
        Message("tool", '{"status": "shipped"}', tool_call_id=look.id),
        asst("All done.", "Order 12345 was refunded; 999 has shipped."),
        Message("user", "Thanks! And order 777?"),
        asst("Check it.", calls=(_call(4, "lookup_order", order_id="777"),)),
        Message("tool", '{"status": "delivered"}', tool_call_id="call00004"),
        asst("Delivered.", "Order 777 was delivered."),
    ]


_NEXT_MARKER = {"glm4": {"tool": "<|observation|>", "user": "<|user|>"}}


def completion_text(r: Renderer, msgs: list[Message], i: int) -> str:
    """What the model writes for assistant message i: the template's rendering of it, to its stop token."""
    prompt = r.render_text(msgs[:i], TOOLS, add_generation_prompt=True)
    text = r.render_text(msgs[:i + 1], TOOLS, add_generation_prompt=False)
    if r.family.name == "gpt_oss" and not text.startswith(prompt):
        # harmony drops earlier analysis once a final answer follows: find the last message by its header
        tail = text[text.rfind("<|start|>assistant<|channel|>analysis") + len("<|start|>assistant"):]
    else:
        assert text.startswith(prompt), "the template renders the last assistant message after its generation prompt"
        tail = text[len(prompt):]
    ends = [(tail.find(s), s) for s in r.family.stop_strings if s in tail]
    if ends:
        at, stop = min(ends)
        return tail[:at + len(stop)]
    nxt = msgs[i + 1].role if i + 1 < len(msgs) else "user"
    return tail.rstrip("\n") + _NEXT_MARKER[r.family.name][nxt]


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
    spec = SPECS[request.param]
    r = Renderer(family_tokenizer(request.param), template_kwargs=THINKING_ON.get(spec.family))
    assert r.format == spec.family, f"{request.param} detected as {r.format}"
    template = r.tokenizer.chat_template
    return r, conversation(spec.family, "reasoning_content" in template or ".thinking" in template)


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
