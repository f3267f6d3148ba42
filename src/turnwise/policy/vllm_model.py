"""The vLLM engine for a job's model: what its servers load (the model directory itself, or an
untied copy) and the CPU defaults they start with."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Collection
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from turnwise.config import ConfigError, ModelConfig, VLLMConfig
from turnwise.policy.vllm_engine import VLLMEngine
from turnwise.policy.vllm_server import resolve_python

_CPU_KV_BYTES = 1 << 30
"""KV cache of a CPU server unless `sampler.vllm.args` sizes it (1 GiB: 4096-token contexts of the
tiny model for hundreds of sequences)."""


def vllm_engine(cfg: VLLMConfig, model_cfg: ModelConfig, model: PreTrainedModel,
                tokenizer: PreTrainedTokenizerBase, stop_token_ids: Collection[int],
                lora_rank: int | None = None) -> VLLMEngine:
    """The engine for `model_cfg`: its servers load the model directory itself when it is a full
    Hugging Face model with untied embeddings; else (a LoRA adapter directory, tied embeddings,
    the built-in tiny model) a copy of `model` that `save_untied` writes to the work directory.
    `lora_rank`: the job trains LoRA adapters of that rank, which the servers then serve."""
    from turnwise.policy.load import is_adapter_dir, resolve_device, resolve_dtype, resolve_model_dir

    dtype = str(resolve_dtype(model_cfg)).removeprefix("torch.")
    memory_flags = ("--kv-cache-memory-bytes", "--gpu-memory-utilization")
    if resolve_device(model_cfg).type == "cpu" and not any(a.split("=")[0] in memory_flags for a in cfg.args) \
            and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        # vLLM's CPU default reserves 92% of the machine's memory (`--gpu-memory-utilization` counts
        # CPU memory there) and refuses to start beside a trainer; a fixed KV cache instead
        cfg = cfg.model_copy(update={"args": [*cfg.args, "--kv-cache-memory-bytes", str(_CPU_KV_BYTES)]})
    if resolve_device(model_cfg).type == "cpu" and not any("chunked-prefill" in a for a in cfg.args):
        # vLLM 0.32's CPU runner fails every request of a batch (HTTP 500, `CPU Generator does not
        # use offset`) when a seeded request's prefill is split across steps; whole prefills only
        cfg = cfg.model_copy(update={"args": [*cfg.args, "--no-enable-chunked-prefill"]})
    cfg = cfg.model_copy(update={"python": resolve_python(cfg.python)})
    if shutil.which(cfg.python) is None:
        raise ConfigError(f"sampler.vllm.python not found: {cfg.python}; run `make vllm`, or set it to an "
                          "interpreter with vLLM installed")
    path = resolve_model_dir(model_cfg)
    work_dir = Path(tempfile.mkdtemp(prefix="turnwise-vllm-"))
    untied = tied_names(model)
    if is_adapter_dir(path) or untied is not None:
        path = work_dir / "model"
        save_untied(model, tokenizer, path, getattr(torch, dtype))
    return VLLMEngine(cfg, path, dtype=dtype, stop_token_ids=stop_token_ids, work_dir=work_dir, own_work_dir=True,
                      untied=untied, lora_rank=lora_rank)


def tied_names(model: PreTrainedModel) -> tuple[str, str] | None:
    """(input embedding, output layer) parameter names when the two are one tensor, else None."""
    head = model.get_output_embeddings()
    if head is None or head.weight is not model.get_input_embeddings().weight:
        return None
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if p is head.weight]
    return (names[0], names[-1]) if len(names) == 2 else None


def save_untied(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path, dtype: torch.dtype) -> None:
    """`model` as a Hugging Face directory whose output layer is its own tensor (equal to the
    embedding). vLLM's in-place reload of a tied pair updates the embedding and leaves the
    output layer's (CPU: prepacked) copy stale: logprobs then drift from the trainer's after the
    first update. Held apart, both are reloaded."""
    import copy

    from safetensors.torch import save_file

    config = copy.deepcopy(model.config)
    config.tie_word_embeddings = False
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(path)
    save_file({k: v.detach().to("cpu", dtype).contiguous().clone() for k, v in model.state_dict().items()},
              str(path / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(path)
