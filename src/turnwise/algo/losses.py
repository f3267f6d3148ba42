"""Policy losses: a per-token surrogate, weighted, aggregated, plus an optional KL penalty.

For a padded batch (B sequences × T tokens; `mask_B_T` is 1 on sampled tokens), with A the
advantage and the importance ratio

    r_t = exp(logp_θ(t) − logp_anchor(t)),   anchor = the sampler's logprobs,
                                             or the trainer's recomputed old logprobs when given,

the registered losses (`loss_fn` in the config) are, per token:

    importance_sampling   −r·A                                   (REINFORCE with off-policy correction)
    ppo                   −min(r·A, clip(r, lo, hi)·A)           Schulman et al. 2017, arXiv:1707.06347
    cispo                 −sg(clip(r, lo, hi))·A·logp_θ           MiniMax 2025, arXiv:2506.13585
    cross_entropy         −logp_θ                                 supervised steps (no ratio, A unused)

`lo`, `hi` are `clip_low_threshold`, `clip_high_threshold`: bounds on r itself (0.8, 1.2),
not ε offsets. Options shared by every ratio-based loss (`LossOptions`):
- `clip_ratio_c` (ppo only): dual clip (Ye et al. 2020, arXiv:1912.09729); for A < 0 the
  per-token loss is also capped at −c·A, so a huge ratio cannot blow up a negative advantage.
- `ratio_level: sequence`: GSPO (Zheng et al. 2025, arXiv:2507.18071) in its GSPO-token form,
  r_t = sg(s_i) · π_θ(t)/sg(π_θ(t)) with s_i = exp(mean_t log(π_θ(t)/π_anchor(t))). Its value
  is the sequence ratio s_i at every token and, for an advantage constant over the sequence,
  its gradient is GSPO's; per-token advantages (multi-turn) stay per token. GSPO itself uses
  `loss_agg_mode: seq-mean-token-mean` and very narrow clip bounds.
- `tis_cap`: truncated importance sampling for sampler/trainer mismatch (Yao et al. 2025,
  "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training"): with the trainer's
  old logprobs as the anchor, each token's loss is multiplied by sg(min(exp(logp_old −
  logp_sampler), tis_cap)). Needs `old_logprobs_B_T`.
- `loss_agg_mode`, see `aggregate`; `kl_coef`, `kl_estimator`, see `turnwise.algo.kl`.

A registered loss maps `LossInputs` to a per-token loss `loss_B_T` and its own metrics;
`compute_loss` does the ratio, weights, aggregation, KL and the common metrics, so a new loss
is a few lines. Departure shared with verl: log-ratios are clamped to ±20 before `exp`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from turnwise.algo.kl import KL_ESTIMATORS, kl_penalty
from turnwise.algo.registry import Registry
from turnwise.types import LossOptions

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
_LOG_RATIO_BOUND = 20.0


@dataclass(frozen=True)
class LossInputs:
    """What a registered loss sees: one padded batch, B sequences × T tokens."""

    logprobs_B_T: Tensor
    """log π_θ of each token; carries the gradient (0 where the mask is 0)."""
    ratio_B_T: Tensor | None
    """r = π_θ / π_anchor per token (or GSPO-token); carries the gradient; 1 where the mask is 0.
    None for losses registered with `uses_ratio=False`."""
    advantages_B_T: Tensor
    """A per token (0 where the mask is 0); no gradient."""
    mask_B_T: Tensor
    """True on the tokens that count."""


LossFn = Callable[[LossInputs, LossOptions], tuple[Tensor, dict[str, float]]]


@dataclass(frozen=True)
class _LossSpec:
    fn: LossFn
    uses_ratio: bool


LOSSES: Registry[_LossSpec] = Registry("loss_fn")


def register_loss(name: str, *, uses_ratio: bool = True, replace: bool = False) -> Callable[[LossFn], LossFn]:
    """Decorator: make `fn(inputs, opts) -> (loss_B_T, metrics)` selectable as `loss_fn: name`.

    `uses_ratio=False` marks a loss that needs no sampler logprobs (supervised).
    """

    def decorate(fn: LossFn) -> LossFn:
        LOSSES.register(name, replace=replace)(_LossSpec(fn, uses_ratio))
        return fn

    return decorate


def get_loss(name: str) -> LossFn:
    """The per-token loss registered as `name`; an unknown name fails with the list of valid ones."""
    return LOSSES.get(name).fn


def compute_loss(
    name: str,
    logprobs_B_T: Tensor,
    sampler_logprobs_B_T: Tensor | None,
    advantages_B_T: Tensor,
    mask_B_T: Tensor,
    opts: LossOptions,
    *,
    old_logprobs_B_T: Tensor | None = None,
    entropy_B_T: Tensor | None = None,
    ref_logprobs_B_T: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The scalar loss to minimize and `loss/*` metrics over the masked tokens.

    Metrics: clip_frac_low, clip_frac_high, clip_frac (their sum), ratio_mean, ratio_max (of
    the ratio the loss used), approx_kl (k3 estimate of KL(sampler || θ), from the per-token
    ratio to the sampler), policy (the policy term), and when present entropy, kl_ref,
    tis_weight_mean, tis_capped_frac, clip_frac_dual. Only `logprobs_B_T` needs a gradient.
    """
    spec = LOSSES.get(name)
    _check_options(opts)
    shape = tuple(logprobs_B_T.shape)
    if logprobs_B_T.dim() != 2:
        raise ValueError(f"logprobs_B_T must be 2-D (batch, tokens), got shape {shape}")
    named = {"advantages_B_T": advantages_B_T, "mask_B_T": mask_B_T, "sampler_logprobs_B_T": sampler_logprobs_B_T,
             "old_logprobs_B_T": old_logprobs_B_T, "entropy_B_T": entropy_B_T, "ref_logprobs_B_T": ref_logprobs_B_T}
    for key, t in named.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{key} has shape {tuple(t.shape)}, expected {shape} like logprobs_B_T")

    mask = mask_B_T.bool()
    dtype = torch.promote_types(logprobs_B_T.dtype, torch.float32)  # no exp() of bf16 log-ratios
    # Masked positions may hold anything (prompt logprobs, padding, NaN): zero them first so
    # they cannot reach the loss or its gradient.
    logp = torch.where(mask, logprobs_B_T.to(dtype), 0.0)

    def fixed(t: Tensor) -> Tensor:
        return torch.where(mask, t.detach().to(dtype), 0.0)

    adv = fixed(advantages_B_T)
    metrics: dict[str, float] = {}
    ratio = weight = None
    if spec.uses_ratio:
        if sampler_logprobs_B_T is None:
            raise ValueError(f"loss {name!r} needs sampler_logprobs_B_T")
        sampler = fixed(sampler_logprobs_B_T)
        anchor = fixed(old_logprobs_B_T) if old_logprobs_B_T is not None else sampler
        ratio = _ratio(logp, anchor, mask, opts.ratio_level)
        if opts.tis_cap is not None:
            if old_logprobs_B_T is None:
                raise ValueError("tis_cap needs old_logprobs_B_T (the trainer's logprobs of the sampled "
                                 "tokens before this update) to measure sampler/trainer mismatch")
            raw = torch.exp((anchor - sampler).clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND))
            weight = raw.clamp(max=opts.tis_cap)
            metrics["loss/tis_weight_mean"] = _mean(weight, mask)
            metrics["loss/tis_capped_frac"] = _mean(raw > opts.tis_cap, mask)
        with torch.no_grad():
            log_rho = (logp - sampler).clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
            metrics["loss/approx_kl"] = _mean(torch.expm1(log_rho) - log_rho, mask)
            metrics["loss/ratio_mean"] = _mean(ratio, mask)
            metrics["loss/ratio_max"] = float(ratio[mask].max()) if mask.any() else 0.0

    loss_B_T, fn_metrics = spec.fn(LossInputs(logp, ratio, adv, mask), opts)
    if tuple(loss_B_T.shape) != shape:
        raise RuntimeError(f"loss {name!r} returned shape {tuple(loss_B_T.shape)}, expected {shape}")
    if weight is not None:
        loss_B_T = loss_B_T * weight
    loss = aggregate(loss_B_T, mask, opts.loss_agg_mode, opts.loss_agg_norm)
    if opts.kl_coef > 0:  # else the policy term is the whole loss (`loss/value`)
        metrics["loss/policy"] = float(loss.detach())
        if ref_logprobs_B_T is None:
            raise ValueError("kl_coef > 0 needs ref_logprobs_B_T (the reference policy's logprobs)")
        kl = aggregate(kl_penalty(logp, fixed(ref_logprobs_B_T), opts.kl_estimator), mask,
                       opts.loss_agg_mode, opts.loss_agg_norm)
        loss = loss + opts.kl_coef * kl
        metrics["loss/kl_ref"] = float(kl.detach())

    metrics.update(fn_metrics)
    if spec.uses_ratio:
        metrics.setdefault("loss/clip_frac_low", 0.0)
        metrics.setdefault("loss/clip_frac_high", 0.0)
        metrics["loss/clip_frac"] = metrics["loss/clip_frac_low"] + metrics["loss/clip_frac_high"]
    if entropy_B_T is not None:
        metrics["loss/entropy"] = _mean(fixed(entropy_B_T), mask)
    return loss, metrics


