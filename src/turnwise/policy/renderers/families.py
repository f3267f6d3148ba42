"""The model families turnwise renders and parses, and how each is recognised from its chat template.

A family fixes what the chat template does not say: which tokens end the model's turn (the sampler
stops on them), how reasoning is delimited, how tool calls are written (the parser), and which
strings give away a tool call in this format (so a model writing another family's format is
counted as a tool-parse error). Rendering itself is always the template's own.

| family        | models                                   | tool calls the model writes                                           | reasoning |
|---------------|------------------------------------------|-----------------------------------------------------------------------|-----------|
| `hermes`      | Qwen2.5, Hermes, SmolLM3, the tiny model | `<tool_call>\\n{"name": .., "arguments": {..}}\\n</tool_call>`            | none      |
| `qwen3`       | Qwen3                                    | as `hermes`                                                           | `<think>` |
| `qwen3_xml`   | Qwen3-Coder, Qwen3.5, Qwen3.6            | `<tool_call>\\n<function=f>\\n<parameter=k>\\nv\\n</parameter>\\n</function>` | `<think>` |
| `llama3`      | Llama 3.1 / 3.2 / 3.3                    | `{"name": .., "parameters": {..}}`, optionally after `<\\|python_tag\\|>`   | none      |
| `mistral`     | Mistral Small 3.2                        | `[TOOL_CALLS]f[CALL_ID]id[ARGS]{..}`                                   | none      |
| `gpt_oss`     | GPT-OSS (harmony)                        | `<\\|start\\|>assistant to=functions.f<\\|channel\\|>commentary json<\\|message\\|>{..}<\\|call\\|>` | analysis channel |
| `gemma4`      | Gemma 4                                  | `<\\|tool_call>call:f{k:<\\|"\\|>v<\\|"\\|>}<tool_call\\|>`                      | thought channel |
| `deepseek_v3` | DeepSeek V3.2                            | `<｜DSML｜function_calls>` / `<｜DSML｜invoke name="f">` / `parameter` blocks | `<think>` |
| `kimi_k2`     | Kimi K2                                  | `<\\|tool_call_begin\\|>functions.f:0<\\|tool_call_argument_begin\\|>{..}`      | none      |
| `glm4`        | GLM 4.5 - 4.7                            | `<tool_call>f<arg_key>k</arg_key><arg_value>v</arg_value></tool_call>` | `<think>` |
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from turnwise.policy.renderers import parse_channels, parse_json, parse_xml
from turnwise.policy.renderers.parse_json import CallParser

HARMONY_DATE = "2026-01-01"
"""GPT-OSS's template writes today's date into the system preamble; pinned so renders are reproducible."""


@dataclass(frozen=True)
class Family:
    """What turnwise knows about one model family beyond its chat template."""

    name: str
    """The `model.chat_format` value."""
    stop_strings: tuple[str, ...]
    """Tokens that end the model's turn (those present in the vocabulary become stop tokens)."""
    parse_calls: CallParser
    """Text after the reasoning -> (content, tool calls), or None when a call is malformed."""
    call_markers: tuple[str, ...]
    """Strings that only appear when the model tries to call a tool in this format."""
    think: tuple[str, str] | None = None
    """Reasoning opener and closer, for families that write reasoning inline."""
    split_reasoning: Callable[[str], tuple[str, str] | None] | None = None
    """For channel formats: completion text -> (reasoning, rest); None when malformed."""
    reasoning_key: str = "reasoning_content"
    """The message field the template reads reasoning from."""
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    """Extra variables every render passes to the template."""
    template_patches: tuple[tuple[str, str], ...] = ()
    """Exact text replacements applied to the template before rendering (pinning the date)."""
    history_stops: Mapping[str, str] = field(default_factory=dict)
    """End-of-turn tokens the template writes differently once the message is history (harmony: a final
    answer's `<|return|>` is `<|end|>`): the bridge reads the sampled one as that one."""


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("hermes", ("<|im_end|>", "<|endoftext|>"), parse_json.parse_hermes, ("<tool_call>",)),
    Family("qwen3", ("<|im_end|>", "<|endoftext|>"), parse_json.parse_hermes, ("<tool_call>",),
           think=("<think>", "</think>")),
    Family("qwen3_xml", ("<|im_end|>", "<|endoftext|>"), parse_xml.parse_qwen_xml, ("<function=",),
           think=("<think>", "</think>")),
    Family("llama3", ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"), parse_json.parse_llama3,
           ("<|python_tag|>",)),
    Family("mistral", ("</s>",), parse_json.parse_mistral, ("[TOOL_CALLS]",)),
    Family("gpt_oss", ("<|return|>", "<|call|>"), parse_channels.parse_harmony_calls, ("to=functions.",),
           split_reasoning=parse_channels.split_harmony, reasoning_key="thinking",
           template_patches=(('strftime_now("%Y-%m-%d")', f'"{HARMONY_DATE}"'),),
           history_stops={"<|return|>": "<|end|>"}),
    Family("gemma4", ("<turn|>", "<|tool_response>"), parse_channels.parse_gemma_calls, ("<|tool_call>",),
           split_reasoning=parse_channels.split_gemma),
    Family("deepseek_v3", ("<｜end▁of▁sentence｜>",), parse_xml.parse_dsml, ("｜DSML｜function_calls",),
           think=("<think>", "</think>")),
    Family("kimi_k2", ("<|im_end|>",), parse_json.parse_kimi, ("<|tool_calls_section_begin|>", "<|tool_call_begin|>")),
    Family("glm4", ("<|user|>", "<|observation|>", "<|endoftext|>"), parse_xml.parse_glm, ("<arg_key>",),
           think=("<think>", "</think>")),
)}

# first match wins: more specific markers before the generic ones they contain
_DETECT: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("gpt_oss", ("<|channel|>",)),
    ("gemma4", ("<|tool_call>", "<|turn>")),
    ("kimi_k2", ("<|tool_calls_section_begin|>",)),
    ("deepseek_v3", ("｜DSML｜", "<｜tool▁calls▁begin｜>")),
    ("glm4", ("<arg_key>", "<|observation|>")),
    ("mistral", ("[TOOL_CALLS]",)),
    ("qwen3_xml", ("<function=",)),
    ("qwen3", ("<think>",)),
    ("hermes", ("<tool_call>",)),
    ("llama3", ("<|python_tag|>", "<|eot_id|>", "ipython")),
)


def detect_family(template: str) -> str:
    """The family whose markers the chat template contains (`hermes` when none match)."""
    for name, markers in _DETECT:
        if name == "qwen3" and "<tool_call>" not in template:
            continue
        if any(m in template for m in markers):
            return name
    return "hermes"


def family_named(name: str) -> Family:
    """The family called `name`; a one-line error listing the known ones otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"chat_format must be auto or one of {', '.join(FAMILIES)}, not {name!r}") from None
