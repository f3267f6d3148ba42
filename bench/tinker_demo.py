"""The support-desk demo trained through a Tinker-API service: SkyRL's open Tinker server
(`skyrl==0.3.0`, JAX on the CPU, `.venv-skyrl` from `make skyrl`) on loopback, `turnwise train`
with `trainer.backend=tinker sampler.backend=tinker` (issue 18). Prints the validation reward
after the warm start and after RL, wall times, and each RL step's split between this process
and the service (`speed/server_train_s`, `speed/server_sample_s`); `--out` writes them as JSON.

    PYTHONPATH=src .venv/bin/python bench/tinker_demo.py --steps 20

The model is turnwise's tiny model in Qwen3's shape (`tests/skyrl_server.tiny_qwen3`: SkyRL's JAX
backend implements Qwen3, not Qwen2), random weights, our 2,048-token tokenizer. The demo needs
a warm start to learn the answer format before RL has any reward to work with. `--warm-start`:

- `local` (default): the config's warm start runs here, full weights (`turnwise train` with
  `trainer.backend=local max_steps=0`); its checkpoint becomes the base model the server loads,
  and RL trains LoRA adapters on it at the service;
- `service`: the warm start runs at the service on the LoRA adapters (with `trainer.backend=tinker`
  the warm start goes where RL goes), so the random embeddings stay as they are.

Validation runs at step 0 and after the last step only (`val_every=0`), so no step's times hold
validation. Step 1 holds the server's JIT compiles and the step-0 validation's sampling (the
service's usage counters run from one optimizer step to the next; the publish after a step is
moved back into it): the split is given for steps 2 on, and step 1 on its own. `server_*_s` are
wall seconds this process waited on the service (sampling: with at least one request in flight),
queueing and polling included; "ours" is the rest of the step. The server's own compute over the
whole run (its log's `process_batch_requests`) is given beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from skyrl_server import MISSING, VENV_PYTHON, run_server, stop_server, tiny_qwen3  # noqa: E402

CONFIG = ROOT / "examples" / "support_desk" / "config.yaml"
DATA = CONFIG.parent / "data"


def turnwise_train(overrides: list[str], log: Path) -> Path:
    """`turnwise train` on the demo config with `overrides`; its run directory."""
    cmd = [sys.executable, "-m", "turnwise.cli", "train", str(CONFIG)]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    with log.open("w") as f:
        done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    text = log.read_text()
    if done.returncode != 0:
        sys.exit(f"turnwise train failed ({done.returncode}); the end of {log}:\n{text[-3000:]}")
    return Path(re.findall(r"^run: (.+)$", text, re.M)[-1])


def head(src: Path, dst: Path, n: int | None) -> Path:
    """The first `n` lines of `src` at `dst` (all of them when `n` is None)."""
    lines = src.read_text().splitlines()
    dst.write_text("\n".join(lines[:n] if n else lines) + "\n")
    return dst


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def server_compute(log: Path) -> dict[str, float]:
    """Seconds the server's engine spent per request kind (its `process_batch_requests` lines)."""
    out: dict[str, float] = {}
    # its rich log handler wraps lines at 80 columns, in the middle of these too
    for kind, seconds in re.findall(r"process_(?:batch|single)_requests?\((\w+)[^)]*\)\s+took ([\d.]+)s",
                                    log.read_text(errors="replace")):
        out[kind] = out.get(kind, 0.0) + float(seconds)
    return out


def report(run_dir: Path, skyrl_log: Path, wall: dict[str, float],
           load: dict[str, tuple[float, ...]]) -> dict[str, Any]:
    rows = read_metrics(run_dir)
    val = {r["step"]: r["reward/val"] for r in rows if "reward/val" in r}
    steps = sorted((r for r in rows if "speed/step_s" in r), key=lambda r: r["step"])
    warm = [r["warm_start/loss"] for r in rows if "warm_start/loss" in r]

    # `server_train_s` runs from one optimizer step to the next, so it holds the previous step's
    # publish (`save_weights_for_sampler`, timed by the loop as `speed/weight_sync_s`): moved back
    sync = [r.get("speed/weight_sync_s", 0.0) for r in steps]
    for i, r in enumerate(steps):
        r["server_train_step_s"] = r.get("speed/server_train_s", 0.0) + sync[i] - (sync[i - 1] if i else 0.0)

    def split(part: list[dict[str, Any]]) -> dict[str, float]:
        if not part:
            return {}
        step_s = mean(r["speed/step_s"] for r in part)
        train = mean(r["server_train_step_s"] for r in part)
        sample = mean(r.get("speed/server_sample_s", 0.0) for r in part)
        return {"steps": len(part), "step_s": step_s, "server_train_s": train, "server_sample_s": sample,
                "ours_s": step_s - train - sample, "sample_phase_s": mean(r["speed/sample_s"] for r in part),
                "train_phase_s": mean(r["speed/train_s"] for r in part),
                "sample_tokens": mean(r.get("rollout/sample_tokens", 0.0) for r in part),
                "prefill_tokens": mean(r.get("rollout/prefill_tokens", 0.0) for r in part),
                "train_tokens": mean(r.get("train/tokens", 0.0) for r in part)}

    return {"run_dir": str(run_dir), "val_reward": {str(k): v for k, v in sorted(val.items())},
            "train_reward": [round(r.get("reward/mean", 0.0), 4) for r in steps],
            "warm_start_loss": {"first": warm[0], "last": warm[-1], "steps": len(warm)} if warm else None,
            "wall_s": wall, "step_1": split(steps[:1]), "steps_2_on": split(steps[1:]),
            "server_compute_s": server_compute(skyrl_log), "load_average": load}


