"""Billable token usage of one run directory, in the managed service's three dimensions plus one.

    usage = run_usage(run_dir)   # {"prefill_tokens", "prefill_cached_tokens", "sample_tokens", "train_tokens"}

Read from what the run itself recorded, so every rollout counts whatever it was for (training,
validation, evaluation) and however it ended (rewarded, failed, abandoned):
- prefill: prompt tokens the sampler computed, per turn (`turns.prefill_tokens`);
- prefill cached: prompt tokens served from the sampler's prefix cache (the turn's prompt minus
  what was computed);
- sample: tokens sampled (`turns.completion_ids`);
- train: tokens the learner trained on, the sums of `train/tokens` (RL) and `warm_start/tokens`
  (supervised warm start) over `metrics.jsonl`.
A missing file counts zero; a line cut short by a crash is skipped.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

USAGE_KEYS = ("prefill_tokens", "prefill_cached_tokens", "sample_tokens", "train_tokens")
"""The dimensions, in the order a usage report lists them."""


def _store_tokens(db: Path) -> tuple[int, int, int]:
    """(prompt, computed prefill, sampled) tokens over every turn of every job in the store file."""
    if not db.is_file():
        return 0, 0, 0
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30.0)
    try:
        row = conn.execute("SELECT COALESCE(SUM(length(prompt_ids)), 0) / 4, COALESCE(SUM(prefill_tokens), 0), "
                           "COALESCE(SUM(length(completion_ids)), 0) / 4 FROM turns").fetchone()
    except sqlite3.OperationalError:  # created but not yet initialised
        return 0, 0, 0
    finally:
        conn.close()
    return int(row[0]), int(row[1]), int(row[2])


def _trained_tokens(metrics: Path) -> int:
    if not metrics.is_file():
        return 0
    total = 0.0
    for line in metrics.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            total += float(row.get("train/tokens", 0.0)) + float(row.get("warm_start/tokens", 0.0))
        except (ValueError, AttributeError):
            continue
    return int(total)


def run_usage(run_dir: str | Path) -> dict[str, int]:
    """The run's token totals by dimension (module docstring); token ids are stored as int32."""
    run_dir = Path(run_dir)
    prompt, computed, sampled = _store_tokens(run_dir / "trajectories.db")
    return {"prefill_tokens": computed, "prefill_cached_tokens": max(prompt - computed, 0),
            "sample_tokens": sampled, "train_tokens": _trained_tokens(run_dir / "metrics.jsonl")}
