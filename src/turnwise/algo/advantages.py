"""Advantage estimators: the rewards of a batch of rollouts → one advantage per sampled token.

Each method is a pure function registered by name (`advantage_method` in the config):

    fn(rollouts: Sequence[ScoredRollout], opts: AdvantageOptions) -> list[np.ndarray]

one float64 array per rollout, of length `sum(completion_lengths)` (its turns' sampled tokens
concatenated in order). `compute_advantages` validates the inputs, calls the method, checks
what it returns, and adds metrics. Register your own with `@register_advantage("name")`.

Conventions shared by every method (i indexes rollouts, g a group, k turns):
- Rewards. `rewards=(R,)` is one outcome reward; `(r_0, ..., r_{K-1})` one reward per turn.
  Methods that need a scalar use R = Σ_k r_k (`Trajectory.reward`); per-turn methods treat a
  single value as the last turn's reward.
- Groups. Rollouts with the same `group_id` are compared with each other. The group std is
  the sample std (Bessel-corrected, as `torch.std` in verl and TRL).
- Failed rollouts are not passed in: the caller drops them first, so they take no part in any
  baseline or batch statistic.
- A group of one has nothing to compare with: every group-baselined method gives it zero
  advantage. (verl uses a baseline of 0 there, which turns the raw reward into the advantage.)
- A group whose rewards are all equal gets exactly 0 (no floating-point residue) from every
  group-baselined method; the batch-whitened methods (`reinforce_pp*`) then shift it by the
  batch mean like every other token. `train/zero_adv_groups` counts groups whose tokens all
  got advantage 0.
- A NaN or infinite reward raises ValueError naming the trajectory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from turnwise.algo.registry import Registry
from turnwise.types import AdvantageOptions, ScoredRollout

AdvantageFn = Callable[[Sequence[ScoredRollout], AdvantageOptions], Sequence[Sequence[float] | np.ndarray]]

ADVANTAGES: Registry[AdvantageFn] = Registry("advantage_method")


def register_advantage(name: str, *, replace: bool = False) -> Callable[[AdvantageFn], AdvantageFn]:
    """Decorator: make `fn` selectable as `advantage_method: name`."""
    return ADVANTAGES.register(name, replace=replace)


def get_advantage(name: str) -> AdvantageFn:
    """The method registered as `name`; an unknown name fails with the list of valid ones."""
    return ADVANTAGES.get(name)


def compute_advantages(
    name: str, rollouts: Sequence[ScoredRollout], opts: AdvantageOptions
) -> tuple[list[tuple[float, ...]], dict[str, float]]:
    """Per-token advantages of each rollout (turns concatenated) and `train/*` metrics."""
    fn = get_advantage(name)
    _check_options(opts)
    for r in rollouts:
        _check_rollout(r)
    raw = fn(rollouts, opts)
    if len(raw) != len(rollouts):
        raise RuntimeError(f"advantage method {name!r} returned {len(raw)} rows for {len(rollouts)} rollouts")
    out_N: list[np.ndarray] = []
    for r, adv in zip(rollouts, raw, strict=True):
        adv_T = np.asarray(adv, dtype=np.float64).reshape(-1)
        if adv_T.size != sum(r.completion_lengths):
            raise RuntimeError(f"advantage method {name!r} returned {adv_T.size} advantages for trajectory "
                               f"{r.trajectory_id!r}, which has {sum(r.completion_lengths)} sampled tokens")
        if not np.isfinite(adv_T).all():
            raise RuntimeError(f"advantage method {name!r} returned a non-finite advantage for trajectory "
                               f"{r.trajectory_id!r}")
        out_N.append(adv_T)
    return [tuple(a.tolist()) for a in out_N], _metrics(rollouts, out_N)


# ---------------------------------------------------------------------------------------------
# methods


@register_advantage("group_based")
def group_based(rollouts: Sequence[ScoredRollout], opts: AdvantageOptions) -> list[np.ndarray]:
    """GRPO, outcome supervision: every token of rollout i gets

        A_i = (R_i − mean_g R) / (std_g R + eps)

    Shao et al. 2024, "DeepSeekMath", arXiv:2402.03300, §4.1.2. With `normalize_std: false`,
    A_i = R_i − mean_g R: Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training",
    arXiv:2503.20783), which removes the std's question-difficulty bias.
    """
    R_N = [_scalar(r) for r in rollouts]
    A_N = [0.0] * len(rollouts)
    for idx in _groups(rollouts).values():
        for i, a in zip(idx, _relative([R_N[i] for i in idx], opts), strict=True):
            A_N[i] = a
    return _broadcast(A_N, rollouts)


@register_advantage("group_based_per_turn")
def group_based_per_turn(rollouts: Sequence[ScoredRollout], opts: AdvantageOptions) -> list[np.ndarray]:
    """GRPO applied turn by turn, on per-turn rewards. Our definition (no published formula):

        G_{i,k} = Σ_{j≥k} γ^{j−k} r_{i,j}                       reward-to-go of turn k
        A_{i,k} = (G_{i,k} − mean_{g,k} G) / (std_{g,k} G + eps)   every token of turn k

    where mean_{g,k} and std_{g,k} run over the rollouts of group g that reached turn k (have
    more than k turns). `normalize_std: false` drops the division, as in Dr. GRPO. A turn index
    that only one rollout of its group reached gets 0, like a group of one. With one turn per
    rollout this is exactly `group_based`. γ discounts per turn, not per token.
    """
    G_N = [_turn_returns(_turn_rewards(r), opts.gamma) for r in rollouts]
    A_N = [[0.0] * len(g) for g in G_N]
    for idx in _groups(rollouts).values():
        for k in range(max(len(G_N[i]) for i in idx)):
            reached = [i for i in idx if len(G_N[i]) > k]
            for i, a in zip(reached, _relative([G_N[i][k] for i in reached], opts), strict=True):
                A_N[i][k] = a
    return [_per_turn(A, r) for A, r in zip(A_N, rollouts, strict=True)]


@register_advantage("monte_carlo")
def monte_carlo(rollouts: Sequence[ScoredRollout], opts: AdvantageOptions) -> list[np.ndarray]:
    """Plain REINFORCE with per-turn credit (Williams 1992), no baseline: every token of turn k gets

        A_{i,k} = G_{i,k} = Σ_{j≥k} γ^{j−k} r_{i,j}

    γ discounts per turn. With a single outcome reward R and γ = 1 every token gets R.
    """
    return [_per_turn(_turn_returns(_turn_rewards(r), opts.gamma), r) for r in rollouts]


@register_advantage("rloo")
def rloo(rollouts: Sequence[ScoredRollout], opts: AdvantageOptions) -> list[np.ndarray]:
    """REINFORCE leave-one-out: the baseline of rollout i is the mean of the other G − 1 rollouts,

        A_i = R_i − (Σ_{j≠i} R_j) / (G − 1) = G/(G − 1) · (R_i − mean_g R)

    Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!"; Ahmadian et al. 2024,
    "Back to Basics", arXiv:2402.14740.
    """
    R_N = [_scalar(r) for r in rollouts]
    A_N = [0.0] * len(rollouts)
    for idx in _groups(rollouts).values():
        R_G = [R_N[i] for i in idx]
        if _degenerate(R_G):
            continue
        total, n = math.fsum(R_G), len(R_G)
        for i in idx:
            A_N[i] = R_N[i] - (total - R_N[i]) / (n - 1)
    return _broadcast(A_N, rollouts)


@register_advantage("reinforce_pp")
def reinforce_pp(rollouts: Sequence[ScoredRollout], opts: AdvantageOptions) -> list[np.ndarray]:
    """REINFORCE++: discounted token-level returns, whitened over every token of the batch.

        G_t = Σ_{t'≥t} γ^{t'−t} ρ_{t'},   A_t = (G_t − mean_batch G) / (std_batch G + eps)

    Hu et al. 2025, arXiv:2501.03262. ρ_t is a turn's reward on that turn's last sampled token
    (an outcome reward on the last token of the last turn), 0 elsewhere; tokens are the
    rollout's sampled tokens in order, so tool results between turns are skipped, not
    discounted (as verl does). Departure: the paper folds a per-token KL penalty into ρ; here
    the KL penalty is a separate loss term (`kl_coef`). The batch std is Bessel-corrected.
    """
    G_N = [_token_returns(_turn_rewards(r), r.completion_lengths, opts.gamma) for r in rollouts]
    return _whiten(G_N, opts.eps)


@register_advantage("reinforce_pp_baseline")
def reinforce_pp_baseline(rollouts: Sequence[ScoredRollout], opts: AdvantageOptions) -> list[np.ndarray]:
    """REINFORCE++ with a group baseline: subtract the group mean, then whiten over the batch.

        A_i = R_i − mean_g R  (every token),   A_t ← (A_t − mean_batch A) / (std_batch A + eps)

    Hu et al. 2025, arXiv:2501.03262 ("REINFORCE++-baseline"). Batch statistics run over tokens,
    so long rollouts weigh more (as in verl). Whitening moves an all-equal group off zero.
    """
    R_N = [_scalar(r) for r in rollouts]
    A_N = [0.0] * len(rollouts)
    for idx in _groups(rollouts).values():
        for i, a in zip(idx, _relative([R_N[i] for i in idx], opts, normalize=False), strict=True):
            A_N[i] = a
    return _whiten(_broadcast(A_N, rollouts), opts.eps)


@register_advantage("opo")
def opo(rollouts: Sequence[ScoredRollout], opts: AdvantageOptions) -> list[np.ndarray]:
    """On-Policy RL with Optimal reward baseline: a length-weighted group baseline,

        b_g = Σ_j L_j R_j / Σ_j L_j,   A_i = R_i − b_g

    where L_j is rollout j's number of sampled tokens (all turns). Hao et al. 2025,
    arXiv:2505.23585.
    """
    R_N = [_scalar(r) for r in rollouts]
    L_N = [sum(r.completion_lengths) for r in rollouts]
    A_N = [0.0] * len(rollouts)
    for idx in _groups(rollouts).values():
        total_len = sum(L_N[i] for i in idx)
        if _degenerate([R_N[i] for i in idx]) or total_len == 0:
            continue
        baseline = math.fsum(L_N[i] * R_N[i] for i in idx) / total_len
        for i in idx:
            A_N[i] = R_N[i] - baseline
    return _broadcast(A_N, rollouts)


@register_advantage("grpo_passk")
def grpo_passk(rollouts: Sequence[ScoredRollout], opts: AdvantageOptions) -> list[np.ndarray]:
    """Pass@k training: only the best rollout of each group gets an advantage,

        A_best = R_max − R_second_max,   A_i = 0 for every other rollout

    (the leave-one-out gradient of the group maximum). Tang et al. 2025, "Optimizing Language
    Models for Inference Time Objectives using Reinforcement Learning", arXiv:2503.19595. Ties
    for the best give 0. `normalize_std` is ignored: the published estimator is unnormalized
    (verl's `grpo_passk` divides by the group std when its norm flag is on).
    """
    R_N = [_scalar(r) for r in rollouts]
    A_N = [0.0] * len(rollouts)
    for idx in _groups(rollouts).values():
        if len(idx) < 2:
            continue
        ranked = sorted(idx, key=lambda i: R_N[i], reverse=True)  # stable: first of equals wins
        A_N[ranked[0]] = R_N[ranked[0]] - R_N[ranked[1]]
    return _broadcast(A_N, rollouts)


@register_advantage("gpg")
def gpg(rollouts: Sequence[ScoredRollout], opts: AdvantageOptions) -> list[np.ndarray]:
    """Group Policy Gradient: the Dr. GRPO advantage rescaled for the batch's share of signal,

        A_i = α (R_i − mean_g R),   α = B / M

    B = rollouts in the batch (this call), M = rollouts with R ≠ 0 (α = B when M = 0). Chu et
    al. 2025, "GPG", arXiv:2504.02546. Departure: the paper's accurate-gradient-estimation
    factor is B / (B − M') with M' the rollouts that carry no signal (all-equal groups); α here
    counts non-zero rewards instead, as verl's `gpg` does.
    """
    R_N = [_scalar(r) for r in rollouts]
    alpha = len(R_N) / max(sum(1 for R in R_N if R != 0.0), 1)
    A_N = [0.0] * len(rollouts)
    for idx in _groups(rollouts).values():
        for i, a in zip(idx, _relative([R_N[i] for i in idx], opts, normalize=False), strict=True):
            A_N[i] = alpha * a
    return _broadcast(A_N, rollouts)


# ---------------------------------------------------------------------------------------------
# shared pieces


def _check_options(opts: AdvantageOptions) -> None:
    if not (0.0 <= opts.gamma <= 1.0):
        raise ValueError(f"gamma must be in [0, 1], got {opts.gamma}")
    if not (opts.eps >= 0.0 and math.isfinite(opts.eps)):
        raise ValueError(f"eps must be a finite number >= 0, got {opts.eps}")


def _check_rollout(r: ScoredRollout) -> None:
    tid = r.trajectory_id
    if not r.rewards:
        raise ValueError(f"trajectory {tid!r} has no reward (failed rollouts must be left out)")
    for v in r.rewards:
        if not math.isfinite(v):
            raise ValueError(f"trajectory {tid!r} has a non-finite reward {v!r}; NaN and inf are rejected")
    if any(n < 0 for n in r.completion_lengths):
        raise ValueError(f"trajectory {tid!r} has a negative completion length: {r.completion_lengths}")
    turns = len(r.completion_lengths)
    if len(r.rewards) > 1 and len(r.rewards) != turns:
        raise ValueError(f"trajectory {tid!r} has {len(r.rewards)} rewards for {turns} turns; "
                         "give one reward, or one per turn")


def _scalar(r: ScoredRollout) -> float:
    return math.fsum(r.rewards)


def _turn_rewards(r: ScoredRollout) -> list[float]:
    """One reward per turn; a single reward belongs to the last turn."""
    turns = len(r.completion_lengths)
    if len(r.rewards) == turns:
        return [float(v) for v in r.rewards]
    return [0.0] * (turns - 1) + [float(r.rewards[0])] if turns else []


def _turn_returns(rewards_K: Sequence[float], gamma: float) -> list[float]:
    out, running = [0.0] * len(rewards_K), 0.0
    for k in reversed(range(len(rewards_K))):
        running = rewards_K[k] + gamma * running
        out[k] = running
    return out


def _token_returns(rewards_K: Sequence[float], lengths_K: Sequence[int], gamma: float) -> np.ndarray:
    """G_t over the concatenated sampled tokens; each turn's reward sits on its last token."""
    parts, running = [], 0.0
    for reward, n in zip(reversed(rewards_K), reversed(lengths_K), strict=True):
        # within a turn of n tokens, G_j = γ^(n-1-j) (reward + γ · G_after)
        head = reward + gamma * running if n else reward + running
        G_n = head * gamma ** np.arange(n - 1, -1, -1, dtype=np.float64)
        parts.append(G_n)
        running = float(G_n[0]) if n else head
    return np.concatenate(parts[::-1]) if parts else np.zeros(0)


def _groups(rollouts: Sequence[ScoredRollout]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rollouts):
        groups.setdefault(r.group_id, []).append(i)
    return groups


def _degenerate(values: Sequence[float]) -> bool:
    """Nothing to compare: a group of one, or all values equal."""
    return len(values) < 2 or min(values) == max(values)


def _relative(values: Sequence[float], opts: AdvantageOptions, *, normalize: bool | None = None) -> list[float]:
    """(v − mean) / (std + eps), or v − mean; exactly 0 for a degenerate group."""
    if _degenerate(values):
        return [0.0] * len(values)
    n = len(values)
    mean = math.fsum(values) / n
    centered = [v - mean for v in values]
    if not (opts.normalize_std if normalize is None else normalize):
        return centered
    std = math.sqrt(math.fsum(c * c for c in centered) / (n - 1))
    return [c / (std + opts.eps) for c in centered]


def _broadcast(A_N: Sequence[float], rollouts: Sequence[ScoredRollout]) -> list[np.ndarray]:
    return [np.full(sum(r.completion_lengths), a, dtype=np.float64) for a, r in zip(A_N, rollouts, strict=True)]


def _per_turn(A_K: Sequence[float], r: ScoredRollout) -> np.ndarray:
    return np.repeat(np.asarray(A_K, dtype=np.float64), r.completion_lengths)


def _whiten(values_N: Sequence[np.ndarray], eps: float) -> list[np.ndarray]:
    """(x − mean) / (std + eps) over every token of the batch; all-equal tokens become 0."""
    flat = np.concatenate(values_N) if values_N else np.zeros(0)
    if flat.size < 2 or flat.min() == flat.max():
        return [np.zeros_like(v) for v in values_N]
    mean, std = flat.mean(), flat.std(ddof=1)
    return [(v - mean) / (std + eps) for v in values_N]


def _metrics(rollouts: Sequence[ScoredRollout], adv_N: Sequence[np.ndarray]) -> dict[str, float]:
    groups = _groups(rollouts)
    zero = sum(1 for idx in groups.values() if all(not adv_N[i].any() for i in idx))
    flat = np.concatenate(adv_N) if adv_N else np.zeros(0)
    stats = (flat.mean(), flat.std(), flat.min(), flat.max(), np.count_nonzero(flat) / flat.size) \
        if flat.size else (0.0, 0.0, 0.0, 0.0, 0.0)
    return {
        "train/zero_adv_groups": float(zero),
        "train/num_groups": float(len(groups)),
        "train/singleton_groups": float(sum(1 for idx in groups.values() if len(idx) == 1)),
        "train/advantage_mean": float(stats[0]),
        "train/advantage_std": float(stats[1]),
        "train/advantage_min": float(stats[2]),
        "train/advantage_max": float(stats[3]),
        "train/advantage_nonzero_frac": float(stats[4]),
    }
