"""LoRA adapters (through `peft`) and Hugging Face-format checkpoints of full and LoRA policies.

- `apply_lora` wraps a causal LM with LoRA adapters (`lora_rank`, `lora_alpha` in the config);
  only adapter weights train. B starts at zero, so the wrapped model computes exactly the base model.
- `export_state_dict` gives the weights the sampler needs in the base model's names:
  W + (alpha / r) * B @ A for adapted layers, without merging in place (training continues),
  so `SamplerEngine.update_weights(export_state_dict(policy))` works for both kinds of policy.
- `adapter_twin` is what the sampler runs for a LoRA policy: the same PeftModel structure whose
  frozen base tensors ARE the policy's (shared, never copied) and whose adapters are its own copy,
  so weight sync sends only the adapters (`adapter_state_dict`, a few MB instead of the model).
- `save_checkpoint` writes a directory any HF tool opens: a full model (`config.json`,
  `model.safetensors`), or a LoRA adapter (`adapter_config.json`, `adapter_model.safetensors`,
  naming its base directory) or, with `merged=True`, the adapter merged into a full model for
  export. The tokenizer (with its chat template) is always saved alongside. Writing goes to a
  temporary sibling directory renamed into place, so a crash never leaves half a checkpoint.
- `load_checkpoint` opens either kind.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from turnwise.policy.load import ModelLoadError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def apply_lora(model: PreTrainedModel, rank: int, alpha: int,
               target_modules: Sequence[str] | str = "all-linear", dropout: float = 0.0) -> PeftModel:
    """`model` wrapped with LoRA adapters of `rank` on `target_modules` (every linear layer but the head).

    As with `peft.get_peft_model`, the adapters are injected into `model` itself.
    """
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout,
                        bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def is_lora(model: object) -> bool:
    return isinstance(model, PeftModel)


@torch.no_grad()
def export_state_dict(model: PreTrainedModel | PeftModel, *, clone: bool = True) -> dict[str, torch.Tensor]:
    """Full weights in the base model's names (LoRA deltas added), detached copies (`clone`
    False: a full model's own tensors, for a caller that copies them at once)."""
    if not isinstance(model, PeftModel):
        return {k: v.detach().clone() if clone else v.detach() for k, v in model.state_dict().items()}
    inner = model.get_base_model()
    deltas = {}
    for name, module in inner.named_modules():
        if isinstance(module, LoraLayer) and not module.merged:
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    key = f"{name}.weight"
                    delta = module.get_delta_weight(adapter)
                    deltas[key] = deltas[key] + delta if key in deltas else delta
    out = {}
    for key, value in inner.state_dict().items():
        if ".lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")
        out[key] = (value + deltas[key]) if key in deltas else value.detach().clone()
    return out


def adapter_state_dict(model: PeftModel) -> dict[str, torch.Tensor]:
    """The trainable (adapter) tensors of `model` under their PeftModel names, detached, uncopied."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def adapter_twin(model: PeftModel) -> PeftModel:
    """A copy of `model` sharing every frozen tensor with it (module docstring), in eval mode."""
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()] if not t.requires_grad}
    twin = copy.deepcopy(model, memo=shared)
    return twin.eval().requires_grad_(False)


def merged_copy(model: PeftModel) -> PreTrainedModel:
    """A plain model with the adapters merged in; `model` itself is unchanged."""
    return copy.deepcopy(model).merge_and_unload()


def save_checkpoint(model: PreTrainedModel | PeftModel, tokenizer: PreTrainedTokenizerBase,
                    path: str | Path, *, merged: bool = False,
                    state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a HF-format checkpoint directory at `path` (replacing one already there); with
    `state_dict`, those tensors instead of the model's own (a sharded model's, gathered)."""
    final = Path(os.path.expanduser(path))
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        to_save = merged_copy(model) if merged and isinstance(model, PeftModel) else model
        to_save.save_pretrained(tmp, **({"state_dict": state_dict} if state_dict is not None else {}))
        tokenizer.save_pretrained(tmp)
        if final.exists():
            old = final.with_name(f".old-{final.name}-{os.getpid()}")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, *, dtype: str = "float32",
                    trainable: bool = False) -> tuple[PreTrainedModel | PeftModel, PreTrainedTokenizerBase]:
    """A full or LoRA checkpoint (LoRA: its base from `adapter_config.json`), in eval mode."""
    path = Path(os.path.expanduser(path))
    if (path / "adapter_config.json").is_file():
        base_dir = PeftConfig.from_pretrained(path).base_model_name_or_path
        if not base_dir or not Path(base_dir).is_dir():
            raise ModelLoadError(f"LoRA checkpoint {path} names a base model that is not a local directory: {base_dir}")
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=_DTYPES[dtype], attn_implementation="sdpa")
        model: PreTrainedModel | PeftModel = PeftModel.from_pretrained(base, path, is_trainable=trainable)
    elif (path / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[dtype], attn_implementation="sdpa")
    else:
        raise ModelLoadError(f"not a checkpoint directory (no config.json or adapter_config.json): {path}")
    model.train(trainable)
    return model, AutoTokenizer.from_pretrained(path)
