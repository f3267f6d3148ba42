"""Evaluation: held-out tasks, graded independently of the training reward.

    from turnwise.eval import compare, evaluate, render_table
    cmp = compare(cfg, "base", "runs/<run>/checkpoints/final", "runs/eval-demo")
    print(render_table(cmp)); cmp.b.metrics["eval/exact_match"]; cmp.passed
"""

from turnwise.eval.job import ComparisonResult, EvalResult, ModelSpec, compare, evaluate
from turnwise.eval.report import render_table
from turnwise.eval.stats import Delta, GateCheck

__all__ = ["ComparisonResult", "Delta", "EvalResult", "GateCheck", "ModelSpec", "compare", "evaluate",
           "render_table"]
