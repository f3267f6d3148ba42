"""`LocalBackend`: the in-process PyTorch implementation of `turnwise.backends.TrainingBackend`.

`forward_backward` pads the datums into micro-batches of `micro_batch_size` sequences of similar length (the memory
knob) and accumulates gradients, each micro-batch weighted so that the gradient equals the loss
over the whole call (token-mean: by tokens; sequence aggregations: by sequences). `optim_step`
clips the global gradient norm and steps AdamW with the caller's `AdamParams` (so the caller owns
the learning-rate schedule, as with Tinker). `save_weights_for_sampler` sends the weights the
sampler needs (LoRA deltas merged on the fly) and bumps the policy version only when an optimizer
step changed them. Reference logprobs for `kl_coef` come from the policy at the start of RL: a
frozen copy for full fine-tuning, the same model with its adapters disabled for LoRA.

Device and precision: the datums go to the model's device; with `compute_dtype` bfloat16 (or
float16) the forward runs under `torch.autocast`, while the trained weights and Adam's moments
stay in their own dtype (float32: mixed precision with fp32 master weights). Weight sync: a full
policy's own tensors are handed to `update_weights`, which copies them (no clone per step); a
LoRA policy whose sampler runs an adapter twin (`adapter_sync`, `policy.checkpoint.adapter_twin`)
sends the adapter tensors only. `sync_bytes` is what the last publish sent (`weights/bytes_sent`).
The optimizer state is saved keyed by parameter name (torch.distributed.checkpoint's format), so a
checkpoint of this backend and one of `train.distributed.DistributedBackend` resume each other.

Memory on the CPU: glibc serves freed blocks below its mmap threshold from its heap, and raises
that threshold (up to 32 MiB) each time a mapped block is freed, so after a few micro-batches
activations and gradients land on the heap, whose freed holes stay resident and fragment: one
LoRA step of a 0.5B model peaked 1 GiB higher (`bench/memory.py --ratios`). A CPU backend fixes
the threshold at 1 MiB (`mallopt`), so blocks of that size and more go back to the OS when freed.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from turnwise.algo.losses import compute_loss
from turnwise.backends import WeightSyncSampler
from turnwise.policy.checkpoint import adapter_state_dict, export_state_dict, is_lora, save_checkpoint
from turnwise.policy.logprobs import TokenLogprobs
from turnwise.track.names import reduce_micro_batches
from turnwise.types import AdamParams, Datum, LossOptions


def pad_datums(datums_D: Sequence[Datum], device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Right-pad datums into `_B_T` tensors (on `device`)."""
    width = max(len(d.segment.tokens_T) for d in datums_D)
    B = len(datums_D)
    tokens = torch.zeros(B, width, dtype=torch.long)
    attention = torch.zeros(B, width, dtype=torch.long)
    mask = torch.zeros(B, width)
    sampler_logprobs = torch.zeros(B, width)
    advantages = torch.zeros(B, width)
    for i, d in enumerate(datums_D):
        n = len(d.segment.tokens_T)
        tokens[i, :n] = torch.tensor(d.segment.tokens_T)
        attention[i, :n] = 1
        mask[i, :n] = torch.tensor(d.segment.loss_mask_T, dtype=torch.float32)
        sampler_logprobs[i, :n] = torch.tensor(d.segment.logprobs_T)
        advantages[i, :n] = torch.tensor(d.advantages_T)
    out = {"tokens_B_T": tokens, "attention_B_T": attention, "mask_B_T": mask,
           "sampler_logprobs_B_T": sampler_logprobs, "advantages_B_T": advantages}
    if all(d.trainer_logprobs_T is not None for d in datums_D):
        trainer = torch.zeros(B, width)
        for i, d in enumerate(datums_D):
            trainer[i, :len(d.trainer_logprobs_T)] = torch.tensor(d.trainer_logprobs_T)  # type: ignore[arg-type]
        out["old_logprobs_B_T"] = trainer
    return out if device is None or device.type == "cpu" else {k: v.to(device) for k, v in out.items()}


def loss_sizes(datums_D: Sequence[Datum], loss_fn: str, options: LossOptions) -> list[float]:
    """Each datum's share of the loss before normalising: its loss tokens (token-mean, and
    cross_entropy) or 1 (the sequence aggregations). A micro-batch weighs the sum of its datums'."""
    if options.loss_agg_mode == "token-mean" or loss_fn == "cross_entropy":
        return [float(sum(d.segment.loss_mask_T)) for d in datums_D]
    return [1.0] * len(datums_D)


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate at optimizer step n (W = warmup, N = all steps):
        (n + 1) / (W + 1)                                   while n < W
        {1, 1 - p, (1 + cos(pi p)) / 2}, p = (n - W) / (N - W)   constant | linear | cosine"""
    def factor(n: int) -> float:
        if n < warmup_steps:
            return (n + 1) / (warmup_steps + 1)
        p = min(1.0, (n - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return max(0.0, 1.0 - p)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * p))
        return 1.0
    return factor


_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
HEAP_BLOCK_LIMIT = 1 << 20


def return_freed_blocks(limit: int = HEAP_BLOCK_LIMIT) -> bool:
    """Fix glibc's mmap threshold at `limit` bytes (module docstring); False where the C library is
    not glibc (nothing changes there)."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, limit))


