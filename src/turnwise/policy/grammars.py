"""Grammars for constrained decoding: forced tool use and structured output, in each family's own format.

A request's constraint becomes one llguidance grammar (its Lark dialect, `%json {schema}` for JSON
values), which the sampler compiles per request (`policy.constrain`):

- forced tool use (`tool_choice` required, or a named function): the completion is the family's
  tool-call block (one or more calls where the family writes several per message, one when a
  function is named or `parallel_tool_calls` is false), each call's arguments matching the tool's
  `parameters` schema, then the family's end-of-turn token;
- structured output (`response_format` json_object / json_schema): the content is one JSON value
  matching the schema, then the end-of-turn token (GPT-OSS: in the `final` channel);
- tools offered with `auto` and a response format: either of the two (the OpenAI Agents SDK sends both).

Where the family reasons, the reasoning block comes first, unconstrained: optional, or required when
the generation prompt opens it (Qwen3.5, DeepSeek V3.2, GLM). JSON is written compactly with the
separators the templates' `tojson` uses (`, ` and `: `, no other whitespace), so a model cannot pad
with whitespace and the history re-renders the same way.

Every literal is split into text and the tokenizer's added tokens: llguidance treats each added
token as special, matched by its id (`<[id]>`) and never by its text, so `<tool_call>` or
`<|im_end|>` is the one token the model's own format uses.

Formats whose values are written one per parameter (Qwen3 XML, DeepSeek DSML, GLM, Gemma 4): each
property of the tool's `parameters` is one value, in the schema's order, required ones always and
optional ones maybe; a string value is raw text (its `enum`, `minLength`, `maxLength` kept) and any
other value JSON by its subschema. Gemma 4 writes nested values in its own notation, so a tool
with an object or array parameter cannot be forced there (a 400 naming the field and family).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import llguidance

from turnwise.policy.renderers import Renderer

JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""llguidance's JSON options for every value: the templates' `tojson` spacing, nothing else."""
_REGEX_META = set("\\.+*?()|[]{}^$/")


class ConstraintError(ValueError):
    """A constraint the family's format or the grammar engine cannot express; the message names the field."""


@dataclass(frozen=True)
class Constraint:
    """What one request asks the completion to be."""

    tools: Mapping[str, Mapping[str, Any] | None]
    """The offered tools: name -> parameters schema."""
    forced: tuple[str, ...] = ()
    """Tools the model must call (one or more of them); empty: no call is forced."""
    parallel: bool = True
    """Whether the turn may hold several calls (where the family writes several per message); False for a
    named function or `parallel_tool_calls: false`."""
    schema: Mapping[str, Any] | None = None
    """JSON schema of the content (`response_format`); None: free content."""


class _Lark:
    """Writes one grammar: numbered rules plus `start`."""

    def __init__(self, specials: Mapping[str, int]) -> None:
        self.rules: list[str] = []
        self.specials = specials
        self._split = re.compile("(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")") \
            if specials else None

    def rule(self, body: str, attrs: str = "") -> str:
        name = f"r{len(self.rules)}"
        self.rules.append(f"{name}{attrs}: {body}")
        return name

    def lit(self, text: str) -> str:
        """`text` as grammar: quoted strings for its text, `<[id]>` for its added tokens."""
        parts = self._split.split(text) if self._split is not None else [text]
        out = [f"<[{self.specials[p]}]>" if p in self.specials else json.dumps(p, ensure_ascii=False)
               for p in parts if p]
        return " ".join(out) or '""'

    def json(self, schema: Mapping[str, Any] | None, field: str) -> str:
        full = {**(schema or {}), "x-guidance": JSON_STYLE}
        error = llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_json_schema(full))
        if error and not error.startswith("WARNING"):
            raise ConstraintError(f"{field}: the grammar engine cannot use this JSON schema: {error.strip()}")
        return self.rule("%json " + json.dumps(full, ensure_ascii=False))

    def text_until(self, closer: str, spec: Mapping[str, Any] | None = None) -> str:
        """Raw text ending with `closer` (the closer included): a string value or a reasoning block."""
        spec = spec or {}
        enum = spec.get("enum")
        if isinstance(enum, list) and enum and all(isinstance(v, str) for v in enum):
            return self.rule(" | ".join(f"({self.lit(v)} {self.lit(closer)})" for v in enum))
        lo, hi = int(spec.get("minLength", 0)), spec.get("maxLength")
        count = "*" if not lo and hi is None else f"{{{lo},{'' if hi is None else int(hi)}}}"
        if closer in self.specials:  # text can never match an added token: a greedy run stops at it
            return self.rule(f"/(.|\\n){count}/ {self.lit(closer)}")
        escaped = "".join("\\" + c if c in _REGEX_META else ("\\n" if c == "\n" else c) for c in closer)
        return self.rule(f"/(.|\\n){count}{escaped}/", attrs="[lazy]")

    def alternatives(self, options: Sequence[str]) -> str:
        return self.rule(" | ".join(f"({o})" for o in options))

    def grammar(self, start: str) -> str:
        return "\n".join([f"start: {start}", *self.rules]) + "\n"


