"""Every metric turnwise logs: its name, how it reduces across micro-batches, what it means.

Names follow the managed service where it has one (`rollout/reward/mean`, `training/total_tokens`,
`usage/prefill_tokens`, ...). `<x>` stands for a variable part (a stop reason, a k, a custom
metric an agent reports). Reductions apply where one step's value is computed from several
micro-batches (the loss metrics): `mean` is weighted by each micro-batch's share of the loss
(tokens or sequences), `max` / `min` take the extreme. Everything else is computed once per step
over the whole batch, and its reduction says how.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

METRICS: tuple[tuple[str, str, str], ...] = (
    # name, reduction, meaning
    ("rollout/reward/mean", "mean", "reward per rollout, failed rollouts counted as 0"),
    ("rollout/reward/valid_mean", "mean", "reward per usable (rewarded) rollout"),
    ("rollout/reward/zero_frac", "mean", "usable rollouts with reward exactly 0"),
    ("rollout/pass_rate", "mean", "rollouts with reward >= success_threshold"),
    ("rollout/turns/mean", "mean", "model calls per usable rollout"),
    ("rollout/tokens/response_max", "max", "longest sampled turn, tokens"),
    ("rollout/tokens/response_mean", "mean", "sampled tokens per turn"),
    ("rollout/tool_calls/mean", "mean", "tool calls per rollout"),
    ("rollout/tool_errors/frac", "mean", "tool calls whose result was an error"),
    ("rollout/tool_parse_errors", "sum", "completions that looked like a tool call but did not parse"),
    ("rollout/prompt_plan/<reason>", "sum", "turns whose prompt was planned for this reason (extends, rewritten, ...)"),
    ("rollout/segments_per_trajectory", "mean", "training sequences per trajectory (1 unless history was rewritten)"),
    ("rollout/failed", "sum", "rollouts that failed (any kind)"),
    ("rollout/failed_frac", "mean", "failed rollouts / all rollouts"),
    ("rollout/failed/<kind>", "sum", "failed rollouts of one FailureKind"),
    ("rollout/timeouts", "sum", "rollouts that failed by timeout (agent or queue)"),
    ("rollout/retries", "sum", "dispatch attempts retried"),
    ("rollout/abandoned", "sum", "trajectories of a step cut short by a crash, abandoned on resume"),
    ("rollout/stop/<reason>", "mean", "fraction of rollouts that ended for this StopReason / finish reason"),
    ("rollout/<name>/mean", "mean", "a number the agent reported, averaged over rollouts"),
    ("groups/kept", "sum", "groups that trained"),
    ("groups/incomplete", "sum", "groups with a failed member"),
    ("groups/dropped_incomplete", "sum", "incomplete groups left out (incomplete_groups: drop)"),
    ("groups/dropped_empty", "sum", "groups with no usable member"),
    ("analysis/advantage_<stat>", "mean", "advantage statistics over tokens (mean, std, min, max, nonzero_frac)"),
    ("analysis/num_groups", "sum", "groups given to the advantage estimator"),
    ("analysis/singleton_groups", "sum", "groups with one usable member"),
    ("analysis/zero_adv_groups", "sum", "groups whose advantages are all zero (no learning signal)"),
    ("loss/value", "mean", "the loss that was back-propagated"),
    ("loss/policy", "mean", "the policy-gradient term"),
    ("loss/nll", "mean", "negative log-likelihood of the sampled tokens"),
    ("loss/entropy", "mean", "policy entropy per token"),
    ("loss/approx_kl", "mean", "KL(sampler || trainer) estimate per token"),
    ("loss/kl_ref", "mean", "KL to the reference policy (kl_coef > 0)"),
    ("loss/clip_frac", "mean", "tokens whose ratio was clipped"),
    ("loss/clip_frac_<side>", "mean", "clipped tokens below / above / by the dual clip"),
    ("loss/ratio_mean", "mean", "importance ratio per token"),
    ("loss/ratio_max", "max", "largest importance ratio"),
    ("loss/tis_weight_mean", "mean", "truncated importance weight (tis_cap)"),
    ("loss/tis_capped_frac", "mean", "tokens whose importance weight hit tis_cap"),
    ("loss/grad_norm", "last", "global gradient norm before clipping"),
    ("loss/<name>", "mean", "a metric of a user-registered loss"),
    ("mismatch/logprob_abs_diff", "mean", "|trainer - sampler| logprob per sampled token"),
    ("mismatch/logprob_abs_diff/max", "max", "largest |trainer - sampler| logprob"),
    ("training/learning_rate", "last", "learning rate of the last optimizer step"),
    ("training/policy_version", "last", "version of the weights after the step"),
    ("weights/bytes_sent", "last", "bytes sent to the sampler by the step's weight sync (LoRA: the adapters only)"),
    ("training/total_tokens", "sum", "tokens trained this step (all substeps)"),
    ("training/num_trajectories", "sum", "trajectories that trained"),
    ("training/epoch", "last", "epoch of the step's tasks"),
    ("usage/prefill_tokens", "sum", "prompt tokens the sampler computed (reused prefix excluded)"),
    ("usage/sample_tokens", "sum", "tokens sampled"),
    ("async/staleness/mean", "mean", "policy versions between a group's oldest token and the trained weights"),
    ("async/staleness/max", "max", "stalest group that trained"),
    ("async/dropped_stale", "sum", "groups dropped as staler than max_steps_off_policy"),
    ("async/in_flight", "last", "rollouts running when the step began training"),
    ("time/step", "last", "seconds per step"),
    ("time/sample", "last", "seconds sampling and scoring"),
    ("time/train", "last", "seconds in advantages, datums, optimizer steps and weight sync"),
    ("time/rollout/mean", "mean", "seconds per rollout"),
    ("time/rollout/max", "max", "slowest rollout"),
    ("throughput/tokens_per_s", "last", "(sampled + trained tokens) / step time"),
    ("val/reward/mean", "mean", "validation reward at temperature 0"),
    ("val/reward/pass_at_<k>", "mean", "validation pass@k"),
    ("warm_start/<name>", "mean", "a loss metric of the supervised warm start"),
)
"""(name, reduction, meaning) of every metric."""

_PATTERNS = [(re.compile("^" + re.sub(r"<[a-z]+>", "[^/]+", re.escape(name).replace(r"\<", "<").replace(r"\>", ">"))
                         + "$"), reduction) for name, reduction, _ in METRICS]


def reduction(name: str) -> str | None:
    """How `name` reduces (first table entry that matches), or None when it is not in the table."""
    return next((r for pattern, r in _PATTERNS if pattern.match(name)), None)


def reduce_micro_batches(parts: Iterable[tuple[Mapping[str, float], float]]) -> dict[str, float]:
    """One value per metric from `(metrics, weight)` per micro-batch (weights sum to 1)."""
    out: dict[str, float] = {}
    for metrics, weight in parts:
        for k, v in metrics.items():
            how = reduction(k) or "mean"
            if how == "max":
                out[k] = max(out.get(k, float("-inf")), v)
            elif how == "min":
                out[k] = min(out.get(k, float("inf")), v)
            elif how == "last":
                out[k] = v
            else:
                out[k] = out.get(k, 0.0) + v * weight
    return out