def loadavg() -> tuple[float, ...]:
    return tuple(round(x, 2) for x in os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=ROOT / "runs" / f"tinker-demo-{time.strftime('%Y%m%d-%H%M%S')}")
    p.add_argument("--steps", type=int, default=30, help="RL steps (the demo: 30)")
    p.add_argument("--batch", type=int, default=16, help="tasks per step (the demo: 16)")
    p.add_argument("--group", type=int, default=8, help="rollouts per task (the demo: 8)")
    p.add_argument("--demos", type=int, default=None, help="first N demonstrations for the warm start (all: 2,048)")
    p.add_argument("--warm-epochs", type=int, default=2)
    p.add_argument("--warm-start", choices=("local", "service"), default="local")
    p.add_argument("--base", type=Path, default=None,
                   help="--warm-start local: reuse this earlier run's warm start (its checkpoints/warm_start) "
                        "instead of running one")
    p.add_argument("--warm-lr", type=float, default=None,
                   help="warm start learning rate (default: the config's 2e-3, full weights)")
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3,
                   help="RL learning rate on the LoRA adapters (10x the demo's full-weight 2e-4)")
    p.add_argument("--val-tasks", type=int, default=None, help="first N validation tasks (all: 64)")
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                   help="more overrides of the RL run")
    p.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    args = p.parse_args()
    if args.base and args.warm_start != "local":
        sys.exit("--base is a local warm start: it goes with --warm-start local")
    if not VENV_PYTHON.is_file():
        sys.exit(MISSING)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    load = {"start": loadavg()}
    demos = head(DATA / "demos.jsonl", work / "demos.jsonl", args.demos)
    val = head(DATA / "val.jsonl", work / "val.jsonl", args.val_tasks)
    common = [f"output_dir={work / 'runs'}", f"data.val_path={val}", "tracking.progress=false",
              "tracking.mlflow=false", "val_every=0"]
    warm = [f"warm_start.demos_path={demos}", f"warm_start.epochs={args.warm_epochs}",
            *([f"warm_start.learning_rate={args.warm_lr}"] if args.warm_lr else [])]
    wall: dict[str, float] = {}

    t0 = time.perf_counter()
    if args.base:  # an earlier run's local warm start, already on full weights
        local = args.base.resolve()
        model = local / "checkpoints" / "warm_start"
        if not model.is_dir():
            sys.exit(f"--base {args.base}: no checkpoints/warm_start in it")
    else:
        model = tiny_qwen3(work / "tiny-qwen3")
        if args.warm_start == "local":  # full weights here; the server serves the result as its base model
            local = turnwise_train([*common, *warm, f"model.path={model}", "max_steps=0"], work / "warm_start.log")
            model = local / "checkpoints" / "warm_start"
            wall["warm_start_local_s"] = time.perf_counter() - t0
            load["after_warm_start"] = loadavg()

    t0 = time.perf_counter()
    proc, url = run_server(model, work, backend={"max_lora_rank": max(8, args.lora_rank),
                                                 "sample_max_num_sequences": 16})
    wall["server_start_s"] = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        run_dir = turnwise_train([
            *common, *(warm if args.warm_start == "service" else ["warm_start.demos_path=null"]),
            f"model.path={model}", "trainer.backend=tinker", "sampler.backend=tinker", f"tinker.base_url={url}",
            "tinker.api_key=tml-local", f"tinker.base_model={model}", "tinker.loss_reduction=sequence_mean",
            f"lora_rank={args.lora_rank}",
            f"learning_rate={args.lr}", f"max_steps={args.steps}", f"global_batch_size={args.batch}",
            f"group_size={args.group}", *args.extra], work / "train.log")
        wall["turnwise_train_s"] = time.perf_counter() - t0
    finally:
        stop_server(proc)
    wall["total_s"] = time.perf_counter() - t_start
    load["end"] = loadavg()
    out = report(run_dir, work / "skyrl.log", wall, load)
    if args.warm_start == "local":
        local_rows = read_metrics(local)
        out["local_warm_start"] = {
            "val_reward_local_sampler": next((r["reward/val"] for r in local_rows if "reward/val" in r), None),
            "loss_first": next(r["warm_start/loss"] for r in local_rows if "warm_start/loss" in r),
            "loss_last": [r["warm_start/loss"] for r in local_rows if "warm_start/loss" in r][-1]}
    out["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()} | {"work": str(work)}
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
