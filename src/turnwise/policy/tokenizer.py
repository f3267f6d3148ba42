"""The built-in tiny tokenizer: a byte-level BPE with a Qwen2.5-style (Hermes) chat template.

Trained with the `tokenizers` library on `corpus.tiny_corpus()`, so the vocabulary is the
same on every machine and every run. Pre-tokenization is Qwen2's (digits one per token, which makes
copying order numbers learnable for a small model). The chat template follows Qwen2.5's
(ChatML turns, Hermes `<tool_call>` JSON, tool results as `<tool_response>` inside a user
turn) but renders each tool as one signature line, `name(arg: type, choice: a|b): description`
(nested schemas as compact JSON), instead of its JSON Schema, and drops the default system
prompt: a tool's JSON Schema costs ~45 tokens of this small vocabulary, its signature ~12,
and every prompt token is paid for in sampling and in training.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from turnwise.policy.corpus import tiny_corpus

PAD = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD, IM_START, IM_END, "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")

# Qwen2's split (one token per digit): `AutoTokenizer` reloads a saved Qwen2 model's tokenizer
# as `Qwen2Tokenizer`, which imposes this normalizer and pre-tokenizer, so training uses them too.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

HERMES_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools' }}"
    "{%- for tool in tools %}"
    "{%- set fn = tool.function if tool.function is defined else tool %}"
    "{%- set props = fn.parameters.properties if fn.parameters is defined and fn.parameters.properties is defined"
    " else {} %}"
    "{{- '\\n' + fn.name + '(' }}"
    "{%- for name, spec in props.items() %}"
    "{{- (', ' if not loop.first else '') + name + ': ' }}"
    "{%- if spec.enum is defined %}{{- spec.enum | join('|') }}"
    "{%- elif spec.type is string %}{{- spec.type }}{%- else %}{{- spec | tojson }}{%- endif %}"
    "{%- endfor %}"
    "{{- '): ' + (fn.description or '') }}"
    "{%- endfor %}"
    "{{- '\\nCall a tool as <tool_call>\\n{\"name\": <name>, \"arguments\": <args>}\\n</tool_call>"
    "<|im_end|>\\n' }}"
    "{%- elif messages and messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first)"
    " or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + tool_call.name + '\", \"arguments\": ' }}"
    "{%- if tool_call.arguments is string %}{{- tool_call.arguments }}"
    "{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_tiny_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Train the tiny BPE (deterministic) and wrap it with its special tokens and chat template.

    The vocabulary holds at most `vocab_size` tokens; the embedded corpus yields a few thousand
    merges, so very large sizes end smaller (the model's embedding keeps `vocab_size` rows).
    """
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=IM_END, unk_token=None,
        additional_special_tokens=list(SPECIAL_TOKENS[1:2] + SPECIAL_TOKENS[3:]),
        clean_up_tokenization_spaces=False, model_max_length=1 << 30,
    )
    fast.chat_template = HERMES_TEMPLATE
    return fast
