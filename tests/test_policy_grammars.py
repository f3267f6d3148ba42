"""Constrained decoding per family: forced tool calls and JSON answers in each family's own format.

For every family's real template and tokenizer (`tests/fixtures`), the grammar of a forced call (or
a JSON answer) drives a random "model": each token is drawn uniformly from those the grammar allows
(the end of a reasoning block or a string is taken half the time it is allowed, so the text ends).
Whatever it draws, the family's own parser must find a call to the forced tool whose arguments
validate against the tool's schema, or content that validates against the response schema.
"""

from __future__ import annotations

import functools
import json

import jsonschema
import numpy as np
import pytest

from family_fixtures import SPECS, family_tokenizer
from turnwise.policy.constrain import GuideCompiler
from turnwise.policy.grammars import Constraint, ConstraintError, request_grammar, special_tokens
from turnwise.policy.renderers import Renderer

REFUND = {"type": "object", "additionalProperties": False, "required": ["order_id", "amount"], "properties": {
    "order_id": {"type": "string", "maxLength": 6},
    "amount": {"type": "integer", "minimum": 0, "maximum": 500},
    "reason": {"type": "string", "enum": ["damaged", "late"]},
    "full": {"type": "boolean"}}}
LOOKUP = {"type": "object", "additionalProperties": False, "required": ["order_id"],
          "properties": {"order_id": {"type": "string", "maxLength": 5}}}
TOOLS = {"issue_refund": REFUND, "lookup_order": LOOKUP}
ANSWER = {"type": "object", "additionalProperties": False, "required": ["city", "rooms"],
          "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}, "rooms": {"type": "integer",
                                                                                        "minimum": 1, "maximum": 9}}}
# Qwen's four templates share one tokenizer; each other family builds its own (seconds), so those are slow
TEMPLATES = [t if not SPECS[t].specials else pytest.param(t, marks=pytest.mark.slow) for t in sorted(SPECS)]


@functools.cache
def _renderer(template: str) -> Renderer:
    return Renderer(family_tokenizer(template))


@functools.cache
def _compiler_for(specials: tuple[str, ...], template: str) -> tuple[GuideCompiler, np.ndarray]:
    r = _renderer(template)
    vocab = r.tokenizer.get_vocab()
    enders = np.zeros(len(r.tokenizer), dtype=bool)
    enders[[*special_tokens(r).values(), *(vocab[t] for t in ('"', '",', '"}', "Ċ") if t in vocab)]] = True
    return GuideCompiler(r.tokenizer, len(r.tokenizer), r.stop_token_ids), enders


def _compiler(template: str) -> tuple[GuideCompiler, np.ndarray]:
    """The grammar compiler of the template's tokenizer (shared by templates with the same tokens), and
    the tokens that end free text (added tokens, quotes)."""
    spec = SPECS[template]
    return _compiler_for(spec.specials, template if spec.specials else "Qwen-Qwen3-0.6B.jinja")


def drive(template: str, grammar: str, seed: int, max_tokens: int = 400) -> list[int]:
    """Tokens drawn uniformly among those the grammar allows, until an end-of-turn token."""
    r = _renderer(template)
    compiler, enders = _compiler(template)
    guide = compiler.compile(grammar)
    rng = np.random.default_rng(seed)
    ids: list[int] = []
    while len(ids) < max_tokens:
        allowed = guide.allowed().numpy()
        ending = np.flatnonzero(allowed & enders)
        choices = np.flatnonzero(allowed)
        if len(choices) > 50 and len(ending) and rng.random() < 0.5:
            choices = ending
        token = int(rng.choice(choices))
        guide.advance(token)
        ids.append(token)
        if token in r.stop_token_ids:
            return ids
    raise AssertionError(f"no end of turn in {max_tokens} tokens: {r.decode(ids)!r}")


@pytest.mark.parametrize("template", TEMPLATES)
def test_required_tool_call_parses_in_the_family_format(template: str) -> None:
    r = _renderer(template)
    grammar = request_grammar(r, Constraint(TOOLS, forced=tuple(TOOLS)), "tool_choice")
    for seed in range(2):
        ids = drive(template, grammar, seed)
        message, error = r.parse_assistant(ids, TOOLS)
        assert not error and message.tool_calls, (r.format, r.decode(ids))
        for call in message.tool_calls:
            jsonschema.validate(json.loads(call.arguments), TOOLS[call.name])


@pytest.mark.parametrize("template", TEMPLATES)
def test_named_function_is_the_one_call(template: str) -> None:
    r = _renderer(template)
    grammar = request_grammar(r, Constraint(TOOLS, forced=("lookup_order",), parallel=False), "tool_choice")
    ids = drive(template, grammar, 7)
    message, error = r.parse_assistant(ids, TOOLS)
    assert not error and [c.name for c in message.tool_calls] == ["lookup_order"], r.decode(ids)
    jsonschema.validate(json.loads(message.tool_calls[0].arguments), LOOKUP)


@pytest.mark.parametrize("template", TEMPLATES)
def test_json_answer_is_the_content(template: str) -> None:
    r = _renderer(template)
    grammar = request_grammar(r, Constraint({}, schema=ANSWER))
    for seed in range(1):
        ids = drive(template, grammar, seed)
        message, error = r.parse_assistant(ids, None)
        assert not error and not message.tool_calls, r.decode(ids)
        jsonschema.validate(json.loads(message.content), ANSWER)


def test_a_reasoning_block_may_come_first() -> None:
    r = _renderer("Qwen-Qwen3-0.6B.jinja")
    grammar = request_grammar(r, Constraint(TOOLS, forced=("lookup_order",), parallel=False), "tool_choice")
    guide = _compiler("Qwen-Qwen3-0.6B.jinja")[0].compile(grammar)
    text = '<think>\nLook it up {"first"}.\n</think>\n\n<tool_call>\n{"name": "lookup_order", "arguments": ' \
           '{"order_id": "12"}}\n</tool_call><|im_end|>'
    ids = r.encode(text)
    for i in ids:
        assert guide.allowed()[i], r.decode([i])
        guide.advance(i)
    assert not guide.matcher.is_error() and guide.matcher.is_stopped()


def test_what_a_format_cannot_express_is_an_error_naming_field_and_family() -> None:
    r = _renderer("google-gemma-4-31B-it.jinja")
    nested = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string"}}}}
    with pytest.raises(ConstraintError, match=r"tools\[bulk\].function.parameters.items: gemma4"):
        request_grammar(r, Constraint({"bulk": nested}, forced=("bulk",)), "tool_choice")
    with pytest.raises(ConstraintError, match="response_format: the grammar engine cannot use this JSON schema"):
        request_grammar(_renderer("Qwen-Qwen3-0.6B.jinja"), Constraint({}, schema={"type": "strin"}))
