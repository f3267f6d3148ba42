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
                "<|image|>", "<|audio|>", "<|video|>"), bos="<bos>", eos="<eos>"),
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
def family_tokenizer(template: str) -> PreTrainedTokenizerBase:
    """The test tokenizer for one template file (see `SPECS`)."""
    spec = SPECS[template]
    text = (TEMPLATES / template).read_text()
    if not spec.specials:
        tok = AutoTokenizer.from_pretrained(_qwen_dir())
        tok.chat_template = text
        return tok
    raw = json.loads((_qwen_dir() / "tokenizer.json").read_text())
    backend = Tokenizer.from_str(json.dumps(raw))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec.specials])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=spec.bos, eos_token=spec.eos,
                                  pad_token="<|endoftext|>", clean_up_tokenization_spaces=False)
    tok.chat_template = text
    return tok
