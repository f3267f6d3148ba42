"""What a step logs about its rollouts, and the failure policy that decides which groups train.

Failure policy: a rollout that raised, timed out, or made no model call is FAILED and never
trains. Its group is then incomplete: `incomplete_groups: keep` trains the other members
(advantages among them), `drop` leaves the whole group out. A group with no usable member is
always dropped. Every decision is counted (`rollout/failed`, `rollout/failed_<kind>` per
`FailureKind`, `rollout/timeouts` (retried attempts included), `rollout/retries`, `train/groups_incomplete`,
`train/groups_dropped_incomplete`, `train/groups_dropped_empty`). Rollout timeouts
(`agent.rollout_timeout`) bound every rollout, and with pull workers `agent.queue_timeout` bounds
the wait for a worker, so a step cannot hang on an agent or on workers that never come.

Agent-reported numbers (`RolloutResult.metrics`, with or without a `rollout/` prefix) aggregate
as `rollout/tool_calls`, `rollout/tool_error_frac` (errors / calls), `rollout/stop_<reason>`
(fraction of rollouts), and `rollout/<name>` (the mean) for any other name. Without a report, tool
calls are counted from the recorded turns and the stop reason is the last turn's finish reason.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from turnwise.train.datums import usable
from turnwise.types import FailureKind, Group, RolloutResult


def apply_failure_policy(groups: Sequence[Group], policy: str) -> tuple[list[Group], dict[str, float]]:
    """The groups that train under `policy` ("keep" | "drop"), and counts of every decision."""
    kept: list[Group] = []
    rollouts = [r for g in groups for r in g.rollouts_G]
    failed = [r for r in rollouts if not usable(r)]
    counts = {"incomplete": 0, "dropped_incomplete": 0, "dropped_empty": 0}
    for g in groups:
        n_ok = sum(usable(r) for r in g.rollouts_G)
        if n_ok == 0:
            counts["dropped_empty"] += 1
            continue
        if n_ok < len(g.rollouts_G):
            counts["incomplete"] += 1
            if policy == "drop":
                counts["dropped_incomplete"] += 1
                continue
        kept.append(g)
    metrics = {f"train/groups_{k}": float(v) for k, v in counts.items()}
    kinds = Counter(r.trajectory.failure or FailureKind.AGENT_ERROR for r in failed)
    retried = Counter(k for r in rollouts for k in r.retried)
    timeouts = (FailureKind.AGENT_TIMEOUT, FailureKind.QUEUE_TIMEOUT)
    metrics |= {"rollout/failed": float(len(failed)),
                "rollout/timeouts": float(sum(kinds[k] + retried[k] for k in timeouts)),
                "rollout/retries": float(retried.total()),
                "rollout/failed_frac": len(failed) / max(1, len(rollouts)),
                "train/groups_kept": float(len(kept))}
    metrics |= {f"rollout/failed_{k.value}": float(n) for k, n in kinds.items()}
    return kept, metrics


def staleness(group: Group, current_version: int) -> int:
    """Policy versions between the weights about to train and the oldest token of the group."""
    versions = [t.version for r in group.rollouts_G if usable(r) for t in r.trajectory.turns]
    return current_version - min(versions) if versions else 0


def agent_metrics(r: RolloutResult) -> dict[str, float]:
    """The rollout's reported numbers without the `rollout/` prefix, with defaults filled in."""
    out = {k.removeprefix("rollout/"): float(v) for k, v in r.metrics.items()}
    turns = r.trajectory.turns
    out.setdefault("tool_calls", float(sum(len(t.message.tool_calls) for t in turns)))
    out.setdefault("tool_errors", 0.0)
    if not any(k.startswith("stop/") for k in out):
        reason = "failed" if not usable(r) else (turns[-1].finish_reason.value if turns else "none")
        out[f"stop/{reason}"] = 1.0
    return out


def rollout_metrics(groups: Sequence[Group], success_threshold: float) -> dict[str, float]:
    rollouts = [r for g in groups for r in g.rollouts_G]
    ok = [r for r in rollouts if usable(r)]
    rewards = [r.trajectory.reward if usable(r) else 0.0 for r in rollouts]
    valid = [r.trajectory.reward for r in ok]
    turns = [t for r in ok for t in r.trajectory.turns]
    out = {
        "reward/mean": float(np.mean(rewards)) if rewards else 0.0,
        "reward/zero_frac": float(np.mean([v == 0 for v in valid])) if valid else 0.0,
        "reward/pass_rate": float(np.mean([v >= success_threshold for v in rewards])) if rewards else 0.0,
        "rollout/turns": float(np.mean([len(r.trajectory.turns) for r in ok])) if ok else 0.0,
        "rollout/response_tokens_max": float(max((len(t.completion_ids) for t in turns), default=0)),
        "rollout/response_tokens": float(np.mean([len(t.completion_ids) for t in turns])) if turns else 0.0,
        "rollout/tool_parse_errors": float(sum(t.tool_parse_error for t in turns)),
        "rollout/sample_tokens": float(sum(len(t.completion_ids) for t in turns)),
        "rollout/prefill_tokens": float(sum(len(t.prompt_ids) - t.reused_prompt_tokens for t in turns)),
        "speed/rollout_s": float(np.mean([r.seconds for r in rollouts])) if rollouts else 0.0,
        "speed/rollout_s_max": float(max((r.seconds for r in rollouts), default=0.0)),
    }
    if valid and len(valid) < len(rewards):  # equal to reward/mean when nothing failed
        out["reward/valid_mean"] = float(np.mean(valid))
    for reason in sorted({t.prompt_plan for t in turns if t.prompt_plan}):  # re-rendered prompts start segments
        out[f"rollout/prompt_plan_{reason}"] = float(sum(t.prompt_plan == reason for t in turns))
    reported = [agent_metrics(r) for r in rollouts]
    calls = sum(m["tool_calls"] for m in reported)
    out["rollout/tool_calls"] = calls / max(1, len(reported))
    out["rollout/tool_error_frac"] = sum(m["tool_errors"] for m in reported) / calls if calls else 0.0
    for key in sorted({k for m in reported for k in m}):
        if key.startswith("stop/"):
            out[f"rollout/{key.replace('/', '_')}"] = sum(m.get(key, 0.0) for m in reported) / max(1, len(reported))
        elif key not in ("tool_calls", "tool_errors", "turns"):
            out[f"rollout/{key.replace('/', '_')}"] = float(np.mean([m.get(key, 0.0) for m in reported]))
    return out
