"""ChatFormat with a Llama-3.1-style template (JSON tool calls, `ipython` results) on our tokenizer."""

from __future__ import annotations

import pytest

from turnwise.policy.chat import ChatFormat
from turnwise.policy.tokenizer import build_tiny_tokenizer
from turnwise.types import Message, ToolCall

# A compact hand-written template with Llama 3.1's structure: headers, `<|eot_id|>` turn ends, tools
# in the system turn, calls as {"name", "parameters"} JSON, tool results in `ipython` turns.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0].role == 'system' %}{%- set system = messages[0].content %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system = '' %}{%- endif %}"
    "{%- if system or tools %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system }}"
    "{%- if tools %}{{- '\\nEnvironment: ipython\\nRespond with {\"name\": function name, \"parameters\": "
    "arguments} to call a function.' }}"
    "{%- for t in tools %}{{- '\\n' + (t | tojson) }}{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- for tool_call in message.tool_calls %}{%- set f = tool_call.function %}"
    "{%- if not loop.first %}{{- '; ' }}{%- endif %}"
    "{{- '{\"name\": \"' + f.name + '\", \"parameters\": ' + (f.arguments | tojson) + '}' }}"
    "{%- endfor %}{{- '<|eot_id|>' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}"
    "{%- else %}"
    "{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
TOOLS = [{"type": "function", "function": {"name": "get_order", "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "refund_order", "parameters": {"type": "object"}}}]
NAMES = {"get_order", "refund_order"}


@pytest.fixture(scope="module")
def chat() -> ChatFormat:
    tok = build_tiny_tokenizer(1024)
    tok.add_special_tokens({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                            "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>",
                                                          "<|eom_id|>", "<|python_tag|>"]})
    tok.chat_template = LLAMA3_TEMPLATE
    return ChatFormat(tok)


def _conversation() -> tuple[list[Message], list[Message]]:
    prev = [Message("system", "Be brief."), Message("user", "Refund ORD-42"),
            Message("assistant", "", (ToolCall("a", "get_order", '{"order_id":"ORD-42"}'),
                                      ToolCall("b", "refund_order", '{"order_id":"ORD-42","amount":3}')))]
    return prev, [Message("tool", '{"status":"delivered"}', tool_call_id="a"),
                  Message("tool", '{"ok":true}', tool_call_id="b")]


def _completion(chat: ChatFormat, prev: list[Message]) -> list[int]:
    before = chat.render_text(prev[:-1], TOOLS, add_generation_prompt=True)
    return chat.encode(chat.render_text(prev, TOOLS, add_generation_prompt=False)[len(before):])


def test_detected_and_stops(chat: ChatFormat) -> None:
    vocab = chat.tokenizer.get_vocab()
    assert chat.format == "llama3"
    assert {vocab["<|eot_id|>"], vocab["<|eom_id|>"]} <= chat.stop_token_ids


def test_round_trip_and_delta(chat: ChatFormat) -> None:
    prev, new = _conversation()
    completion = _completion(chat, prev)
    message, error = chat.parse_assistant(completion, NAMES)
    assert not error and message.same_as(prev[-1])
    stream = chat.prompt_ids(prev[:-1], TOOLS) + completion
    delta = chat.delta_ids(prev, new, TOOLS)
    assert delta is not None and stream + delta == chat.prompt_ids([*prev, *new], TOOLS)
    assert chat.decode(delta).startswith("<|start_header_id|>ipython")


@pytest.mark.parametrize(("text", "calls", "error"), [
    ('<|python_tag|>{"name": "get_order", "parameters": {"order_id": "X"}}<|eom_id|>', 1, False),
    ('{"name": "get_order", "arguments": {"order_id": "X"}}<|eot_id|>', 1, False),
    ("The order shipped yesterday.<|eot_id|>", 0, False),
    ('{"order_id": "X", "refund": 3}<|eot_id|>', 0, False),
    ('{"name": "get_order", "parameters": {"order_id": <|eot_id|>', 0, True),
    ('{"name": "wipe_disk", "parameters": {}}<|eot_id|>', 0, True),
    ("<|python_tag|>print(1)<|eom_id|>", 0, True),
    ('{"name": "get_order", "parameters": {}} trailing words', 0, True),
])
def test_parse_variants(chat: ChatFormat, text: str, calls: int, error: bool) -> None:
    message, got_error = chat.parse_assistant(chat.encode(text), NAMES)
    assert (len(message.tool_calls), got_error) == (calls, error)
    if not calls:
        assert message.content == chat.decode(chat.encode(text)).removesuffix("<|eot_id|>").removesuffix(
            "<|eom_id|>").strip()
