"""Load the policy model and tokenizer: a local Hugging Face directory (a full model or a LoRA
adapter naming its base), or the built-in tiny model.

Sampling and training run on the same loaded objects. The model is returned in eval mode on
`model.device` in `model.dtype` (`resolve_device`, `resolve_dtype`: auto is CUDA in bfloat16
when present, else the CPU in float32, the only dtype that matches logprobs to 1e-4 there) with
SDPA attention, which is the fastest exact kernel on CPU and accepts the custom 4-D masks the
sampler builds. A LoRA adapter directory (what training checkpoints with `lora_rank` > 0) is
loaded onto its base and merged, so eval and serving run a plain model.
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


def resolve_device(cfg: ModelConfig) -> torch.device:
    """`cfg.device` as a torch device (auto: CUDA when present); a one-line error when CUDA is
    asked for and absent."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("model.device is cuda but torch sees no CUDA device; set model.device=cpu or auto")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def resolve_dtype(cfg: ModelConfig) -> torch.dtype:
    """`cfg.dtype` as a torch dtype (auto: bfloat16 on CUDA, float32 on the CPU)."""
    if cfg.dtype == "auto":
        return torch.bfloat16 if resolve_device(cfg).type == "cuda" else torch.float32
    return _DTYPES[cfg.dtype]


def is_adapter_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file() and not (path / "config.json").is_file()


def resolve_model_dir(cfg: ModelConfig) -> Path:
    """The directory `load_policy` reads: `cfg.path`, checked, or the (built) tiny model."""
    if cfg.path is None:
        return tiny_model_dir(cfg)
    path = Path(os.path.expanduser(cfg.path))
    if not path.exists():
        raise ModelLoadError(f"model.path does not exist: {path}")
    if not path.is_dir() or not ((path / "config.json").is_file() or is_adapter_dir(path)):
        raise ModelLoadError(
            f"model.path is not a Hugging Face model or LoRA adapter directory (no config.json or "
            f"adapter_config.json): {path}; leave model.path unset to use the built-in tiny model"
        )
    return path


def load_policy(cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model (eval mode, on `cfg.device` in `cfg.dtype`) and tokenizer from `cfg.path` or the tiny model."""
    path = resolve_model_dir(cfg)
    device, dtype = resolve_device(cfg), resolve_dtype(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if is_adapter_dir(path):
            model = _load_merged_adapter(path, dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load a causal LM and tokenizer from {path}: {e}") from e
    model.to(device)
    model.eval()
    return model, tokenizer


def _load_merged_adapter(path: Path, dtype: torch.dtype) -> PreTrainedModel:
    from peft import PeftConfig, PeftModel

    base_dir = PeftConfig.from_pretrained(path).base_model_name_or_path
    if not base_dir or not (Path(base_dir) / "config.json").is_file():
        raise ModelLoadError(f"LoRA adapter {path} names a base model that is not a local model directory: "
                             f"{base_dir!r}")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, attn_implementation="sdpa")
    return PeftModel.from_pretrained(base, path).merge_and_unload()