# -- one call per family -------------------------------------------------------------------------

Params = Mapping[str, Any] | None
CallWriter = Callable[[_Lark, str, Params, str], str]


def _properties(params: Params, field: str) -> list[tuple[str, Mapping[str, Any], bool]]:
    """(name, subschema, required) per property of a parameters schema."""
    if params is None:
        return []
    props = params.get("properties") or {}
    if not isinstance(props, Mapping):
        raise ConstraintError(f"{field}: parameters.properties must be an object")
    required = set(params.get("required") or ())
    return [(str(k), v if isinstance(v, Mapping) else {}, k in required) for k, v in props.items()]


def _is_text(spec: Mapping[str, Any]) -> bool:
    kind = spec.get("type")
    return kind == "string" or kind == ["string"] or (kind is None and isinstance(spec.get("enum"), list) and all(
        isinstance(v, str) for v in spec["enum"]))


def _sequence(w: _Lark, items: Sequence[tuple[str, bool]], sep: str) -> str:
    """The items in order, required ones always, optional ones maybe, `sep` between those present."""
    memo: dict[tuple[int, bool], str] = {}

    def rest(i: int, first: bool) -> str:
        if i == len(items):
            return '""'
        if (i, first) not in memo:
            item, required = items[i]
            head = item if first or not sep else f"{w.lit(sep)} {item}"
            with_head = f"{head} {rest(i + 1, False)}"
            memo[(i, first)] = w.rule(with_head if required else f"({with_head}) | ({rest(i + 1, first)})")
        return memo[(i, first)]

    return rest(0, True)


def _per_value(open_value: Callable[[str, bool], str], close: str, sep: str = "") -> CallWriter:
    """Parameters written one value each: `open_value(name, is_text)`, the value, `close`."""
    def params(w: _Lark, name: str, schema: Params, field: str) -> str:
        items = []
        for key, spec, required in _properties(schema, field):
            opener = w.lit(open_value(key, _is_text(spec)))
            value = w.text_until(close, spec) if _is_text(spec) else \
                f"{w.json(spec, f'{field}.{key}')} {w.lit(close)}"
            items.append((w.rule(f"{opener} {value}"), required))
        return _sequence(w, items, sep)
    return params


def _qwen_xml(w: _Lark, name: str, schema: Params, field: str) -> str:
    body = _per_value(lambda k, _: f"<parameter={k}>\n", "\n</parameter>\n")(w, name, schema, field)
    head, tail = w.lit(f"<tool_call>\n<function={name}>\n"), w.lit("</function>\n</tool_call>")
    return f"{head} {body} {tail}"


def _dsml(w: _Lark, name: str, schema: Params, field: str) -> str:
    d = "｜DSML｜"
    body = _per_value(lambda k, text: f'<{d}parameter name="{k}" string="{str(text).lower()}">',
                      f"</{d}parameter>\n")(w, name, schema, field)
    head = w.lit(f'<{d}invoke name="{name}">\n')
    return f"{head} {body} {w.lit(f'</{d}invoke>')}"


def _glm(w: _Lark, name: str, schema: Params, field: str) -> str:
    body = _per_value(lambda k, _: f"<arg_key>{k}</arg_key><arg_value>", "</arg_value>")(w, name, schema, field)
    return f"{w.lit(f'<tool_call>{name}')} {body} {w.lit('</tool_call>')}"


_GEMMA_QUOTE = '<|"|>'


def _gemma(w: _Lark, name: str, schema: Params, field: str) -> str:
    items = []
    for key, spec, required in _properties(schema, field):
        if spec.get("type") in ("object", "array") or not ({"type", "enum"} & set(spec)):
            raise ConstraintError(f"{field}.{key}: gemma4 writes nested arguments in its own notation; forced "
                                  "tool use supports string, number, integer and boolean parameters there")
        value = f"{w.lit(_GEMMA_QUOTE)} {w.text_until(_GEMMA_QUOTE, spec)}" if _is_text(spec) else \
            w.json(spec, f"{field}.{key}")
        items.append((w.rule(f"{w.lit(key + ':')} {value}"), required))
    return f"{w.lit(f'<|tool_call>call:{name}{{')} {_sequence(w, items, ',')} {w.lit('}<tool_call|>')}"


def _json_args(before: Callable[[str], str], after: str) -> CallWriter:
    def call(w: _Lark, name: str, schema: Params, field: str) -> str:
        return f"{w.lit(before(name))} {w.json(schema or {'type': 'object'}, field)} {w.lit(after)}"
    return call


def _mistral(w: _Lark, name: str, schema: Params, field: str) -> str:
    args = w.json(schema or {"type": "object"}, field)
    return f"{w.lit(f'[TOOL_CALLS]{name}[CALL_ID]')} /[a-zA-Z0-9]{{9}}/ {w.lit('[ARGS]')} {args}"