def aggregate(loss_B_T: Tensor, mask_B_T: Tensor, mode: str, norm: float | None = None) -> Tensor:
    """Reduce a per-token loss to a scalar over the masked tokens (names as in verl).

    token-mean               Σ_{b,t} l / Σ_{b,t} m                  every token weighs the same (DAPO)
    seq-mean-token-mean      mean_b (Σ_t l / Σ_t m)                 every sequence weighs the same (GRPO paper)
    seq-mean-token-sum       mean_b Σ_t l                           long sequences weigh more
    seq-mean-token-sum-norm  mean_b Σ_t l / norm                    Dr. GRPO: a fixed normalizer

    Sequences without any masked token are left out of mean_b. `norm` None means T, the padded
    length of this batch (verl's default); set `loss_agg_norm` to the generation budget for a
    normalizer that really is fixed. No token at all gives 0 (still differentiable).
    """
    mask = mask_B_T.bool()
    masked = torch.where(mask, loss_B_T, 0.0)
    if mode == "token-mean":
        return masked.sum() / mask.sum().clamp(min=1)
    tokens_B = mask.sum(dim=-1)
    seqs = (tokens_B > 0).sum().clamp(min=1)
    if mode == "seq-mean-token-mean":
        return (masked.sum(dim=-1) / tokens_B.clamp(min=1)).sum() / seqs
    if mode == "seq-mean-token-sum":
        return masked.sum() / seqs
    if mode == "seq-mean-token-sum-norm":
        return masked.sum() / seqs / (norm if norm is not None else loss_B_T.shape[-1])
    raise ValueError(f"unknown loss_agg_mode {mode!r}; valid: {', '.join(AGG_MODES)}")


