"""Evaluation metrics over a tasks x trials table, paired bootstrap intervals, and the deployment gate.

Metrics (every task has the same n = `eval.group_size` trials; a failed trial counts as a failure):
  eval/reward/mean, std       grader score over all rollouts
  eval/exact_match            fraction of rollouts whose `<final_output>` matches exactly
  eval/pass_at_{k}            mean over tasks of 1 - C(n-c, k)/C(n, k)   (Chen et al. 2021)
  eval/pass_hat_{k}           mean over tasks of C(c, k)/C(n, k)         (tau-bench's pass^k)
  eval/turns/mean, eval/tool_calls/mean        per rollout
  eval/tool_errors/frac       tool errors / tool calls (unparseable attempts count as both)
  eval/tokens/mean, p95       sampled tokens per rollout
  eval/latency/p50, p95       seconds per rollout
  eval/failed/frac            crashed, timed out or made no model call
  eval/stop/<reason>          fraction of rollouts per `Outcome` (a stop, or a failure kind)
  eval/agent_reward/mean      the agent's own (training) reward, when every rollout reported one

Comparison: a paired bootstrap over tasks (the same resampled task indices for A and B), the
percentile interval of B - A at `confidence`. Percentiles use numpy's default (linear).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from turnwise.algo.passk import pass_at_k, pass_hat_k
from turnwise.eval.records import EvalRollout, Outcome

_STOPS = tuple(Outcome)


@dataclass(frozen=True)
class EvalTable:
    """Per-rollout numbers of an evaluation, each shaped [tasks, trials] (`_N_G`)."""

    task_ids: tuple[str, ...]
    score_N_G: np.ndarray
    success_N_G: np.ndarray
    exact_N_G: np.ndarray
    """NaN where a task has no ground truth."""
    agent_reward_N_G: np.ndarray
    """NaN where the rollout failed or the agent reported none."""
    turns_N_G: np.ndarray
    tool_calls_N_G: np.ndarray
    tool_errors_N_G: np.ndarray
    tokens_N_G: np.ndarray
    latency_N_G: np.ndarray
    failed_N_G: np.ndarray
    stop_N_G: np.ndarray
    """Index into `Outcome` order."""

    @classmethod
    def from_rollouts(cls, tasks: Sequence[Sequence[EvalRollout]]) -> EvalTable:
        if not tasks:
            raise ValueError("no evaluated tasks")
        sizes = {len(t) for t in tasks}
        if len(sizes) != 1:
            raise ValueError(f"every task needs the same number of trials, got {sorted(sizes)}")

        def col(fn: Callable[[EvalRollout], float | None]) -> np.ndarray:
            return np.array([[np.nan if fn(r) is None else fn(r) for r in t] for t in tasks], dtype=float)

        return cls(task_ids=tuple(t[0].task_id for t in tasks), score_N_G=col(lambda r: r.score),
                   success_N_G=col(lambda r: float(r.success)), exact_N_G=col(lambda r: r.exact_match),
                   agent_reward_N_G=col(lambda r: r.agent_reward), turns_N_G=col(lambda r: r.turns),
                   tool_calls_N_G=col(lambda r: r.tool_calls), tool_errors_N_G=col(lambda r: r.tool_errors),
                   tokens_N_G=col(lambda r: r.completion_tokens), latency_N_G=col(lambda r: r.latency_s),
                   failed_N_G=col(lambda r: float(r.failed)), stop_N_G=col(lambda r: _STOPS.index(r.stop_reason)))

    @property
    def group_size(self) -> int:
        return self.score_N_G.shape[1]

    def take(self, rows: np.ndarray) -> EvalTable:
        """The table of tasks `rows` (with repeats: a bootstrap resample)."""
        return EvalTable(task_ids=tuple(self.task_ids[i] for i in rows),
                         **{k: v[rows] for k, v in vars(self).items() if k != "task_ids"})


def k_values(pass_k_values: Sequence[int], group_size: int) -> list[int]:
    """The configured k that fit in n trials, always with 1 and n."""
    return sorted({1, group_size, *(k for k in pass_k_values if k <= group_size)})


def metric_names(ks: Sequence[int]) -> list[str]:
    """Every metric `summarize` can report (`eval/agent_reward/mean` only when agents report one)."""
    return ["eval/reward/mean", "eval/reward/std", "eval/exact_match",
            *(f"eval/pass_at_{k}" for k in ks), *(f"eval/pass_hat_{k}" for k in ks),
            "eval/turns/mean", "eval/tool_calls/mean", "eval/tool_errors/frac", "eval/tokens/mean",
            "eval/tokens/p95", "eval/latency/p50", "eval/latency/p95", "eval/failed/frac",
            *(f"eval/stop/{s.value}" for s in _STOPS), "eval/agent_reward/mean"]


def summarize(t: EvalTable, ks: Sequence[int]) -> dict[str, float]:
    n = t.group_size
    c_N = t.success_N_G.sum(axis=1).astype(int)
    out = {"eval/reward/mean": float(t.score_N_G.mean()), "eval/reward/std": float(t.score_N_G.std())}
    if not np.isnan(t.exact_N_G).all():
        out["eval/exact_match"] = float(np.nanmean(t.exact_N_G))
    for k in ks:  # per-task values looked up by success count c
        out[f"eval/pass_at_{k}"] = float(np.mean(np.array([pass_at_k(n, c, k) for c in range(n + 1)])[c_N]))
    for k in ks:
        out[f"eval/pass_hat_{k}"] = float(np.mean(np.array([pass_hat_k(n, c, k) for c in range(n + 1)])[c_N]))
    calls = t.tool_calls_N_G.sum()
    out |= {"eval/turns/mean": float(t.turns_N_G.mean()), "eval/tool_calls/mean": float(t.tool_calls_N_G.mean()),
            "eval/tool_errors/frac": float(t.tool_errors_N_G.sum() / calls) if calls else 0.0,
            "eval/tokens/mean": float(t.tokens_N_G.mean()),
            "eval/tokens/p95": float(np.percentile(t.tokens_N_G, 95)),
            "eval/latency/p50": float(np.percentile(t.latency_N_G, 50)),
            "eval/latency/p95": float(np.percentile(t.latency_N_G, 95)),
            "eval/failed/frac": float(t.failed_N_G.mean())}
    for i, s in enumerate(_STOPS):
        out[f"eval/stop/{s.value}"] = float((t.stop_N_G == i).mean())
    ok = t.failed_N_G == 0
    if ok.any() and not np.isnan(t.agent_reward_N_G[ok]).any():
        out["eval/agent_reward/mean"] = float(np.where(ok, t.agent_reward_N_G, 0.0).mean())
    return out


@dataclass(frozen=True)
class Delta:
    """One metric of a comparison: B - A with its bootstrap interval (None without resamples)."""

    a: float
    b: float
    delta: float
    low: float | None
    high: float | None


def compare_tables(a: EvalTable, b: EvalTable, ks: Sequence[int], *, samples: int, confidence: float,
                   seed: int = 0) -> dict[str, Delta]:
    """Per-metric B - A, with a paired bootstrap over the tasks both evaluated."""
    common = [tid for tid in a.task_ids if tid in set(b.task_ids)]
    if not common:
        raise ValueError("the two evaluations share no task")
    a = a.take(np.array([a.task_ids.index(tid) for tid in common]))
    b = b.take(np.array([b.task_ids.index(tid) for tid in common]))
    ma, mb = summarize(a, ks), summarize(b, ks)
    names = [m for m in ma if m in mb]
    draws: dict[str, list[float]] = {m: [] for m in names}
    rng = np.random.default_rng(seed)
    for _ in range(samples):
        rows = rng.integers(0, len(common), len(common))
        sa, sb = summarize(a.take(rows), ks), summarize(b.take(rows), ks)
        for m in names:
            if m in sa and m in sb:
                draws[m].append(sb[m] - sa[m])
    tail = (1 - confidence) / 2 * 100
    out = {}
    for m in names:
        lo = hi = None
        if draws[m]:
            lo, hi = (float(x) for x in np.percentile(draws[m], [tail, 100 - tail]))
        out[m] = Delta(a=ma[m], b=mb[m], delta=mb[m] - ma[m], low=lo, high=hi)
    return out


# -- deployment gate -------------------------------------------------------------------------

_OPS: Mapping[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
_GATE_RE = re.compile(r"^\s*(>=|<=|>|<)?\s*([-+]?[0-9.]+(?:[eE][-+]?\d+)?)\s*$")


@dataclass(frozen=True)
class GateCheck:
    """One gate condition and its outcome."""

    metric: str
    op: str
    threshold: float
    value: float
    passed: bool


def parse_threshold(spec: float | str) -> tuple[str, float]:
    """0.5 -> (">=", 0.5); "<= 2" -> ("<=", 2.0). Raises ValueError on anything else."""
    if isinstance(spec, int | float) and not isinstance(spec, bool):
        return ">=", float(spec)
    m = _GATE_RE.match(str(spec))
    if not m:
        raise ValueError(f"gate threshold {spec!r} must be a number or '<op> number' with op in >=, <=, >, <")
    return m.group(1) or ">=", float(m.group(2))


def check_gate(gate: Mapping[str, float | str], metrics: Mapping[str, float],
               deltas: Mapping[str, Delta] | None = None) -> list[GateCheck]:
    """Each condition on `metrics` (the candidate's), or on B - A for `delta/<metric>` keys."""
    checks = []
    for name, spec in gate.items():
        op, threshold = parse_threshold(spec)
        if name.startswith("delta/"):
            if deltas is None or name[len("delta/"):] not in deltas:
                raise KeyError(name)
            value = deltas[name[len("delta/"):]].delta
        else:
            if name not in metrics:
                raise KeyError(name)
            value = metrics[name]
        checks.append(GateCheck(name, op, threshold, value, _OPS[op](value, threshold)))
    return checks
