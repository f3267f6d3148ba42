"""`turnwise eval [CONFIG] (--base | --checkpoint PATH | --endpoint URL | --compare A B) [--set k=v ...]`.

Exit code: 0 when every `eval.gate` condition holds (or there is none), 1 when one fails,
2 on a config error, 130 when interrupted (finish later with `--resume DIR`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from turnwise.rollout.command_args import add_config_arguments, load_job_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--base", action="store_true", help="the model the config names (model.path or the tiny model)")
    which.add_argument("--checkpoint", metavar="PATH", help="a Hugging Face model dir, e.g. runs/<run>/checkpoints/final")
    which.add_argument("--endpoint", metavar="URL", help="an OpenAI-compatible endpoint ($OPENAI_API_KEY if needed)")
    which.add_argument("--compare", nargs=2, metavar=("A", "B"),
                       help="evaluate A and B ('base', a checkpoint dir or an URL) and compare; the gate applies to B")
    parser.add_argument("--endpoint-model", metavar="NAME", help="model name for an endpoint (default: its first)")
    parser.add_argument("--out", metavar="DIR", help="evaluation directory (default: <output_dir>/eval-<name>-<time>)")
    parser.add_argument("--resume", metavar="DIR", help="finish an interrupted evaluation in DIR")


def run(args: argparse.Namespace) -> int:
    from turnwise.eval.job import compare, evaluate
    from turnwise.eval.report import render_table

    cfg = load_job_config(args)
    out_dir = Path(args.resume or args.out or Path(cfg.output_dir) / f"eval-{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    resume = args.resume is not None
    if args.compare:
        result = compare(cfg, args.compare[0], args.compare[1], out_dir, resume=resume,
                         endpoint_model=args.endpoint_model)
    else:
        model = "base" if args.base else args.checkpoint or args.endpoint
        result = evaluate(cfg, model, out_dir, resume=resume, endpoint_model=args.endpoint_model)
    print(render_table(result))
    print(f"report: {result.report_path}")
    print(f"summary: {result.summary_path}")
    if result.gate:
        print(f"gate: {'PASSED' if result.passed else 'FAILED'}")
    return 0 if result.passed else 1
