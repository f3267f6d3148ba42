"""turnwise.algo: pure functions, registered by name: advantages, losses, KL penalty.

    compute_advantages(name, rollouts, opts) -> (per-token advantages per rollout, metrics)
    compute_loss(name, logprobs, sampler_logprobs, advantages, mask, opts, ...) -> (loss, metrics)
    kl_penalty(logprobs, ref_logprobs, "k1" | "k2" | "k3") -> per-token KL estimate

Imports nothing from turnwise but `turnwise.types`.
"""

from turnwise.algo.advantages import (
    ADVANTAGES,
    AdvantageFn,
    compute_advantages,
    get_advantage,
    register_advantage,
)
from turnwise.algo.kl import KL_ESTIMATORS, kl_penalty, register_kl_estimator
from turnwise.algo.losses import (
    LOSSES,
    LossFn,
    LossInputs,
    aggregate,
    compute_loss,
    entropy_from_logits,
    get_loss,
    register_loss,
)
from turnwise.algo.registry import Registry, UnknownNameError

__all__ = [
    "ADVANTAGES",
    "KL_ESTIMATORS",
    "LOSSES",
    "AdvantageFn",
    "LossFn",
    "LossInputs",
    "Registry",
    "UnknownNameError",
    "aggregate",
    "compute_advantages",
    "compute_loss",
    "entropy_from_logits",
    "get_advantage",
    "get_loss",
    "kl_penalty",
    "register_advantage",
    "register_kl_estimator",
    "register_loss",
]
