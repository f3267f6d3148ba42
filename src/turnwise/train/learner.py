"""The learner of a run: the policy it trains (full weights or LoRA adapters, in which precision,
with activation checkpointing or not) and the training backend over it (one process, or FSDP2
ranks when `trainer.nproc` > 1, or a Tinker-API service with `trainer.backend: tinker`).
`train.step.open_run` calls `open_backend`; nothing else picks one.

- Full fine-tuning keeps fp32 master weights (the model is cast up if `model.dtype` is lower) and
  computes in `model.dtype` under autocast; the sampler holds its own copy in `model.dtype`.
- LoRA (`cfg.lora_sizes()`): adapters in fp32 on a frozen base in `model.dtype`; the sampler runs
  an adapter twin that shares the base tensors with the policy (`policy.checkpoint.adapter_twin`),
  so there is no second base copy in one process and weight sync sends the adapters only. vLLM
  servers load each version's adapters by name (`VLLMEngine.serve_adapters`); servers that cannot
  (attached ones without `--enable-lora`) get the merged weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from turnwise.backends import TrainingBackend
from turnwise.config import JobConfig
from turnwise.policy.checkpoint import adapter_state_dict, adapter_twin, apply_lora, export_state_dict
from turnwise.policy.load import resolve_device, resolve_dtype
from turnwise.train.backend import LocalBackend

_DTYPE_NAMES = {"torch.float32": "float32", "torch.bfloat16": "bfloat16", "torch.float16": "float16"}


@contextlib.contextmanager
def open_backend(cfg: JobConfig, rt: Any, warm_dir: Path | None = None) -> Iterator[TrainingBackend]:
    """The backend training `rt.model` (an `EmbeddedRuntime`'s) and publishing to `rt.engine`;
    `warm_dir`: the warm start's checkpoint, which saved adapters name as their base."""
    if cfg.trainer.backend == "tinker":  # the service trains; `rt.model` is None
        from turnwise.train.tinker_backend import open_tinker

        yield open_tinker(cfg, rt)
        return
    model = rt.model
    sizes = cfg.lora_sizes()
    compute = resolve_dtype(cfg.model)
    adapter_sync = False
    if sizes is not None:
        model = apply_lora(model, *sizes)
        if warm_dir is not None:
            model.peft_config["default"].base_model_name_or_path = str(warm_dir)
        if hasattr(rt.engine, "replace_model"):  # one process: the sampler runs an adapter twin
            rt.engine.replace_model(adapter_twin(model))
            adapter_sync = True
        elif hasattr(rt.engine, "serve_adapters"):  # vLLM: each version's adapters loaded by name
            adapter_sync = rt.engine.serve_adapters(model.peft_config["default"], export_state_dict(model),
                                                    adapter_state_dict(model))
    else:
        model.float()  # fp32 master weights; the sampler keeps its own copy in model.dtype
    if cfg.trainer.activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if cfg.trainer.nproc == 1:
        yield LocalBackend(model, rt.engine, tokenizer=rt.tokenizer, micro_batch_size=cfg.micro_batch_size,
                           temperature=cfg.temperature, kl_reference=cfg.kl_coef > 0, compute_dtype=compute,
                           adapter_sync=adapter_sync)
        return
    from turnwise.train.distributed import DistributedBackend, LearnerSpec, RankGroup

    if sizes is not None and not hasattr(rt.engine, "replace_model"):
        raise ValueError("trainer.nproc > 1 with LoRA syncs adapters only: it needs sampler.backend local")

    spec = LearnerSpec(model=cfg.model, lora=sizes, compute_dtype=_DTYPE_NAMES[str(compute)],
                       micro_batch_size=cfg.micro_batch_size, temperature=cfg.temperature,
                       kl_reference=cfg.kl_coef > 0, activation_checkpointing=cfg.trainer.activation_checkpointing)
    with RankGroup(cfg.trainer.nproc, device_type=resolve_device(cfg.model).type) as group:
        backend = DistributedBackend(group, model, rt.engine, tokenizer=rt.tokenizer, spec=spec)
        try:
            yield backend
        finally:
            backend.close()
