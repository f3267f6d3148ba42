"""The built-in tiny model: a randomly initialised Qwen2 causal LM plus our tiny tokenizer.

Built once per `TinyModelConfig` and cached on disk as an ordinary Hugging Face model
directory, so every other part of turnwise (sampler, trainer, checkpoints, `turnwise eval
--model <dir>`) treats it exactly like a downloaded model. The directory name carries a hash of
the config and `FORMAT_VERSION`; bump the version when the tokenizer, corpus or template change.
Building writes to a temporary sibling directory and renames it, so concurrent builders never
see a half-written model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import torch
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from turnwise.config import ModelConfig, TinyModelConfig
from turnwise.policy.corpus import tiny_corpus
from turnwise.policy.tokenizer import HERMES_TEMPLATE, IM_END, PAD, build_tiny_tokenizer

FORMAT_VERSION = 1


def tiny_model_dir(cfg: ModelConfig) -> Path:
    """Path of the tiny model directory for `cfg.tiny`, building it first when missing."""
    root = Path(os.path.expanduser(cfg.cache_dir))
    final = root / f"tiny-{_config_hash(cfg.tiny)}"
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-tiny-", dir=root))
    try:
        build_tiny(cfg.tiny, tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _config_hash(tiny: TinyModelConfig) -> str:
    # the corpus and template are hashed too, so editing either can never reuse a stale cached model
    text = "\n".join(tiny_corpus()) + HERMES_TEMPLATE
    payload = json.dumps({"format": FORMAT_VERSION, "text": hashlib.sha256(text.encode()).hexdigest(),
                          **tiny.model_dump()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def build_tiny(tiny: TinyModelConfig, out: Path, architecture: Literal["qwen2", "qwen3"] = "qwen2") -> Path:
    """The tiny model at `out` (uncached): `tiny`'s sizes, our tokenizer, random weights seeded by
    `tiny.seed`. `architecture` qwen3: the same sizes in Qwen3's shape (q/k norms, no qkv bias),
    for engines that implement Qwen3 only (SkyRL's JAX backend)."""
    tokenizer = build_tiny_tokenizer(tiny.vocab_size)
    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    pad_id = tokenizer.convert_tokens_to_ids(PAD)
    sizes = dict(
        vocab_size=tiny.vocab_size, hidden_size=tiny.hidden_size,
        num_hidden_layers=tiny.num_hidden_layers, num_attention_heads=tiny.num_attention_heads,
        num_key_value_heads=tiny.num_key_value_heads, intermediate_size=tiny.intermediate_size,
        max_position_embeddings=tiny.max_position_embeddings, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=eos_id, pad_token_id=pad_id, use_sliding_window=False,
    )
    if architecture == "qwen3":
        config = Qwen3Config(**sizes, head_dim=tiny.hidden_size // tiny.num_attention_heads,
                             max_window_layers=tiny.num_hidden_layers)
        model_class: type = Qwen3ForCausalLM
    else:
        config, model_class = Qwen2Config(**sizes), Qwen2ForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tiny.seed)
        model = model_class(config)
    model.generation_config = GenerationConfig(eos_token_id=[eos_id, pad_id], pad_token_id=pad_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
