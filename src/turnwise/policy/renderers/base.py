"""One renderer for every family: the chat template renders, the family parses and bridges.

The model's chat template is the single source of truth for how a conversation becomes text;
nothing here re-implements a template. On top of `apply_chat_template` a renderer adds:

- `delta_ids` (the bridge): the tokens to append to a stored token stream, which ends with the
  model's own completion of the last assistant message, so that it becomes the prompt for the
  longer conversation. The stored tokens are never re-rendered or re-tokenized, whatever the
  template does to that message later. Two ways, each checked against the template's full render:
  1. *append-only*: the template's render of the stored conversation is a prefix of the longer
     one; the delta is the rest (with the glue the template puts after the end-of-turn token).
  2. *anchored*: templates that decorate or rewrite the last assistant message (Qwen3 adds an
     empty `<think>` block only while it is last and strips reasoning after a new query; GLM
     and DeepSeek drop it too) still render the *new* messages the same way. The old assistant
     message is rendered once more with a unique probe in its content; the text after the
     end-of-turn token that follows the probe (the token the model sampled) is the new
     messages' rendering. It must be a suffix of the full render and contain every new message.
  None when neither holds; the caller then renders in full and starts a new segment.
  An end-of-turn token the template rewrites once the message is history (`Family.history_stops`:
  GPT-OSS ends a final answer with `<|return|>` and writes `<|end|>` there in later prompts) is read
  as its history form; the stored stream keeps the sampled token, so the sampled tokens are trained
  and later turns are sampled after exactly those tokens (one token differs from a full re-render).
- `parse_assistant`: the completion as an OpenAI assistant message (content, `reasoning_content`,
  tool calls) in the family's format. It never raises: malformed calls, or a call written in
  another family's format, stay text and are flagged as a tool-parse error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from turnwise.policy.renderers.families import FAMILIES, Family, detect_family, family_named
from turnwise.policy.renderers.parse_json import ToolSpecs
from turnwise.types import Message

_PROBE = "TWPROBE7f3a9c"
_PROBE_NEW = "TWPROBE2b8e41"
_MARKERS = tuple({m for f in FAMILIES.values() for m in f.call_markers})


def template_text(tokenizer: PreTrainedTokenizerBase) -> str:
    """The tokenizer's chat template as text (the tool-use variant when there are several)."""
    template = tokenizer.chat_template
    if isinstance(template, Mapping):
        template = template.get("tool_use") or template.get("default") or next(iter(template.values()), None)
    if not isinstance(template, str) or not template:
        raise ValueError("the tokenizer has no chat template; turnwise needs a chat (instruct) model")
    return template


def resolve_family(tokenizer: PreTrainedTokenizerBase, chat_format: str = "auto") -> Family:
    """`chat_format` (a family name), or the family detected from the tokenizer's template."""
    return family_named(detect_family(template_text(tokenizer)) if chat_format == "auto" else chat_format)


_PLAIN_STOPS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>", "<|end_of_text|>")


