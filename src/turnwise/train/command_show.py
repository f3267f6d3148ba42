"""`turnwise show RUN_DIR [--step N] [--limit K]`: a step's trajectories, readably.

Reads `RUN_DIR/rollouts/step_NNNNN.jsonl` (the last step by default) and prints each rollout:
its task, status, rewards and policy versions, then every message with its role, and tool
calls as `name(arguments)`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from turnwise.config import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a training run directory")
    parser.add_argument("--step", type=int, default=None, help="RL step to show (default: the last)")
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
    print(f"{path} ({len(rows)} rollouts)")
    for i, row in enumerate(rows[: args.limit]):
        print(format_rollout(i, row))
    return 0


def format_rollout(i: int, row: dict) -> str:
    rewards = ", ".join(f"{r:g}" for r in row.get("rewards", [])) or "-"
    head = (f"\n=== rollout {i}  task {row['task_id']}  {row['status']}  reward [{rewards}]  "
            f"turns {row.get('turns', 0)}  versions {row.get('versions', [])}")
    lines = [head]
    if row.get("error"):
        lines.append(f"  error: {row['error']}")
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
