"""Per-token estimators of KL(π_θ || π_ref), for a penalty that keeps the policy near a reference.

J. Schulman, "Approximating KL Divergence" (2020), http://joschu.net/blog/kl-approx.html.
With tokens sampled from the policy and log ρ = log π_ref(t) − log π_θ(t):

    k1 = −log ρ                  unbiased, high variance, can be negative
    k2 = ½ (log ρ)²              biased, low variance; its gradient is the true gradient of KL
                                 in expectation (on-policy), which is why it is the usual loss term
    k3 = (ρ − 1) − log ρ         unbiased, low variance, never negative (GRPO's choice)

The loss (`losses.compute_loss` with `kl_coef > 0`) aggregates the chosen estimator like the
policy term. With LoRA the reference is the base model with adapters disabled; computing
`ref_logprobs_B_T` is the trainer's job. Departure: log ρ is clamped to ±20 before `exp` (as in
verl), so one corrupt logprob cannot make the loss infinite.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from turnwise.algo.registry import Registry

KLEstimator = Callable[[Tensor], Tensor]
"""Maps log ρ = logp_ref − logp_θ (per token) to a per-token KL estimate."""

KL_ESTIMATORS: Registry[KLEstimator] = Registry("KL estimator")
register_kl_estimator = KL_ESTIMATORS.register

_LOG_RATIO_BOUND = 20.0


@register_kl_estimator("k1")
def _k1(log_rho: Tensor) -> Tensor:
    return -log_rho


@register_kl_estimator("k2")
def _k2(log_rho: Tensor) -> Tensor:
    return 0.5 * log_rho.square()


@register_kl_estimator("k3")
def _k3(log_rho: Tensor) -> Tensor:
    return torch.expm1(log_rho) - log_rho


def kl_penalty(logprobs_B_T: Tensor, ref_logprobs_B_T: Tensor, estimator: str) -> Tensor:
    """Per-token KL estimate, same shape as the inputs; the gradient flows through `logprobs_B_T` only."""
    fn = KL_ESTIMATORS.get(estimator)
    if logprobs_B_T.shape != ref_logprobs_B_T.shape:
        raise ValueError(f"logprobs {tuple(logprobs_B_T.shape)} and ref_logprobs "
                         f"{tuple(ref_logprobs_B_T.shape)} must have the same shape")
    log_rho = (ref_logprobs_B_T.detach().to(logprobs_B_T.dtype) - logprobs_B_T)
    return fn(log_rho.clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND))