def stop_token_ids_for(tokenizer: PreTrainedTokenizerBase, chat_format: str = "auto") -> frozenset[int]:
    """Ids that end a turn: the family's end-of-turn tokens in the vocabulary, and the eos token
    (for a tokenizer without a chat template: the common end-of-turn tokens it has)."""
    vocab = tokenizer.get_vocab()
    if chat_format == "auto" and not tokenizer.chat_template:
        stops: tuple[str, ...] = _PLAIN_STOPS
    else:
        stops = resolve_family(tokenizer, chat_format).stop_strings
    ids = {vocab[t] for t in stops if t in vocab}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def _plain(value: Any) -> Any:
    """Mappings and sequences as dicts and lists, which the template's `tojson` can serialize."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def tool_specs(tools: Collection[str] | Sequence[Mapping[str, Any]] | Mapping[str, Any] | None) -> ToolSpecs:
    """Offered tools as name -> parameters schema, from OpenAI tool dicts, such a mapping, or names."""
    if tools is None:
        return None
    if isinstance(tools, Mapping):
        return dict(tools)
    out: dict[str, Any] = {}
    for t in tools:
        if isinstance(t, str):
            out[t] = None
        else:
            fn = t.get("function", t)
            out[str(fn["name"])] = fn.get("parameters")
    return out


class Renderer:
    """Render, tokenize, bridge and parse conversations of one model family with its chat template."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, chat_format: str = "auto",
                 template_kwargs: Mapping[str, Any] | None = None) -> None:
        self.tokenizer = tokenizer
        self.family = resolve_family(tokenizer, chat_format)
        self.format = self.family.name
        template = template_text(tokenizer)
        for old, new in self.family.template_patches:
            template = template.replace(old, new)
        self.render_kwargs: dict[str, Any] = {**self.family.template_kwargs, **(template_kwargs or {}),
                                              "chat_template": template}
        """What every `apply_chat_template` call gets besides the conversation (template variables)."""
        self.stop_token_ids = stop_token_ids_for(tokenizer, self.family.name)
        self._stop_text = {i: self.decode([i]) for i in self.stop_token_ids}
        self.reasoning_open = self._prompt_opens_reasoning()
        """Whether the generation prompt leaves a reasoning block open (the completion starts inside it)."""

    # -- rendering ---------------------------------------------------------------------------------

    def template_message(self, m: Message) -> dict[str, Any]:
        """The dict the template renders for `m` (reasoning under the family's key)."""
        out = m.to_template()
        reasoning = out.pop("reasoning_content", None)
        if reasoning:
            out[self.family.reasoning_key] = reasoning
        return out

    def render_text(self, messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None,
                    add_generation_prompt: bool) -> str:
        """The template's text for `messages` (and tool schemas), optionally opening an assistant turn."""
        text = self.tokenizer.apply_chat_template(
            [self.template_message(m) for m in messages], tools=[_plain(t) for t in tools] if tools else None,
            tokenize=False, add_generation_prompt=add_generation_prompt, **self.render_kwargs,
        )
        return str(text)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings become their ids, nothing is added."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens included."""
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=False))

    def prompt_ids(self, messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None) -> list[int]:
        """The full prompt for sampling the next assistant turn."""
        return self.encode(self.render_text(messages, tools, add_generation_prompt=True))

    # -- bridging ----------------------------------------------------------------------------------

    def delta_ids(self, prev: Sequence[Message], new: Sequence[Message],
                  tools: Sequence[Mapping[str, Any]] | None, stop_id: int | None = None) -> list[int] | None:
        """Ids to append to a stream ending with the model's completion of `prev[-1]`.

        `prev[-1]` must be an assistant message whose stored completion ended with `stop_id`
        (default: the family's first end-of-turn token). The result makes the stream the prompt
        for `prev + new`, by the template's own rendering of the new messages; None when that
        cannot be shown (see the module docstring), so the caller must start a new segment.
        """
        if not prev or prev[-1].role != "assistant" or not new:
            return None
        canonical = self.family.stop_strings[0]
        stop = self._stop_text.get(stop_id, "") if stop_id is not None else canonical
        full = self.render_text([*prev, *new], tools, add_generation_prompt=True)
        delta = self._bridge(prev, new, tools, full, stop) if stop else None
        if delta is None and stop != canonical and stop_id in self.stop_token_ids:
            # another end-of-turn token (eos for <|im_end|>) ends the turn as the template's own does
            delta = self._bridge(prev, new, tools, full, canonical)
        history = self.family.history_stops.get(stop)
        if delta is None and history is not None:
            # the template's history form of the sampled token (harmony's <|return|> -> <|end|>): the stream
            # keeps the sampled token, as it keeps an eos where the template writes <|im_end|>
            delta = self._bridge(prev, new, tools, full, history)
        return delta

    def _bridge(self, prev: Sequence[Message], new: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None,
                full: str, stop: str) -> list[int] | None:
        text_prev = self.render_text(prev, tools, add_generation_prompt=False)
        cut = text_prev.rfind(stop)
        if full.startswith(text_prev) and cut >= 0 and not text_prev[cut + len(stop):].strip():
            return self.encode(text_prev[cut + len(stop):] + full[len(text_prev):])
        probe = dataclasses.replace(prev[-1], content=_PROBE + prev[-1].content)
        text_probe = self.render_text([*prev[:-1], probe, *new], tools, add_generation_prompt=True)
        at = text_probe.find(_PROBE)
        end = text_probe.find(stop, at) if at >= 0 else -1
        if end < 0 or text_probe.count(_PROBE) != 1:
            return None
        delta = text_probe[end + len(stop):]
        if not full.endswith(delta) or not full[:len(full) - len(delta)].endswith(stop):
            return None
        # the new messages must come after that end of turn (Gemma renders tool results inside it)
        first_new = dataclasses.replace(new[0], content=_PROBE_NEW + new[0].content)
        text_order = self.render_text([*prev[:-1], probe, first_new, *new[1:]], tools, add_generation_prompt=True)
        end_order = text_order.find(stop, text_order.find(_PROBE))
        if not 0 <= end_order < text_order.find(_PROBE_NEW):
            return None
        return self.encode(delta)

    # -- parsing -----------------------------------------------------------------------------------

    def _prompt_opens_reasoning(self) -> bool:
        """Whether the generation prompt leaves a reasoning block open (Qwen3.5, GLM: `<think>`)."""
        if self.family.think is None:
            return False
        try:
            text = self.render_text([Message(role="user", content="hi")], None, add_generation_prompt=True)
        except Exception:  # a template that refuses the probe conversation opens nothing we know of
            return False
        opener, closer = self.family.think
        at = text.rfind(opener)
        return at >= 0 and closer not in text[at:] and not text[at + len(opener):].strip()

    def parse_assistant(self, completion_ids: Sequence[int], tool_names: Collection[str] | Mapping[str, Any] | None
                        ) -> tuple[Message, bool]:
        """The assistant message in a completion, and whether a tool call failed to parse.

        `tool_names`: the offered tools (names, or name -> parameters schema, which XML formats
        use to type arguments); None accepts any name. Never raises. On a malformed call, or a
        call in another family's format, the text is the content, there are no calls, and the
        flag is True.
        """
        ids = list(completion_ids)
        if ids and ids[-1] in self.stop_token_ids:
            ids = ids[:-1]
        try:
            text = self.decode(ids)
        except (ValueError, TypeError, OverflowError, IndexError):
            return Message(role="assistant", content=""), True
        tools = tool_specs(tool_names)
        reasoning, rest, closed = "", text, True
        if self.family.split_reasoning is not None:
            split = self.family.split_reasoning(text)
            if split is None:
                return Message(role="assistant", content=text.strip()), True
            reasoning, rest = split
        elif self.family.think is not None:
            reasoning, rest, closed = self._split_think(text)
        parsed = self.family.parse_calls(rest, tools)
        if parsed is None:
            return Message(role="assistant", content=rest.strip(), reasoning_content=reasoning), True
        content, calls = parsed
        # a call in another family's format; in reasoning too when the turn ended inside it
        attempted = content if closed else content + reasoning
        foreign = not calls and any(m in attempted for m in _MARKERS)
        return Message(role="assistant", content=content, tool_calls=calls, reasoning_content=reasoning), foreign

    def _split_think(self, text: str) -> tuple[str, str, bool]:
        """(reasoning, the rest, whether the reasoning was closed)."""
        opener, closer = self.family.think  # type: ignore[misc]
        body = text
        if not self.reasoning_open:
            stripped = text.lstrip()
            if not stripped.startswith(opener):
                return "", text, True
            body = stripped[len(opener):]
        reasoning, sep, rest = body.partition(closer)
        if not sep:  # the turn ended inside its reasoning
            return reasoning.strip("\n"), "", False
        return reasoning.strip("\n"), rest.lstrip("\n"), True
