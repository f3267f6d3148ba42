"""`turnwise demo`: train the support-desk demo, then evaluate warm start vs RL on the test split.

Prints the comparison table, the MLflow location and the reward-curve path, and writes
`demo_summary.json` whose path is the last line (`summary: PATH`).
"""

from __future__ import annotations

import argparse
import json
import time

from turnwise.train.command import add_config_arguments, fmt, load_job_config, report_interrupted


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from turnwise.eval import compare, render_table
    from turnwise.train.job import run_train_checked

    started = time.perf_counter()
    cfg = load_job_config(args)
    result, summary = run_train_checked(cfg)
    if result.interrupted:  # no RL checkpoint to evaluate yet
        return report_interrupted(result)
    checkpoints = result.run_dir / "checkpoints"
    warm = checkpoints / "warm_start" if (checkpoints / "warm_start").is_dir() else "base"
    tags = {"turnwise.train_run_id": summary["mlflow_run_id"]} if summary["mlflow_run_id"] else None
    comparison = compare(cfg, str(warm), str(checkpoints / "final"), result.run_dir / "eval",
                         labels=("warm start" if warm != "base" else "base", f"RL step {result.steps}"),
                         mlflow_tags=tags)
    print()
    print(render_table(comparison))
    print()
    print(f"  validation reward after warm start : {fmt(result.val_reward_before_rl)}")
    print(f"  validation reward after RL         : {fmt(result.val_reward_after_rl)}")
    print(f"  RL steps: {result.steps}   run: {result.run_dir}")
    print(f"  reward curve: {summary['reward_curve']}")
    print(f"  MLflow: mlflow ui --backend-store-uri {summary['mlflow_tracking_uri']}  (then 'Model training', top left)"
          + (f"   registered model: {summary['registered_model']}" if summary.get("registered_model") else ""))
    # the demo grades with the agent's strict reward (final JSON and final database state); with
    # another grader, exact match is the grader's `<final_output>` comparison
    key = "eval/reward/mean" if cfg.eval.grader == "reward" else "eval/exact_match"
    demo = {
        "sft_test_exact_match": comparison.a.metrics[key],
        "rl_test_exact_match": comparison.b.metrics[key],
        "sft_test_final_json_match": comparison.a.metrics["eval/exact_match"],
        "rl_test_final_json_match": comparison.b.metrics["eval/exact_match"],
        "val_reward_after_warm_start": result.val_reward_before_rl,
        "val_reward_after_rl": result.val_reward_after_rl,
        "rl_steps": result.steps,
        "seed": cfg.seed,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "run_dir": str(result.run_dir),
        "eval_report": str(comparison.out_dir / "report.md"),
        "reward_curve": summary["reward_curve"],
        "mlflow_tracking_uri": summary["mlflow_tracking_uri"],
    }
    path = result.run_dir / "demo_summary.json"
    path.write_text(json.dumps(demo, indent=2))
    print(f"  test exact match: warm start {demo['sft_test_exact_match']:.3f} -> RL "
          f"{demo['rl_test_exact_match']:.3f}   wall time {demo['wall_seconds']:.0f}s")
    print(f"summary: {path}")
    return 0