def entropy_from_logits(logits_B_T_V: Tensor) -> Tensor:
    """Per-token entropy −Σ_v p log p of the policy's next-token distribution (float32 at least)."""
    wide = logits_B_T_V.dtype in (torch.float32, torch.float64)
    logp = torch.log_softmax(logits_B_T_V if wide else logits_B_T_V.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


# ---------------------------------------------------------------------------------------------
# the losses


@register_loss("importance_sampling")
def importance_sampling(inp: LossInputs, opts: LossOptions) -> tuple[Tensor, dict[str, float]]:
    """−r·A: the policy gradient with an (unclipped) importance weight; no clip is ever active."""
    return -inp.ratio_B_T * inp.advantages_B_T, {}


@register_loss("ppo")
def ppo(inp: LossInputs, opts: LossOptions) -> tuple[Tensor, dict[str, float]]:
    """−min(r·A, clip(r, lo, hi)·A), with the dual clip −max(that, c·A) for A < 0 when set.

    clip_frac_low counts tokens where the lower bound stops the gradient (r < lo, A < 0),
    clip_frac_high where the upper bound does (r > hi, A > 0), clip_frac_dual (r > c, A < 0).
    """
    r, a, m = inp.ratio_B_T, inp.advantages_B_T, inp.mask_B_T
    lo, hi = opts.clip_low_threshold, opts.clip_high_threshold
    unclipped = -r * a
    clipped = -r.clamp(lo, hi) * a
    loss = torch.where(clipped > unclipped, clipped, unclipped)
    metrics = {"loss/clip_frac_low": _mean((r < lo) & (a < 0), m),
               "loss/clip_frac_high": _mean((r > hi) & (a > 0), m)}
    if opts.clip_ratio_c is not None:
        cap = -opts.clip_ratio_c * a
        dual = (a < 0) & (loss > cap)
        loss = torch.where(dual, cap, loss)
        metrics["loss/clip_frac_dual"] = _mean(dual, m)
    return loss, metrics


@register_loss("cispo")
def cispo(inp: LossInputs, opts: LossOptions) -> tuple[Tensor, dict[str, float]]:
    """−sg(clip(r, lo, hi))·A·logp_θ: the weight is clipped, the gradient is never dropped.

    Its gradient is −clip(r)·A·∇logp_θ, which equals importance_sampling's −r·A·∇logp_θ
    wherever r is inside the bounds. clip_frac_low/high count r < lo and r > hi.
    """
    r, m = inp.ratio_B_T, inp.mask_B_T
    lo, hi = opts.clip_low_threshold, opts.clip_high_threshold
    weight = r.detach().clamp(lo, hi)
    metrics = {"loss/clip_frac_low": _mean(r < lo, m), "loss/clip_frac_high": _mean(r > hi, m)}
    return -weight * inp.advantages_B_T * inp.logprobs_B_T, metrics


@register_loss("cross_entropy", uses_ratio=False)
def cross_entropy(inp: LossInputs, opts: LossOptions) -> tuple[Tensor, dict[str, float]]:
    """−logp_θ on the masked tokens: supervised fine-tuning (advantages and sampler unused)."""
    return -inp.logprobs_B_T, {"loss/nll": _mean(-inp.logprobs_B_T, inp.mask_B_T)}


# ---------------------------------------------------------------------------------------------
# shared pieces


def _ratio(logp: Tensor, anchor: Tensor, mask: Tensor, level: str) -> Tensor:
    log_r = (logp - anchor).clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
    if level == "token":
        return torch.exp(log_r)
    # GSPO-token: value s_i on every token, gradient ∂/∂logp_t = s_i on token t
    log_s_B = log_r.detach().sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)
    return torch.where(mask, torch.exp(log_s_B[:, None] + logp - logp.detach()), 1.0)


