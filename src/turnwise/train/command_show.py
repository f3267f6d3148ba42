"""`turnwise show RUN_DIR [--step N] [--task ID] [--failed] [--reward R] [--all] [--limit K]`:
a step's trajectories, readably.

Reads `RUN_DIR/rollouts/step_NNNNN.jsonl` (the last step by default). First a summary of the
whole step: rollouts, the reward distribution, pass / fail / failed counts, failures by kind,
tool calls and tool errors. Then the rollouts that match the filters: by default one per task
(its group's first rollout with the group's most common reward, so a representative one), with
`--all` every one. Each shows its task, verdict (pass, fail, or failed: <kind>), rewards and
policy versions, the final output beside the expected answer, then every message with its
role and tool calls as `name(arguments)`.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any

from turnwise.config import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a training run directory")
    parser.add_argument("--step", type=int, default=None, help="RL step to show (default: the last)")
    parser.add_argument("--task", default=None, help="only this task id")
    parser.add_argument("--failed", action="store_true", help="only rollouts that failed or did not pass")
    parser.add_argument("--reward", type=float, default=None, help="only rollouts with this reward (e.g. 0)")
    parser.add_argument("--all", action="store_true", help="every rollout, not one per task")
    parser.add_argument("--limit", type=int, default=None, help="show at most this many rollouts")


def run(args: argparse.Namespace) -> int:
    files = sorted((Path(args.run_dir) / "rollouts").glob("step_*.jsonl"))
    if not files:
        raise ConfigError(f"no rollouts under {args.run_dir}/rollouts (is it a training run directory?)")
    path = files[-1] if args.step is None else Path(args.run_dir) / "rollouts" / f"step_{args.step:05d}.jsonl"
    if not path.is_file():
        steps = ", ".join(str(int(f.stem.split("_")[1])) for f in files)
        raise ConfigError(f"no rollouts for step {args.step}; steps with rollouts: {steps}")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if args.task is not None and not any(r["task_id"] == args.task for r in rows):
        raise ConfigError(f"no task {args.task!r} in {path}; tasks: {', '.join(sorted({r['task_id'] for r in rows})[:10])}")
    print(f"{path}")
    print(summary(rows))
    shown = select(rows, task=args.task, failed=args.failed, reward=args.reward, every=args.all)
    what = "every rollout" if args.all else "one rollout per task (--all: every one)"
    print(f"\nshowing {min(len(shown), args.limit or len(shown))} of {len(rows)} rollouts: {what}")
    for row in shown[: args.limit]:
        print(format_rollout(rows.index(row), row))
    return 0


def verdict(row: dict[str, Any]) -> str:
    """pass | fail | failed: <kind> (rows written before verdicts were recorded: from the status)."""
    if row.get("verdict"):
        return row["verdict"]
    if row["status"] != "rewarded":
        return f"failed: {row.get('failure') or row['status']}"
    return "pass" if sum(row.get("rewards", [])) >= 1.0 else "fail"


def _reward(row: dict[str, Any]) -> float | None:
    return float(sum(row["rewards"])) if row.get("rewards") else None


def summary(rows: list[dict[str, Any]]) -> str:
    """The step at a glance: counts, reward distribution, failures by kind, tool use."""
    verdicts = Counter(verdict(r) for r in rows)
    rewards = Counter(_reward(r) for r in rows if _reward(r) is not None)
    failures = Counter(r.get("failure") or r["status"] for r in rows if r["status"] != "rewarded")
    calls = sum(r.get("metrics", {}).get("rollout/tool_calls", r.get("metrics", {}).get("tool_calls", 0)) for r in rows)
    errors = sum(r.get("metrics", {}).get("rollout/tool_errors", r.get("metrics", {}).get("tool_errors", 0)) for r in rows)
    tasks = len({r["task_id"] for r in rows})
    lines = [f"  {len(rows)} rollouts of {tasks} tasks: " + ", ".join(
        f"{verdicts[v]} {v}" for v in sorted(verdicts, key=lambda v: (not v.startswith("pass"), v)))]
    if rewards:
        mean = sum(k * n for k, n in rewards.items()) / sum(rewards.values())
        dist = "  ".join(f"{k:g}: {n}" for k, n in sorted(rewards.items()))
        lines.append(f"  reward: mean {mean:.3f}   distribution {dist}")
    if failures:
        lines.append("  failed by kind: " + ", ".join(f"{k} {n}" for k, n in failures.most_common()))
    lines.append(f"  tool calls {calls:g}, tool errors {errors:g}")
    return "\n".join(lines)


def select(rows: list[dict[str, Any]], *, task: str | None = None, failed: bool = False,
           reward: float | None = None, every: bool = False) -> list[dict[str, Any]]:
    """The rows matching the filters; unless `every`, one per task: its first row with the
    task's most common verdict among the matches."""
    matches = [r for r in rows if (task is None or r["task_id"] == task)
               and (not failed or verdict(r) != "pass")
               and (reward is None or (_reward(r) is not None and abs(_reward(r) - reward) < 1e-9))]
    if every:
        return matches
    by_task: dict[str, list[dict[str, Any]]] = {}
    for r in matches:
        by_task.setdefault(r["task_id"], []).append(r)
    out = []
    for group in by_task.values():
        common = Counter(verdict(r) for r in group).most_common(1)[0][0]
        out.append(next(r for r in group if verdict(r) == common))
    return out


def format_rollout(i: int, row: dict[str, Any]) -> str:
    rewards = ", ".join(f"{r:g}" for r in row.get("rewards", [])) or "-"
    head = (f"\n=== rollout {i}  task {row['task_id']}  {verdict(row)}  reward [{rewards}]  "
            f"turns {row.get('turns', 0)}  versions {row.get('versions', [])}")
    lines = [head]
    if row.get("error"):
        lines.append(f"  error: {row['error']}")
    if "expected" in row:
        final = row.get("final_output") or ""
        lines.append(f"  final output: {_indent(final) or '-'}")
        lines.append(f"  expected:     {json.dumps(row['expected'], default=str) if row['expected'] is not None else '-'}")
    if row.get("metrics"):
        lines.append("  metrics: " + ", ".join(f"{k}={v:g}" for k, v in sorted(row["metrics"].items())))
    for m in row.get("messages", []):
        role = m.get("role", "?")
        label = f"{role}" + (f" ({m['tool_call_id']})" if m.get("tool_call_id") else "")
        if m.get("content"):
            lines.append(f"  [{label}] {_indent(m['content'])}")
        for call in m.get("tool_calls") or []:
            fn = call.get("function", {})
            lines.append(f"  [{label} -> tool] {fn.get('name')}({fn.get('arguments')})  id={call.get('id')}")
    return "\n".join(lines)


def _indent(text: str) -> str:
    return text.replace("\n", "\n      ")
