"""Chat rendering, incremental (delta) tokenization and tool-call parsing for one tokenizer.

The model's chat template is the single source of truth for how a conversation becomes text;
this module never re-implements a template. It adds the two things a token-exact multi-turn
runtime needs on top of `apply_chat_template`:

- `delta_ids`: the tokens to append to a stored token stream so that it continues exactly as
  the template would render the longer conversation, without re-tokenizing what the model
  sampled (retokenization drift is impossible by construction);
- `parse_assistant`: the sampled completion turned back into an OpenAI-shaped assistant
  message, in the model's tool-call format. It never raises: malformed output stays text and
  is flagged, so the agent sees what the model wrote and training sees a `tool_parse_error`.

Supported tool-call formats (`ChatFormat.format`):

| format        | the model writes                                                           | detected by |
|---------------|----------------------------------------------------------------------------|-------------|
| `hermes`      | `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one per call, | `<tool_call>` in the template (Qwen2.5/3, Hermes, the tiny model) |
|               | after optional text; tool results in `<tool_response>` blocks               |             |
| `llama3_json` | the whole turn is `{"name": ..., "parameters": {...}}` (optionally after       | `<\\|python_tag\\|>`, `ipython` or `"parameters"` in the template (Llama 3.1/3.2/3.3) |
|               | `<\\|python_tag\\|>`; several calls separated by `;`)                          |             |
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from turnwise.types import Message, ToolCall

TOOL_CALL_FORMATS = ("hermes", "llama3_json")
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<|endoftext|>", "<|end_of_text|>")
_HERMES_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_PYTHON_TAG = "<|python_tag|>"


def template_text(tokenizer: PreTrainedTokenizerBase) -> str:
    """The tokenizer's chat template as text (the tool-use variant when there are several)."""
    template = tokenizer.chat_template
    if isinstance(template, Mapping):
        template = template.get("tool_use") or template.get("default") or next(iter(template.values()), None)
    if not isinstance(template, str) or not template:
        raise ValueError("the tokenizer has no chat template; turnwise needs a chat (instruct) model")
    return template


def detect_tool_call_format(template: str) -> str:
    """`hermes` or `llama3_json`, from markers in a chat template (hermes when none match)."""
    if "<tool_call>" in template:
        return "hermes"
    if _PYTHON_TAG in template or "ipython" in template or '"parameters"' in template:
        return "llama3_json"
    return "hermes"


