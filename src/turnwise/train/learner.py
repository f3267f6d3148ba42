"""The learner: turns datums into optimizer steps.

Both the supervised warm start (`cross_entropy`) and RL (`ppo`, `cispo`, ...) go through
`Learner.step`; only the loss name differs. Gradients accumulate over micro-batches of
`micro_batch_size` sequences (the memory knob), each weighted so the step equals the loss over
the whole batch (token-mean: by tokens; sequence aggregations: by sequences); then the gradient
norm is clipped to `max_grad_norm`, AdamW steps, and the learning-rate schedule advances.

Learning rate at optimizer step n (W = `lr_warmup_steps`, N = all RL optimizer steps):
    lr * n / W                                           while n < W
    lr * {1, 1 - p, (1 + cos(pi p)) / 2}, p = (n - W) / (N - W)   constant | linear | cosine
Reference logprobs for `kl_coef` come from the policy at the start of RL: a frozen copy for full
fine-tuning, the same model with its adapters disabled for LoRA (no copy needed).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Sequence

import torch

from turnwise.algo.losses import compute_loss
from turnwise.config import JobConfig
from turnwise.policy.checkpoint import is_lora
from turnwise.policy.logprobs import token_logprobs
from turnwise.types import Datum, LossOptions


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
    return {"tokens_B_T": tokens, "attention_B_T": attention, "mask_B_T": mask,
            "sampler_logprobs_B_T": sampler_logprobs, "advantages_B_T": advantages}


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate at optimizer step n (see the module docstring)."""
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


class Learner:
    """Owns the trained model, its AdamW optimizer, the learning-rate schedule and the KL reference."""

    def __init__(self, model: torch.nn.Module, cfg: JobConfig, learning_rate: float | None = None,
                 total_steps: int | None = None, schedule: str | None = None,
                 warmup_steps: int | None = None) -> None:
        self.model = model
        self.cfg = cfg
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params, lr=learning_rate or cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
        schedule = "constant" if total_steps is None else (schedule or cfg.lr_schedule)
        warmup = 0 if total_steps is None else (cfg.lr_warmup_steps if warmup_steps is None else warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(schedule, warmup, total_steps or 1))
        self._reference: torch.nn.Module | None = None
        if cfg.kl_coef > 0 and not is_lora(model):
            self._reference = copy.deepcopy(model).eval().requires_grad_(False)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    @torch.no_grad()
    def _reference_logprobs(self, t: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
        model = self._reference or self.model
        ctx = self.model.disable_adapter() if self._reference is None else contextlib.nullcontext()
        with ctx:
            return token_logprobs(model, t["tokens_B_T"], t["attention_B_T"], temperature,
                                  positions_B_T=t["mask_B_T"])[0]

    def train_batch(self, datums_D: Sequence[Datum], loss_fn: str, options: LossOptions,
                    temperature: float, num_substeps: int = 1) -> dict[str, float]:
        """`num_substeps` optimizer steps on one batch. Reference logprobs (`kl_coef`) and the
        trainer's pre-update logprobs (`tis_cap`) are computed once, before the first substep."""
        micro = self._micro_batches(datums_D)
        extras: list[dict[str, torch.Tensor]] = [{} for _ in micro]
        with torch.no_grad():
            for t, extra in zip(micro, extras, strict=True):
                if options.kl_coef > 0:
                    extra["ref_logprobs_B_T"] = self._reference_logprobs(t, temperature)
                if options.tis_cap is not None:
                    extra["old_logprobs_B_T"] = token_logprobs(self.model, t["tokens_B_T"], t["attention_B_T"],
                                                               temperature, positions_B_T=t["mask_B_T"])[0]
        metrics: dict[str, float] = {}
        for _ in range(num_substeps):
            metrics = self._step(micro, extras, loss_fn, options, temperature)
        return metrics

    def step(self, datums_D: Sequence[Datum], loss_fn: str, options: LossOptions,
             temperature: float = 1.0) -> dict[str, float]:
        """One optimizer step over all datums; returns loss metrics averaged over micro-batches."""
        micro = self._micro_batches(datums_D)
        return self._step(micro, [{} for _ in micro], loss_fn, options, temperature)

    def _micro_batches(self, datums_D: Sequence[Datum]) -> list[dict[str, torch.Tensor]]:
        size = self.cfg.micro_batch_size
        return [pad_datums(datums_D[i:i + size]) for i in range(0, len(datums_D), size)]

    def _step(self, micro: list[dict[str, torch.Tensor]], extras: list[dict[str, torch.Tensor]], loss_fn: str,
              options: LossOptions, temperature: float) -> dict[str, float]:
        self.model.train()
        per_token = options.loss_agg_mode == "token-mean" or loss_fn == "cross_entropy"
        total = sum(float(t["mask_B_T"].sum()) if per_token else len(t["tokens_B_T"]) for t in micro)
        total = max(total, 1)
        sums: dict[str, float] = {}
        maxes: dict[str, float] = {}
        for t, extra in zip(micro, extras, strict=True):
            logprobs, entropy = token_logprobs(self.model, t["tokens_B_T"], t["attention_B_T"],
                                               temperature, with_entropy=True, positions_B_T=t["mask_B_T"])
            loss, metrics = compute_loss(loss_fn, logprobs, t["sampler_logprobs_B_T"], t["advantages_B_T"],
                                         t["mask_B_T"], options, entropy_B_T=entropy, **extra)
            weight = (float(t["mask_B_T"].sum()) if per_token else len(t["tokens_B_T"])) / total
            (loss * weight).backward()
            metrics = {**metrics, "loss/value": float(loss.detach())}
            if "loss/approx_kl" in metrics:
                metrics["loss/kl"] = metrics["loss/approx_kl"]
            if loss_fn != "cross_entropy":
                diff = (logprobs.detach() - t["sampler_logprobs_B_T"]).abs() * t["mask_B_T"]
                mean_diff = float(diff.sum() / t["mask_B_T"].sum().clamp(min=1))
                metrics["mismatch/logprob_abs_diff"] = mean_diff
                metrics["mismatch/logprob_abs_diff/mean"] = mean_diff
                maxes["mismatch/logprob_abs_diff/max"] = max(maxes.get("mismatch/logprob_abs_diff/max", 0.0),
                                                             float(diff.max()))
            for k, v in metrics.items():
                if k.endswith("_max"):
                    maxes[k] = max(maxes.get(k, float("-inf")), v)
                else:
                    sums[k] = sums.get(k, 0.0) + v * weight
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.eval()
        return {**sums, **maxes, "loss/grad_norm": float(grad_norm), "training/learning_rate": lr}