def _kimi(w: _Lark, name: str, schema: Params, field: str) -> str:
    args = w.json(schema or {"type": "object"}, field)
    return (f"{w.lit(f'<|tool_call_begin|>functions.{name}:')} /[0-9]+/ {w.lit('<|tool_call_argument_begin|>')} "
            f"{args} {w.lit('<|tool_call_end|>')}")


@dataclass(frozen=True)
class _Format:
    """How one family writes tool calls and a final answer."""

    call: CallWriter
    end_calls: str
    """What ends a tool-calling turn (the block's closer and the stop token)."""
    sep: str | None = ""
    """Between calls; None: one call per message."""
    open_calls: str = ""
    answer: tuple[str, str] | None = None
    """(before, after) the JSON content; None: nothing before, the family's first stop token after."""
    reasoning: tuple[str, str, str] | None = None
    """(opener, closer, what may follow) for channel formats; families with `think` use it."""


_HERMES = _json_args(lambda n: '<tool_call>\n{"name": ' + json.dumps(n) + ', "arguments": ', "}\n</tool_call>")
FORMATS: dict[str, _Format] = {
    "hermes": _Format(_HERMES, "<|im_end|>", "\n"),
    "qwen3": _Format(_HERMES, "<|im_end|>", "\n"),
    "qwen3_xml": _Format(_qwen_xml, "<|im_end|>", "\n"),
    "llama3": _Format(_json_args(lambda n: '{"name": ' + json.dumps(n) + ', "parameters": ', "}"), "<|eot_id|>",
                      None),
    "mistral": _Format(_mistral, "</s>"),
    "gpt_oss": _Format(_json_args(lambda n: f" to=functions.{n}<|channel|>commentary json<|message|>", ""),
                       "<|call|>", None, answer=("<|channel|>final<|message|>", "<|return|>"),
                       reasoning=("<|channel|>analysis<|message|>", "<|end|>", "<|start|>assistant")),
    "gemma4": _Format(_gemma, "<|tool_response>", reasoning=("<|channel>thought\n", "<channel|>", "")),
    "deepseek_v3": _Format(_dsml, "\n</｜DSML｜function_calls><｜end▁of▁sentence｜>", "\n",
                           open_calls="<｜DSML｜function_calls>\n"),
    "kimi_k2": _Format(_kimi, "<|tool_calls_section_end|><|im_end|>", open_calls="<|tool_calls_section_begin|>"),
    "glm4": _Format(_glm, "<|observation|>"),
}


def special_tokens(renderer: Renderer) -> dict[str, int]:
    """The tokenizer's added tokens (text -> id): llguidance matches them by id only."""
    return {str(t.content): int(i) for i, t in renderer.tokenizer.added_tokens_decoder.items() if t.content}


def _reasoning(w: _Lark, renderer: Renderer, fmt: _Format) -> str:
    """The reasoning block that may (or must) come first; '' for families without one."""
    family = renderer.family
    if fmt.reasoning is not None:
        opener, closer, follow = fmt.reasoning
        return f"({w.lit(opener)} {w.text_until(closer)} {w.lit(follow) if follow else ''})?"
    if family.think is None:
        return ""
    opener, closer = family.think
    newline = w.lit("\n")
    block = f"{w.text_until(closer)} {newline}? {newline}?"
    return block if renderer.reasoning_open else f"({w.lit(opener)} {block})?"


def _calls(w: _Lark, fmt: _Format, c: Constraint, names: Sequence[str]) -> str:
    one = w.alternatives([fmt.call(w, n, c.tools.get(n), f"tools[{n}].function.parameters") for n in names])
    body = one if fmt.sep is None or not c.parallel else f"{one} ({w.lit(fmt.sep) if fmt.sep else ''} {one})*"
    return f"{w.lit(fmt.open_calls) if fmt.open_calls else ''} {body} {w.lit(fmt.end_calls)}"


def request_grammar(renderer: Renderer, c: Constraint, field: str = "response_format") -> str | None:
    """The grammar of constraint `c` in the renderer's family format; None when nothing is constrained.

    Raises `ConstraintError` naming the field when the family's format cannot express it."""
    fmt = FORMATS.get(renderer.family.name)
    family = renderer.family.name
    if not c.forced and c.schema is None:
        return None
    if fmt is None:
        raise ConstraintError(f"{'tool_choice' if c.forced else field}: constrained decoding is not available "
                              f"for the {family} family")
    w = _Lark(special_tokens(renderer))
    options = []
    if c.forced or c.tools:  # forced, or offered next to a response format
        options.append(_calls(w, fmt, c, c.forced or tuple(c.tools)))
    if c.schema is not None and not c.forced:
        before, after = fmt.answer or ("", renderer.family.stop_strings[0])
        options.append(f"{w.lit(before) if before else ''} {w.json(c.schema, field)} {w.lit(after)}")
    return w.grammar(f"{_reasoning(w, renderer, fmt)} {w.alternatives(options)}")