def stop_token_ids_for(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Ids that end a turn: the eos token and every known end-of-turn token in the vocabulary."""
    vocab = tokenizer.get_vocab()
    ids = {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


class ChatFormat:
    """Render, tokenize and parse conversations with one tokenizer's chat template."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, tool_call_format: str = "auto") -> None:
        self.tokenizer = tokenizer
        template = template_text(tokenizer)
        if tool_call_format == "auto":
            tool_call_format = detect_tool_call_format(template)
        if tool_call_format not in TOOL_CALL_FORMATS:
            raise ValueError(f"tool_call_format must be auto or one of {TOOL_CALL_FORMATS}, not {tool_call_format!r}")
        self.format = tool_call_format
        self.stop_token_ids = stop_token_ids_for(tokenizer)
        vocab = tokenizer.get_vocab()
        self._end_strings = tuple(t for t in END_OF_TURN_TOKENS if t in vocab) or (str(tokenizer.eos_token),)

    def render_text(self, messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None,
                    add_generation_prompt: bool) -> str:
        """The template's text for `messages` (and tool schemas), optionally opening an assistant turn."""
        text = self.tokenizer.apply_chat_template(
            [m.to_template() for m in messages], tools=[_plain(t) for t in tools] if tools else None,
            tokenize=False, add_generation_prompt=add_generation_prompt,
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

    def delta_ids(self, prev: Sequence[Message], new: Sequence[Message],
                  tools: Sequence[Mapping[str, Any]] | None) -> list[int] | None:
        """Ids to append to a stream ending with the model's completion of `prev[-1]`.

        The stored stream must end with the model's own tokens for the last message of `prev`,
        which must be an assistant message, including its end-of-turn token. The result makes
        the stream continue exactly as the template renders `prev + new` with a generation
        prompt. None when the template does not render `prev` as a prefix of `prev + new`
        (templates that rewrite earlier turns, e.g. dropping past reasoning), so the caller
        must start a new segment.
        """
        text_all = self.render_text([*prev, *new], tools, add_generation_prompt=True)
        text_prev = self.render_text(prev, tools, add_generation_prompt=False)
        if not text_all.startswith(text_prev):
            return None
        cut = max(text_prev.rfind(s) + len(s) if s in text_prev else -1 for s in self._end_strings)
        glue = text_prev[cut:] if cut >= 0 else ""
        return self.encode(glue + text_all[len(text_prev):])

    def parse_assistant(self, completion_ids: Sequence[int],
                        tool_names: Collection[str] | None) -> tuple[Message, bool]:
        """The assistant message in a completion, and whether a tool call failed to parse.

        Never raises. On any malformed call (bad JSON, unknown tool, unclosed tag, missing
        name or arguments) the whole text is the content, there are no calls, and the flag is True.
        """
        ids = list(completion_ids)
        if ids and ids[-1] in self.stop_token_ids:
            ids = ids[:-1]
        try:
            text = self.decode(ids)
        except (ValueError, TypeError, OverflowError, IndexError):
            return Message(role="assistant", content=""), True
        parse = _parse_hermes if self.format == "hermes" else _parse_llama3_json
        parsed = parse(text, tool_names)
        if parsed is None:
            return Message(role="assistant", content=text.strip()), True
        content, calls = parsed
        return Message(role="assistant", content=content, tool_calls=calls), False


def _parse_hermes(text: str, tool_names: Collection[str] | None) -> tuple[str, tuple[ToolCall, ...]] | None:
    bodies = _HERMES_CALL.findall(text)
    if text.count("<tool_call>") != len(bodies) or text.count("</tool_call>") != len(bodies):
        return None
    calls = []
    for body in bodies:
        call = _tool_call(_loads(body.strip()), tool_names)
        if call is None:
            return None
        calls.append(call)
    return _HERMES_CALL.sub("", text).strip(), tuple(calls)


def _parse_llama3_json(text: str, tool_names: Collection[str] | None) -> tuple[str, tuple[ToolCall, ...]] | None:
    body = text.strip()
    tagged = body.startswith(_PYTHON_TAG)
    if tagged:
        body = body[len(_PYTHON_TAG):].strip()
    if not body.startswith("{"):
        return None if tagged else (body, ())
    decoder = json.JSONDecoder()
    if not tagged:
        try:
            first, _ = decoder.raw_decode(body)
        except (ValueError, RecursionError):
            return None
        if isinstance(first, dict) and "name" not in first:
            return body, ()
    calls = []
    pos = 0
    while pos < len(body):
        try:
            value, end = decoder.raw_decode(body, pos)
        except (ValueError, RecursionError):
            return None
        call = _tool_call(value, tool_names)
        if call is None:
            return None
        calls.append(call)
        pos = end
        while pos < len(body) and (body[pos].isspace() or body[pos] == ";"):
            pos += 1
    return "", tuple(calls)


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _tool_call(value: Any, tool_names: Collection[str] | None) -> ToolCall | None:
    if not isinstance(value, dict):
        return None
    name = value.get("name")
    args = value.get("arguments", value.get("parameters"))
    if isinstance(args, str):
        args = _loads(args)
    if not isinstance(name, str) or not name or not isinstance(args, dict):
        return None
    if tool_names is not None and name not in tool_names:
        return None
    try:
        arguments = json.dumps(args, ensure_ascii=False, separators=(",", ":"))
    except (ValueError, RecursionError):
        return None
    return ToolCall(id=f"call_{uuid.uuid4().hex[:12]}", name=name, arguments=arguments)


def _plain(value: Any) -> Any:
    """Mappings and sequences as dicts and lists, which the template's `tojson` can serialize."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
