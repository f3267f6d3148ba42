"""ChatFormat on the tiny (Hermes) template: rendering, parse round trip, delta ids, robust parsing."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from turnwise.policy.chat import ChatFormat, detect_family
from turnwise.policy.tokenizer import HERMES_TEMPLATE, build_tiny_tokenizer
from turnwise.types import Message, ToolCall

TOOLS = [
    {"type": "function", "function": {"name": "get_order", "description": "Look up an order.",
                                      "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "refund_order", "parameters": {"type": "object"}}},
]
NAMES = {"get_order", "refund_order"}


@pytest.fixture(scope="module")
def chat() -> ChatFormat:
    return ChatFormat(build_tiny_tokenizer(1024))


def _conversation() -> tuple[list[Message], list[Message]]:
    prev = [
        Message("system", "You are a support agent."),
        Message("user", "Where is ORD-123?"),
        Message("assistant", "Let me check.", (ToolCall("call_1", "get_order", '{"order_id":"ORD-123"}'),
                                               ToolCall("call_2", "refund_order", '{"amount":12.5}'))),
    ]
    new = [Message("tool", '{"status":"shipped"}', tool_call_id="call_1"),
           Message("tool", '{"ok":true}', tool_call_id="call_2")]
    return prev, new


def _completion(chat: ChatFormat, prev: list[Message]) -> list[int]:
    """The ids the model would sample for prev[-1] if it wrote exactly the template's text."""
    before = chat.render_text(prev[:-1], TOOLS, add_generation_prompt=True)
    after = chat.render_text(prev, TOOLS, add_generation_prompt=False)
    assert after.startswith(before)
    return chat.encode(after[len(before):].removesuffix("\n"))


def test_render_is_compact_hermes(chat: ChatFormat) -> None:
    prev, new = _conversation()
    text = chat.render_text([*prev, *new], TOOLS, add_generation_prompt=True)
    assert chat.format == "hermes"
    # one signature line per tool; a nested schema stays compact JSON
    assert "\n# Tools\nget_order(order_id: string): Look up an order.\nrefund_order(): \nCall a tool as" in text
    nested = {"name": "f", "description": "d", "parameters": {"properties": {
        "n": {"type": ["integer", "null"]}, "kind": {"enum": ["a", "b"]}}}}
    assert "\nf(n: {\"type\": [\"integer\", \"null\"]}, kind: a|b): d\n" in chat.render_text([Message("user", "hi")], [nested], False)
    assert '<tool_call>\n{"name": "get_order", "arguments": {"order_id": "ORD-123"}}\n</tool_call>' in text
    assert text.count("<|im_start|>user\n<tool_response>") == 1
    assert text.endswith('</tool_response><|im_end|>\n<|im_start|>assistant\n')
    string_args = Message("assistant", "", (ToolCall("c", "get_order", '{"order_id": "X"}'),))
    assert '"arguments": {"order_id": "X"}}' in chat.render_text([string_args], None, False)


def test_parse_round_trip(chat: ChatFormat) -> None:
    prev, _ = _conversation()
    message, error = chat.parse_assistant(_completion(chat, prev), NAMES)
    assert not error
    assert message.same_as(prev[-1])
    assert all(c.id.startswith("call_") and len(c.id) == 17 for c in message.tool_calls)
    assert message.tool_calls[1].arguments == '{"amount":12.5}'


def test_delta_ids_continue_the_stream_exactly(chat: ChatFormat) -> None:
    prev, new = _conversation()
    stream = chat.prompt_ids(prev[:-1], TOOLS) + _completion(chat, prev)
    delta = chat.delta_ids(prev, new, TOOLS)
    assert delta is not None
    assert stream + delta == chat.prompt_ids([*prev, *new], TOOLS)
    plain_prev = [Message("user", "hi"), Message("assistant", "Hello 42.")]
    plain_new = [Message("user", "Refund 7 please")]
    stream = chat.prompt_ids(plain_prev[:-1], None) + _completion_plain(chat, plain_prev)
    assert stream + chat.delta_ids(plain_prev, plain_new, None) == chat.prompt_ids([*plain_prev, *plain_new], None)


