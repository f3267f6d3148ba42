"""`LocalBackend`: the in-process PyTorch implementation of `turnwise.backends.TrainingBackend`.

`forward_backward` pads the datums into micro-batches of `micro_batch_size` sequences of similar length (the memory
knob) and accumulates gradients, each micro-batch weighted so that the gradient equals the loss
over the whole call (token-mean: by tokens; sequence aggregations: by sequences). `optim_step`
clips the global gradient norm and steps AdamW with the caller's `AdamParams` (so the caller owns
the learning-rate schedule, as with Tinker). `save_weights_for_sampler` sends the weights the
sampler needs (LoRA deltas merged on the fly) and bumps the policy version only when an optimizer
step changed them. Reference logprobs for `kl_coef` come from the policy at the start of RL: a
frozen copy for full fine-tuning, the same model with its adapters disabled for LoRA.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from turnwise.algo.losses import compute_loss
from turnwise.backends import WeightSyncSampler
from turnwise.policy.checkpoint import export_state_dict, is_lora, save_checkpoint
from turnwise.policy.logprobs import token_logprobs
from turnwise.track.names import reduce_micro_batches
from turnwise.types import AdamParams, Datum, LossOptions


def pad_datums(datums_D: Sequence[Datum]) -> dict[str, torch.Tensor]:
    """Right-pad datums into `_B_T` tensors."""
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
    return out


def micro_batches(datums_D: Sequence[Datum], size: int) -> list[list[Datum]]:
    """Datums in micro-batches of `size`, longest first, so each pads to a similar length. The
    loss is the same as for any other grouping: each micro-batch's loss is weighted by its share
    of the batch's tokens (token-mean) or sequences."""
    ordered = sorted(datums_D, key=lambda d: len(d.segment.tokens_T), reverse=True)
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


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


class LocalBackend:
    """Trains `model` in this process and publishes its weights to `sampler` (module docstring)."""

    def __init__(self, model: torch.nn.Module, sampler: WeightSyncSampler | None, *, tokenizer: Any,
                 micro_batch_size: int, temperature: float = 1.0, kl_reference: bool = False) -> None:
        self.model = model
        self.sampler = sampler
        self.tokenizer = tokenizer
        self.micro_batch_size = micro_batch_size
        self.temperature = temperature
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=0.0)
        self.version = sampler.version if sampler is not None else 0
        self._changed = True
        """Weights changed since the last publish (at first: the sampler may hold others)."""
        self._reference: torch.nn.Module | None = None
        if kl_reference and not is_lora(model):
            self._reference = copy.deepcopy(model).eval().requires_grad_(False)

    # -- TrainingBackend ------------------------------------------------------------------

    def forward_backward(self, datums_D: Sequence[Datum], loss_fn: str,
                         loss_options: LossOptions) -> dict[str, float]:
        self.model.train()
        micro = [pad_datums(chunk) for chunk in micro_batches(datums_D, self.micro_batch_size)]
        per_token = loss_options.loss_agg_mode == "token-mean" or loss_fn == "cross_entropy"
        sizes = [float(t["mask_B_T"].sum()) if per_token else float(len(t["tokens_B_T"])) for t in micro]
        total = max(sum(sizes), 1.0)
        parts: list[tuple[dict[str, float], float]] = []
        for t, size in zip(micro, sizes, strict=True):
            extra = self._extras(t, loss_options)
            logprobs, entropy = token_logprobs(self.model, t["tokens_B_T"], t["attention_B_T"],
                                               self.temperature, with_entropy=True, positions_B_T=t["mask_B_T"])
            if loss_options.tis_cap is not None:
                extra["old_logprobs_B_T"] = t.get("old_logprobs_B_T", logprobs.detach())
            loss, metrics = compute_loss(loss_fn, logprobs, t["sampler_logprobs_B_T"], t["advantages_B_T"],
                                         t["mask_B_T"], loss_options, entropy_B_T=entropy, **extra)
            (loss * (size / total)).backward()
            metrics = {**metrics, "loss/value": float(loss.detach())}
            if loss_fn != "cross_entropy":
                diff = (logprobs.detach() - t["sampler_logprobs_B_T"]).abs() * t["mask_B_T"]
                metrics["train/logprob_mismatch"] = float(diff.sum() / t["mask_B_T"].sum().clamp(min=1))
                metrics["train/logprob_mismatch_max"] = float(diff.max())
            parts.append((metrics, size / total))
        self.model.eval()
        return reduce_micro_batches(parts)

    def optim_step(self, adam: AdamParams) -> dict[str, float]:
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), adam.max_grad_norm)
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
        if self.sampler is not None and (self._changed or self.sampler.version != self.version):
            self.sampler.update_weights(export_state_dict(self.model), version=self.version)
        self._changed = False
        return self.version

    def save_state(self, path: Path) -> None:
        save_checkpoint(self.model, self.tokenizer, path / "model")
        torch.save({"optimizer": self.optimizer.state_dict(), "policy_version": self.version,
                    "changed": self._changed}, path / "backend_state.pt")

    def load_state(self, path: Path) -> None:
        from turnwise.train.checkpoint import load_weights

        load_weights(self.model, path)
        state = torch.load(path / "backend_state.pt", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.version, self._changed = state["policy_version"], state["changed"]

    @torch.no_grad()
    def forward(self, datums_D: Sequence[Datum]) -> list[tuple[float, ...]]:
        out: list[tuple[float, ...]] = []
        for i in range(0, len(datums_D), self.micro_batch_size):
            chunk = datums_D[i:i + self.micro_batch_size]
            t = pad_datums(chunk)
            logprobs = token_logprobs(self.model, t["tokens_B_T"], t["attention_B_T"], self.temperature,
                                      positions_B_T=t["mask_B_T"])[0]
            out += [tuple(logprobs[j, :len(d.segment.tokens_T)].tolist()) for j, d in enumerate(chunk)]
        return out

    def export(self, path: Path) -> None:
        save_checkpoint(self.model, self.tokenizer, path, merged=True)

    # -- pieces ---------------------------------------------------------------------------

    @torch.no_grad()
    def _extras(self, t: dict[str, torch.Tensor], options: LossOptions) -> dict[str, torch.Tensor]:
        if options.kl_coef <= 0:
            return {}
        model = self._reference or self.model
        ctx = self.model.disable_adapter() if self._reference is None else contextlib.nullcontext()
        with ctx:
            return {"ref_logprobs_B_T": token_logprobs(model, t["tokens_B_T"], t["attention_B_T"],
                                                       self.temperature, positions_B_T=t["mask_B_T"])[0]}
