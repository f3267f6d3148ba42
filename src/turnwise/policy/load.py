"""Load the policy model and tokenizer: a local Hugging Face directory or the built-in tiny model.

Sampling and training run on the same loaded objects. The model is returned in eval mode in the
configured dtype (fp32 by default, the only dtype that matches logprobs to 1e-4 on CPU) with
SDPA attention, which is the fastest exact kernel on CPU and accepts the custom 4-D masks the
sampler builds.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from turnwise.config import ModelConfig
from turnwise.policy.tiny import tiny_model_dir

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """The configured model path is missing or is not a Hugging Face model directory."""


def resolve_model_dir(cfg: ModelConfig) -> Path:
    """The directory `load_policy` reads: `cfg.path`, checked, or the (built) tiny model."""
    if cfg.path is None:
        return tiny_model_dir(cfg)
    path = Path(os.path.expanduser(cfg.path))
    if not path.exists():
        raise ModelLoadError(f"model.path does not exist: {path}")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ModelLoadError(
            f"model.path is not a Hugging Face model directory (no config.json): {path}; "
            "leave model.path unset to use the built-in tiny model"
        )
    return path


def load_policy(cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model (eval mode, `cfg.dtype`) and tokenizer from `cfg.path` or the tiny model."""
    path = resolve_model_dir(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[cfg.dtype], attn_implementation="sdpa")
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load a causal LM and tokenizer from {path}: {e}") from e
    model.eval()
    return model, tokenizer