def _completion_plain(chat: ChatFormat, prev: list[Message]) -> list[int]:
    before = chat.render_text(prev[:-1], None, add_generation_prompt=True)
    return chat.encode(chat.render_text(prev, None, add_generation_prompt=False)[len(before):].removesuffix("\n"))


def test_delta_is_none_when_history_is_rewritten() -> None:
    tok = build_tiny_tokenizer(1024)
    tok.chat_template = HERMES_TEMPLATE.replace(
        "{%- for message in messages %}", "{%- for message in messages[-1:] %}")
    rewriting = ChatFormat(tok)
    prev = [Message("user", "a"), Message("assistant", "b")]
    assert rewriting.delta_ids(prev, [Message("user", "c")], None) is None


@pytest.mark.parametrize("text", [
    '<tool_call>\n{"name": "get_order", "arguments": {"order_id": \n</tool_call>',
    '<tool_call>\n{"name": "delete_everything", "arguments": {}}\n</tool_call>',
    '<tool_call>\n{"name": "get_order", "arguments": {}}',
    '<tool_call>\n{"arguments": {}}\n</tool_call>',
    '<tool_call>\n{"name": "get_order"}\n</tool_call>',
    '<tool_call>\n["get_order", {}]\n</tool_call>',
    'done </tool_call>',
])
def test_malformed_calls_stay_text(chat: ChatFormat, text: str) -> None:
    message, error = chat.parse_assistant(chat.encode(text + "<|im_end|>"), NAMES)
    assert error and not message.tool_calls
    assert message.content == text.strip()


def test_plain_text_and_string_arguments(chat: ChatFormat) -> None:
    message, error = chat.parse_assistant(chat.encode("The refund is 12.50.<|im_end|>"), NAMES)
    assert (message.content, message.tool_calls, error) == ("The refund is 12.50.", (), False)
    text = '<tool_call>\n{"name": "get_order", "arguments": "{\\"order_id\\": \\"A\\"}"}\n</tool_call>'
    message, error = chat.parse_assistant(chat.encode(text), None)
    assert not error and json.loads(message.tool_calls[0].arguments) == {"order_id": "A"}


_FRAGMENTS = st.sampled_from(["<tool_call>", "</tool_call>", "{", "}", '"name"', '"arguments"', ":", ",",
                              '"get_order"', "[", "]", "\n", "<|im_end|>", "<|im_start|>", "null", "1e999",
                              '"\\u0000"', "é", " "])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(_FRAGMENTS, st.text(max_size=8)), max_size=30))
def test_parser_never_raises_on_garbage_text(text_parts: list[str]) -> None:
    chat = _shared_chat()
    text = "".join(text_parts)
    message, error = chat.parse_assistant(chat.encode(text), NAMES)
    assert message.role == "assistant"
    assert error or not message.tool_calls or all(c.name in NAMES for c in message.tool_calls)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=1023), max_size=60))
def test_parser_never_raises_on_garbage_ids(ids: list[int]) -> None:
    message, _ = _shared_chat().parse_assistant(ids, None)
    assert message.role == "assistant"


_CHAT: list[ChatFormat] = []


def _shared_chat() -> ChatFormat:
    if not _CHAT:
        _CHAT.append(ChatFormat(build_tiny_tokenizer(1024)))
    return _CHAT[0]


def test_format_detection() -> None:
    assert detect_family(HERMES_TEMPLATE) == "hermes"
    assert detect_family("{{ '<|python_tag|>' }}{{ '<|start_header_id|>ipython' }}") == "llama3"
    with pytest.raises(ValueError, match="chat_format must be auto or one of"):
        ChatFormat(build_tiny_tokenizer(512), chat_format="xml")
