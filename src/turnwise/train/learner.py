"""The learner: turns datums into one optimizer step.

Both the supervised warm start (`cross_entropy`) and RL (`ppo`, `cispo`, ...) go through
`Learner.step`; only the loss name differs. Gradients accumulate over micro-batches, each
weighted so the step equals the loss over the whole batch (token-mean: by tokens; sequence
aggregations: by sequences).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from turnwise.algo.losses import compute_loss
from turnwise.config import JobConfig
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


class Learner:
    """Owns the trained model and its AdamW optimizer."""

    def __init__(self, model: torch.nn.Module, cfg: JobConfig, learning_rate: float | None = None) -> None:
        self.model = model
        self.cfg = cfg
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params, lr=learning_rate or cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps, weight_decay=cfg.weight_decay)

    def step(self, datums_D: Sequence[Datum], loss_fn: str, options: LossOptions,
             temperature: float = 1.0) -> dict[str, float]:
        """One optimizer step over all datums; returns loss metrics averaged over micro-batches."""
        self.model.train()
        per_token = options.loss_agg_mode == "token-mean" or loss_fn == "cross_entropy"
        total = sum(sum(d.segment.loss_mask_T) for d in datums_D) if per_token else len(datums_D)
        total = max(total, 1)
        sums: dict[str, float] = {}
        maxes: dict[str, float] = {}
        size = self.cfg.micro_batch_size
        for start in range(0, len(datums_D), size):
            micro = datums_D[start:start + size]
            t = pad_datums(micro)
            logprobs, entropy = token_logprobs(self.model, t["tokens_B_T"], t["attention_B_T"],
                                               temperature, with_entropy=True)
            loss, metrics = compute_loss(loss_fn, logprobs, t["sampler_logprobs_B_T"], t["advantages_B_T"],
                                         t["mask_B_T"], options, entropy_B_T=entropy)
            weight = (float(t["mask_B_T"].sum()) if per_token else len(micro)) / total
            (loss * weight).backward()
            metrics = {**metrics, "loss/value": float(loss.detach())}
            if loss_fn != "cross_entropy":
                diff = (logprobs.detach() - t["sampler_logprobs_B_T"]).abs() * t["mask_B_T"]
                metrics["mismatch/logprob_abs_diff/mean"] = float(diff.sum() / t["mask_B_T"].sum().clamp(min=1))
                maxes["mismatch/logprob_abs_diff/max"] = max(maxes.get("mismatch/logprob_abs_diff/max", 0.0),
                                                             float(diff.max()))
            for k, v in metrics.items():
                if k.endswith("_max"):
                    maxes[k] = max(maxes.get(k, float("-inf")), v)
                else:
                    sums[k] = sums.get(k, 0.0) + v * weight
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.eval()
        return {**sums, **maxes, "loss/grad_norm": float(grad_norm)}