class LocalBackend:
    """Trains `model` in this process and publishes its weights to `sampler` (module docstring)."""

    def __init__(self, model: torch.nn.Module, sampler: WeightSyncSampler | None, *, tokenizer: Any,
                 micro_batch_size: int, temperature: float = 1.0, kl_reference: bool = False,
                 compute_dtype: torch.dtype | None = None, adapter_sync: bool = False,
                 reference: torch.nn.Module | None = None, logprobs: TokenLogprobs | None = None,
                 reference_logprobs: TokenLogprobs | None = None) -> None:
        """`reference` (a frozen policy) and the `TokenLogprobs` wrappers are given by the
        data-parallel learner, which shards them; otherwise they are made here."""
        self.model = model
        self._logprobs = logprobs if logprobs is not None else TokenLogprobs(model)
        self.sampler = sampler
        self.tokenizer = tokenizer
        self.micro_batch_size = micro_batch_size
        self.temperature = temperature
        self.device = next(model.parameters()).device
        if self.device.type == "cpu":
            return_freed_blocks()
        self.compute_dtype = compute_dtype
        self.adapter_sync = adapter_sync and is_lora(model)
        params = [p for p in model.parameters() if p.requires_grad]
        # CUDA: fused (one kernel, no full-size temporaries; foreach's sqrt of the second moment is
        # another copy of the weights). CPU: torch's default, one tensor at a time (the demo's numbers)
        self.optimizer = torch.optim.AdamW(params, lr=0.0, fused=True if self.device.type == "cuda" else None)
        self.version = sampler.version if sampler is not None else 0
        self.sync_bytes = 0
        """Bytes the last `save_weights_for_sampler` sent to the sampler (0: nothing changed)."""
        self._changed = True
        """Weights changed since the last publish (at first: the sampler may hold others)."""
        if kl_reference and reference is None and not is_lora(model):
            reference = copy.deepcopy(model).eval().requires_grad_(False)
        self._reference = reference_logprobs
        if reference_logprobs is None and reference is not None:
            self._reference = TokenLogprobs(reference)

    # -- TrainingBackend ------------------------------------------------------------------

    def forward_backward(self, datums_D: Sequence[Datum], loss_fn: str,
                         loss_options: LossOptions) -> dict[str, float]:
        sizes = loss_sizes(datums_D, loss_fn, loss_options)
        return reduce_micro_batches(self.accumulate(datums_D, sizes, max(sum(sizes), 1.0), loss_fn, loss_options))

    def accumulate(self, datums_D: Sequence[Datum], sizes_D: Sequence[float], total: float, loss_fn: str,
                   loss_options: LossOptions, *, scale: float = 1.0, micro_batches: int = 0,
                   filler: Datum | None = None) -> list[tuple[dict[str, float], float]]:
        """Back-propagate the loss of `datums_D`, each micro-batch weighted by its share of `total`
        (times `scale`); `(metrics, weight)` per micro-batch. A data-parallel rank passes the whole
        batch's `total`, `scale` = ranks (the gradient reduction averages), and runs `micro_batches`
        in all, padding with zero-weight passes over `filler` (every rank must run as many)."""
        self.model.train()
        mbs = self.micro_batch_size
        # longest first, so each micro-batch pads to a similar length (the weights make the
        # gradient independent of the grouping)
        order = sorted(range(len(datums_D)), key=lambda i: len(datums_D[i].segment.tokens_T), reverse=True)
        datums_D, sizes_D = [datums_D[i] for i in order], [sizes_D[i] for i in order]
        chunks = [(datums_D[i:i + mbs], sum(sizes_D[i:i + mbs])) for i in range(0, len(datums_D), mbs)]
        if filler is not None:
            chunks += [([filler], 0.0)] * max(0, micro_batches - len(chunks))
        parts: list[tuple[dict[str, float], float]] = []
        for chunk, size in chunks:
            t = pad_datums(chunk, self.device)
            with self._autocast():
                extra = self._extras(t, loss_options)
                logprobs, entropy = self._logprobs(t["tokens_B_T"], t["attention_B_T"], self.temperature,
                                                   with_entropy=True, positions_B_T=t["mask_B_T"])
            if loss_options.tis_cap is not None:
                extra["old_logprobs_B_T"] = t.get("old_logprobs_B_T", logprobs.detach())
            loss, metrics = compute_loss(loss_fn, logprobs, t["sampler_logprobs_B_T"], t["advantages_B_T"],
                                         t["mask_B_T"], loss_options, entropy_B_T=entropy, **extra)
            (loss * (scale * size / total)).backward()
            if size == 0.0:  # a filler pass: only there for the collectives
                continue
            metrics = {**metrics, "loss/value": float(loss.detach())}
            if loss_fn != "cross_entropy":
                diff = (logprobs.detach() - t["sampler_logprobs_B_T"]).abs() * t["mask_B_T"]
                metrics["train/logprob_mismatch"] = float(diff.sum() / t["mask_B_T"].sum().clamp(min=1))
                metrics["train/logprob_mismatch_max"] = float(diff.max())
            parts.append((metrics, size / total))
        self.model.eval()
        return parts

    def optim_step(self, adam: AdamParams) -> dict[str, float]:
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                                   adam.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2: the norm over every shard
            grad_norm = grad_norm.full_tensor()
        for group in self.optimizer.param_groups:
            group.update(lr=adam.learning_rate, betas=(adam.beta1, adam.beta2), eps=adam.eps,
                         weight_decay=adam.weight_decay)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._changed = True
        return {"loss/grad_norm": float(grad_norm), "train/learning_rate": adam.learning_rate}

    def save_weights_for_sampler(self) -> int:
        if self._changed:
            self.version += 1
        self.sync_bytes = 0
        if self.sampler is not None and (self._changed or self.sampler.version != self.version):
            weights = self.sampler_weights()
            self.sampler.update_weights(weights, version=self.version)
            self.sync_bytes = sum(t.numel() * t.element_size() for t in weights.values())
        self._changed = False
        return self.version

    def sampler_weights(self) -> dict[str, torch.Tensor]:
        """What the sampler gets: the adapters (adapter sync), else the full (merged) weights."""
        if self.adapter_sync:
            return adapter_state_dict(self.model)  # type: ignore[arg-type]
        return export_state_dict(self.model, clone=False)

    def save_state(self, path: Path) -> None:
        save_checkpoint(self.model, self.tokenizer, path / "model")
        torch.save({"optimizer": get_optimizer_state_dict(self.model, self.optimizer),
                    "policy_version": self.version, "changed": self._changed}, path / "backend_state.pt")

    def load_state(self, path: Path) -> None:
        from turnwise.train.checkpoint import load_weights

        load_weights(self.model, path)
        state = torch.load(path / "backend_state.pt", weights_only=False)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])
        self.version, self._changed = state["policy_version"], state["changed"]

    @torch.no_grad()
    def forward(self, datums_D: Sequence[Datum]) -> list[tuple[float, ...]]:
        return self.forward_padded(datums_D)

    @torch.no_grad()
    def forward_padded(self, datums_D: Sequence[Datum], micro_batches: int = 0,
                       filler: Datum | None = None) -> list[tuple[float, ...]]:
        """`forward`, running `micro_batches` passes in all (fillers' results dropped; see `accumulate`)."""
        out: list[tuple[float, ...]] = []
        mbs = self.micro_batch_size
        chunks = [list(datums_D[i:i + mbs]) for i in range(0, len(datums_D), mbs)]
        n_real = len(chunks)
        if filler is not None:
            chunks += [[filler]] * max(0, micro_batches - n_real)
        for k, chunk in enumerate(chunks):
            t = pad_datums(chunk, self.device)
            with self._autocast():
                logprobs = self._logprobs(t["tokens_B_T"], t["attention_B_T"], self.temperature,
                                          positions_B_T=t["mask_B_T"])[0].float().cpu()
            if k < n_real:
                out += [tuple(logprobs[j, :len(d.segment.tokens_T)].tolist()) for j, d in enumerate(chunk)]
        return out

    def export(self, path: Path) -> None:
        save_checkpoint(self.model, self.tokenizer, path, merged=True)

    # -- pieces ---------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.compute_dtype is None or self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    @torch.no_grad()
    def _extras(self, t: dict[str, torch.Tensor], options: LossOptions) -> dict[str, torch.Tensor]:
        if options.kl_coef <= 0:
            return {}
        run = self._reference if self._reference is not None else self._logprobs
        ctx = self.model.disable_adapter() if self._reference is None else contextlib.nullcontext()
        with ctx:
            return {"ref_logprobs_B_T": run(t["tokens_B_T"], t["attention_B_T"], self.temperature,
                                            positions_B_T=t["mask_B_T"])[0]}
