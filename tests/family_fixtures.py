"""Real tokenizers and chat templates of the model families, from `tests/fixtures/` (see its SOURCE.md).

Qwen3's real tokenizer (BPE + added tokens, `tokenizer.json.gz`) serves Qwen2.5, Qwen3 and the
Qwen3-Coder / 3.5 / 3.6 templates. A family without a shipped tokenizer pairs its real template
with Qwen's BPE plus the family's special tokens as added special tokens (listed below, as the
family's tokenizer has them), so every marker the template writes is one token, as in the real
vocabulary.
"""

from __future__ import annotations

import functools
import gzip
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from turnwise.policy.renderers import Renderer
from turnwise.types import Message, ToolCall

FIXTURES = Path(__file__).parent / "fixtures"
TEMPLATES = FIXTURES / "templates"


@dataclass(frozen=True)
class FamilySpec:
    """One family's test tokenizer: its template and the special tokens its tokenizer adds."""

    family: str
    template: str
    specials: tuple[str, ...] = ()
    bos: str | None = None
    eos: str = "<|im_end|>"


SPECS: dict[str, FamilySpec] = {s.template: s for s in (
    FamilySpec("hermes", "Qwen-Qwen2.5-7B-Instruct.jinja"),
    FamilySpec("qwen3", "Qwen-Qwen3-0.6B.jinja"),
    FamilySpec("qwen3_xml", "Qwen3-Coder.jinja"),
    FamilySpec("qwen3_xml", "Qwen3.5-4B.jinja"),
    FamilySpec("llama3", "meta-llama-Llama-3.3-70B-Instruct.jinja",
               ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                "<|eom_id|>", "<|python_tag|>"), bos="<|begin_of_text|>", eos="<|eot_id|>"),
    FamilySpec("llama3", "meta-llama-Llama-3.2-3B-Instruct.jinja",
               ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                "<|eom_id|>", "<|python_tag|>"), bos="<|begin_of_text|>", eos="<|eot_id|>"),
    FamilySpec("mistral", "Mistral-Small-3.2-24B-Instruct-2506.jinja",
               ("<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[AVAILABLE_TOOLS]",
                "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[CALL_ID]", "[ARGS]", "[TOOL_RESULTS]", "[TOOL_CONTENT]",
                "[/TOOL_RESULTS]", "[IMG]"), bos="<s>", eos="</s>"),
    FamilySpec("gpt_oss", "openai-gpt-oss-120b.jinja",
               ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>"),
               eos="<|return|>"),
    FamilySpec("gemma4", "google-gemma-4-31B-it.jinja",
               ("<bos>", "<eos>", "<|turn>", "<turn|>", "<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>",
                "<|tool_response>", "<tool_response|>", '<|"|>', "<|channel>", "<channel|>", "<|think|>",
                "<|image|>", "<|image>", "<image|>", "<|audio|>", "<|video|>"), bos="<bos>", eos="<eos>"),
    FamilySpec("deepseek_v3", "deepseek-ai-DeepSeek-V3.2.jinja",
               ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"),
               bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>"),
    FamilySpec("kimi_k2", "moonshotai-Kimi-K2.jinja",
               ("<|im_system|>", "<|im_user|>", "<|im_assistant|>", "<|im_middle|>", "<|tool_calls_section_begin|>",
                "<|tool_calls_section_end|>", "<|tool_call_begin|>", "<|tool_call_argument_begin|>",
                "<|tool_call_end|>", "<|media_start|>", "<|media_content|>", "<|media_pad|>", "<|media_end|>")),
    FamilySpec("glm4", "GLM-4.7-Flash.jinja",
               ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>", "<arg_key>",
                "</arg_key>", "<arg_value>", "</arg_value>"), eos="<|endoftext|>"),
)}


@functools.cache
def _qwen_dir() -> Path:
    """A Hugging Face tokenizer directory of Qwen3's real tokenizer (unpacked once per session)."""
    out = Path(tempfile.mkdtemp(prefix="turnwise-qwen-"))
    with gzip.open(FIXTURES / "qwen" / "tokenizer.json.gz", "rb") as src, open(out / "tokenizer.json", "wb") as dst:
        shutil.copyfileobj(src, dst)
    shutil.copy(FIXTURES / "qwen" / "qwen3_tokenizer_config.json", out / "tokenizer_config.json")
    return out


@functools.cache
def qwen3_tokenizer() -> PreTrainedTokenizerBase:
    """Qwen3's real tokenizer with its own chat template, as `AutoTokenizer` loads it."""
    return AutoTokenizer.from_pretrained(_qwen_dir())


def qwen_dir() -> Path:
    """The unpacked Qwen3 tokenizer directory (tokenizer.json + tokenizer_config.json)."""
    return _qwen_dir()


@functools.cache
def _qwen_json() -> str:
    return (_qwen_dir() / "tokenizer.json").read_text()


@functools.cache
def family_tokenizer(template: str) -> PreTrainedTokenizerBase:
    """The test tokenizer for one template file (see `SPECS`)."""
    spec = SPECS[template]
    text = (TEMPLATES / template).read_text()
    if not spec.specials:
        tok = AutoTokenizer.from_pretrained(_qwen_dir())
        tok.chat_template = text
        return tok
    backend = Tokenizer.from_str(_qwen_json())
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec.specials])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=spec.bos, eos_token=spec.eos,
                                  pad_token="<|endoftext|>", clean_up_tokenization_spaces=False)
    tok.chat_template = text
    return tok


# -- one conversation for every family ----------------------------------------------------------

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
NEW_SEGMENT_AFTER: dict[str, tuple[str, ...]] = {}  # harmony bridges <|return|> as <|end|> (Family.history_stops)
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




def renderer_for(template: str) -> tuple[Renderer, list[Message]]:
    """The renderer of one template file (thinking on where the template has a switch) and its conversation."""
    spec = SPECS[template]
    r = Renderer(family_tokenizer(template), template_kwargs=THINKING_ON.get(spec.family))
    assert r.format == spec.family, f"{template} detected as {r.format}"
    text = r.tokenizer.chat_template
    return r, conversation(spec.family, "reasoning_content" in text or ".thinking" in text)