def _mean(values: Tensor, mask: Tensor) -> float:
    n = int(mask.sum())
    return float(torch.where(mask, values.detach().to(torch.float64), 0.0).sum() / n) if n else 0.0


def _check_options(opts: LossOptions) -> None:
    lo, hi = opts.clip_low_threshold, opts.clip_high_threshold
    if not (0 < lo <= 1 <= hi):
        raise ValueError(f"clip thresholds are bounds on the ratio and need 0 < low <= 1 <= high; "
                         f"got clip_low_threshold={lo}, clip_high_threshold={hi}")
    if opts.clip_ratio_c is not None and not opts.clip_ratio_c > 1:
        raise ValueError(f"clip_ratio_c (dual clip) must be > 1, got {opts.clip_ratio_c}")
    if opts.ratio_level not in ("token", "sequence"):
        raise ValueError(f"unknown ratio_level {opts.ratio_level!r}; valid: token, sequence")
    if opts.loss_agg_mode not in AGG_MODES:
        raise ValueError(f"unknown loss_agg_mode {opts.loss_agg_mode!r}; valid: {', '.join(AGG_MODES)}")
    if opts.loss_agg_norm is not None and not opts.loss_agg_norm > 0:
        raise ValueError(f"loss_agg_norm must be > 0, got {opts.loss_agg_norm}")
    if opts.tis_cap is not None and not opts.tis_cap > 0:
        raise ValueError(f"tis_cap must be > 0, got {opts.tis_cap}")
    if not opts.kl_coef >= 0:
        raise ValueError(f"kl_coef must be >= 0, got {opts.kl_coef}")
    KL_ESTIMATORS.get(opts.kl_estimator)
