"""`rollout.usage.run_usage`: trained tokens from the run's metrics, RL and warm start alike."""

from __future__ import annotations

import json

from turnwise.rollout.usage import run_usage


def test_trained_tokens_count_the_warm_start_and_skip_a_cut_line(tmp_path):
    rows = [{"step": 1, "warm_start/loss": 2.0, "warm_start/tokens": 300.0},
            {"step": 2, "warm_start/tokens": 200.0}, {"step": 1, "train/tokens": 1000.0}]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 2, "train/tok'  # the crash cut the last line
    (tmp_path / "metrics.jsonl").write_text(text)
    assert run_usage(tmp_path) == {"prefill_tokens": 0, "prefill_cached_tokens": 0, "sample_tokens": 0,
                                   "train_tokens": 1500}
