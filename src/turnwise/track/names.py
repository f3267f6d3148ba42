"""Every metric turnwise logs: its name, how it reduces across micro-batches, what it means.

Names are `section/name`, one slash, because MLflow groups charts by what precedes the last slash
and orders the groups alphabetically: `loss/` (a few charts), `reward/` (training and validation
reward, pass rates), `rollout/` (turns, tokens, tools, failures), `speed/` (seconds and tokens
per second), `train/` (trainer internals: advantages, groups, staleness, learning rate),
`warm_start/`. `<x>` stands for a variable part (a stop reason, a k, a custom metric an agent
reports). A metric is logged only when it can say something: `reward/valid_mean` when a rollout
failed, `loss/policy` and `loss/kl_ref` when `kl_coef` > 0, clip fractions for losses with a
ratio, TIS weights with `tis_cap`. Reductions apply where one step's value is computed from
several micro-batches (the loss metrics): `mean` is weighted by each micro-batch's share of the
loss (tokens or sequences), `max` / `min` take the extreme. Everything else is computed once per
step over the whole batch, and its reduction says how. The README's metric table is this one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

METRICS: tuple[tuple[str, str, str], ...] = (
    # name, reduction, meaning
    ("loss/value", "mean", "the loss that was back-propagated"),
    ("loss/entropy", "mean", "policy entropy per sampled token"),
    ("loss/clip_frac", "mean", "tokens whose ratio was clipped (losses with a ratio)"),
    ("loss/clip_frac_<side>", "mean", "clipped tokens below (low) / above (high) / by the dual clip (dual)"),
    ("loss/approx_kl", "mean", "KL(sampler || trainer) per token; ~0 on-policy, grows with staleness and substeps"),
    ("loss/ratio_mean", "mean", "importance ratio per token"),
    ("loss/ratio_max", "max", "largest importance ratio"),
    ("loss/grad_norm", "last", "global gradient norm before clipping"),
    ("loss/policy", "mean", "the policy-gradient term (kl_coef > 0; else it is loss/value)"),
    ("loss/kl_ref", "mean", "KL to the reference policy (kl_coef > 0)"),
    ("loss/tis_weight_mean", "mean", "truncated importance weight (tis_cap)"),
    ("loss/tis_capped_frac", "mean", "tokens whose importance weight hit tis_cap"),
    ("loss/nll", "mean", "negative log-likelihood of the target tokens (cross_entropy)"),
    ("loss/<name>", "mean", "a metric of a user-registered loss"),
    ("reward/mean", "mean", "training reward per rollout, failed rollouts counted as 0"),
    ("reward/pass_rate", "mean", "training rollouts with reward >= success_threshold"),
    ("reward/val", "mean", "validation reward at temperature 0 (step 0: after the warm start)"),
    ("reward/val_pass_at_<k>", "mean", "validation pass@k"),
    ("reward/valid_mean", "mean", "reward per usable (rewarded) rollout (when some failed)"),
    ("reward/zero_frac", "mean", "usable rollouts with reward exactly 0"),
    ("rollout/turns", "mean", "model calls per usable rollout"),
    ("rollout/tool_calls", "mean", "tool calls per rollout"),
    ("rollout/tool_error_frac", "mean", "tool calls whose result was an error"),
    ("rollout/tool_parse_errors", "sum", "completions that looked like a tool call but did not parse"),
    ("rollout/response_tokens", "mean", "sampled tokens per turn"),
    ("rollout/response_tokens_max", "max", "longest sampled turn, tokens"),
    ("rollout/sample_tokens", "sum", "tokens sampled"),
    ("rollout/prefill_tokens", "sum", "prompt tokens the sampler computed (reused prefix excluded)"),
    ("rollout/server_cache_hit_tokens", "sum", "prompt tokens a Tinker service billed as prefix-cache hits (when it reports any)"),
    ("rollout/failed", "sum", "rollouts that failed (any kind)"),
    ("rollout/failed_frac", "mean", "failed rollouts / all rollouts"),
    ("rollout/failed_<kind>", "sum", "failed rollouts of one FailureKind"),
    ("rollout/timeouts", "sum", "rollouts that failed by timeout (agent or queue)"),
    ("rollout/retries", "sum", "dispatch attempts retried"),
    ("rollout/abandoned", "sum", "trajectories of a step cut short by a crash, abandoned on resume"),
    ("rollout/stop_<reason>", "mean", "fraction of rollouts that ended for this StopReason / finish reason"),
    ("rollout/prompt_plan_<reason>", "sum", "turns whose prompt was planned for this reason (extends, rewritten, ...)"),
    ("rollout/segments_per_trajectory", "mean", "training sequences per trajectory (1 unless history was rewritten)"),
    ("rollout/<name>", "mean", "a number the agent reported, averaged over rollouts"),
    ("speed/step_s", "last", "seconds per step (logging excluded)"),
    ("speed/tokens_per_s", "last", "(sampled + trained tokens) / step time"),
    ("speed/sample_s", "last", "seconds sampling and scoring"),
    ("speed/train_s", "last", "seconds in advantages, datums, optimizer steps and weight sync"),
    ("speed/server_train_s", "last", "trainer.backend tinker: seconds waiting on the service's training calls since the last step"),
    ("speed/server_sample_s", "last", "sampler.backend tinker: seconds with a sampling request at the service since the last step"),
    ("speed/rollout_s", "mean", "seconds per rollout"),
    ("speed/rollout_s_max", "max", "slowest rollout"),
    ("speed/log_rollouts_s", "last", "seconds logging the step's rollout table and traces to MLflow"),
    ("train/learning_rate", "last", "learning rate of the last optimizer step"),
    ("train/policy_version", "last", "version of the weights after the step"),
    ("train/epoch", "last", "epoch of the step's tasks"),
    ("speed/weight_sync_s", "last", "seconds the step's weight sync took (write + reload on vLLM servers)"),
    ("sampler/retries", "sum", "sampling requests tried again on another vLLM replica after theirs failed"),
    ("weights/bytes_sent", "last", "bytes the step's weight sync sent to the sampler (LoRA: the adapters only)"),
    ("train/tokens", "sum", "tokens trained this step (all substeps)"),
    ("train/trajectories", "sum", "trajectories that trained"),
    ("train/logprob_mismatch", "mean", "|trainer - sampler| logprob per sampled token"),
    ("train/logprob_mismatch_max", "max", "largest |trainer - sampler| logprob"),
    ("train/advantage_<stat>", "mean", "advantage statistics over tokens (mean, std, min, max, nonzero_frac)"),
    ("train/num_groups", "sum", "groups given to the advantage estimator"),
    ("train/singleton_groups", "sum", "groups with one usable member"),
    ("train/zero_adv_groups", "sum", "groups whose advantages are all zero (no learning signal)"),
    ("train/groups_kept", "sum", "groups that trained"),
    ("train/groups_incomplete", "sum", "groups with a failed member"),
    ("train/groups_dropped_incomplete", "sum", "incomplete groups left out (incomplete_groups: drop)"),
    ("train/groups_dropped_empty", "sum", "groups with no usable member"),
    ("train/staleness", "mean", "policy versions between a group's oldest token and the trained weights"),
    ("train/staleness_max", "max", "stalest group that trained"),
    ("train/dropped_stale", "sum", "groups dropped as staler than max_steps_off_policy"),
    ("train/in_flight", "last", "rollouts running when the step began training"),
    ("warm_start/loss", "mean", "cross-entropy of the supervised warm start, per warm-start step"),
    ("warm_start/grad_norm", "last", "its gradient norm before clipping"),
    ("warm_start/tokens", "sum", "tokens trained by the warm-start step (billed as trained tokens)"),
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
