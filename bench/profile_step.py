"""Where an RL step's time goes, by phase, on the demo's job: rerun it to see what a change bought.

Runs the demo (`examples/support_desk`, the config `make demo` trains) with its warm start, then
`--steps` RL steps, with timers around the functions of each phase (no sampling profiler, no
change to the code paths). Steps after the first are averaged. Phases:

  sample (wall)               the sampling phase of the loop (`speed/sample_s`); concurrently inside it:
    sampler: model forward    `SamplerEngine._forward` (prefill and decode), in the sampler thread
    sampler: token sampling   `sample_tokens` (softmax, top-p, draw)
    sampler: scheduling       the rest of `_admit`/`_decode` (KV padding, merging, retiring)
    sampler: idle             the sampling phase minus the three above: the sampler waits for requests
    runtime: plan + render    `plan_prompt` (token-exact prompt, chat template) in the server thread
    runtime: parse            `parse_assistant` (tool calls, reasoning)
    runtime: SQLite           `TrajectoryStore` writes and reads
    agent: tool calls         `ToolBox.call` wall time summed over concurrent rollouts (latency, not CPU)
  datums                      advantages and token-exact datums
  learner: forward/backward   `forward_backward`
  learner: optimizer          `optim_step`
  weight sync                 `save_weights_for_sampler` (new weights into the sampler)
  log: metrics + rollouts     `log_metrics`, `write_rollouts`, `log_artifact`, `log_rollouts`
  validation                  temperature-0 validation rollouts (only on `val_every` steps)
  checkpoint                  `save_state` (trainer checkpoint, MLflow artifact)

Threads share two cores and the GIL, so the sampler's idle share is the HTTP, agent and runtime
work it waits on. Logging goes where `turnwise train` sends it (MLflow under `runs/`).

    .venv/bin/python bench/profile_step.py [--steps 4] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

DEMO = Path(__file__).parent.parent / "examples" / "support_desk" / "config.yaml"

_totals: dict[str, float] = defaultdict(float)
_calls: dict[str, int] = defaultdict(int)
_lock = threading.Lock()
_inside = threading.local()


def _add(phase: str, seconds: float) -> None:
    with _lock:
        _totals[phase] += seconds
        _calls[phase] += 1


def _timed(phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` timing itself under `phase` (outermost call only, so recursion counts once)."""
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def run_async(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                _add(phase, time.perf_counter() - t0)
        return run_async

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        active: set[str] = _inside.__dict__.setdefault("active", set())
        if phase in active:
            return fn(*args, **kwargs)
        active.add(phase)
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            active.discard(phase)
            _add(phase, time.perf_counter() - t0)
    return run


def _patch(owner: Any, name: str, phase: str) -> None:
    setattr(owner, name, _timed(phase, getattr(owner, name)))


def instrument() -> None:
    """Wrap each phase's functions (where they are looked up: modules that imported them by name)."""
    from turnwise.env.tools import ToolBox
    from turnwise.policy import sampler
    from turnwise.policy.renderers.base import Renderer
    from turnwise.runtime import service
    from turnwise.runtime.store import TrajectoryStore
    from turnwise.track import logger
    from turnwise.train import backend, loop, step

    _patch(sampler.SamplerEngine, "_forward", "sampler: model forward")
    _patch(sampler, "sample_tokens", "sampler: token sampling")
    _patch(sampler.SamplerEngine, "_admit", "sampler: busy")
    _patch(sampler.SamplerEngine, "_decode", "sampler: busy")
    _patch(service, "plan_prompt", "runtime: plan + render")
    _patch(Renderer, "parse_assistant", "runtime: parse")
    for name in ("begin", "append_turn", "complete", "set_rewards", "fail", "get", "expected_sampling",
                 "expect_sampling", "new_trajectory_id"):
        _patch(TrajectoryStore, name, "runtime: SQLite")
    _patch(ToolBox, "call", "agent: tool calls")
    _patch(loop, "groups_to_datums", "datums")
    _patch(backend.LocalBackend, "forward_backward", "learner: forward/backward")
    _patch(backend.LocalBackend, "optim_step", "learner: optimizer")
    _patch(backend.LocalBackend, "save_weights_for_sampler", "weight sync")
    for cls in {obj for obj in vars(logger).values() if isinstance(obj, type) and hasattr(obj, "log_metrics")}:
        for name in ("log_metrics", "log_artifact", "log_rollouts"):
            if name in vars(cls):
                _patch(cls, name, "log: metrics + rollouts")
    _patch(step, "write_rollouts", "log: metrics + rollouts")
    _patch(step, "validate", "validation")
    _patch(step, "save_state", "checkpoint")


@contextlib.contextmanager
def per_step(rows: list[dict[str, Any]]) -> Iterator[None]:
    """Snapshot the totals at the end of every RL step (`end_step` is the loop's last call)."""
    from turnwise.train import loop

    original = loop.end_step

    def end_step(run: Any, step: int, groups: Any, metrics: dict[str, float], t0: float) -> None:
        original(run, step, groups, metrics, t0)
        with _lock:
            rows.append({"totals": dict(_totals), "calls": dict(_calls), "sample": metrics["speed/sample_s"],
                         "step": time.perf_counter() - t0, "tokens": metrics.get("rollout/sample_tokens", 0.0)})

    loop.end_step = end_step
    try:
        yield
    finally:
        loop.end_step = original


SEQUENTIAL = ["datums", "learner: forward/backward", "learner: optimizer", "weight sync",
              "log: metrics + rollouts", "validation", "checkpoint"]
CONCURRENT = ["runtime: plan + render", "runtime: parse", "runtime: SQLite", "agent: tool calls"]


def table(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean seconds per step of each phase over the steps after the first (the first warms up)."""
    n = len(rows) - 1

    def per_step_total(key: str) -> float:
        return (rows[-1]["totals"].get(key, 0.0) - rows[0]["totals"].get(key, 0.0)) / n

    def mean(key: str) -> float:
        return sum(r[key] for r in rows[1:]) / n

    forward, draw = per_step_total("sampler: model forward"), per_step_total("sampler: token sampling")
    busy = per_step_total("sampler: busy")
    out = {"sample (wall)": mean("sample"), "  sampler: model forward": forward,
           "  sampler: token sampling": draw, "  sampler: scheduling": busy - forward - draw,
           "  sampler: idle": mean("sample") - busy}
    out |= {f"  {k}": per_step_total(k) for k in CONCURRENT}
    out |= {k: per_step_total(k) for k in SEQUENTIAL}
    out["step (wall)"] = mean("step")
    out["other"] = out["step (wall)"] - out["sample (wall)"] - sum(out[k] for k in SEQUENTIAL)
    out["tokens"] = mean("tokens")
    out["tool calls"] = (rows[-1]["calls"].get("agent: tool calls", 0) - rows[0]["calls"].get("agent: tool calls", 0)) / n
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4, help="RL steps (the first is not averaged)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    args = p.parse_args()
    sys.path.insert(0, str(DEMO.parents[2]))  # the demo's agent is `examples.support_desk.agent`
    from turnwise.config import load_config
    from turnwise.train.job import run_train

    instrument()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        cfg = load_config(DEMO, [f"max_steps={args.steps}", "val_every=0", "tracking.progress=false",
                                 "data.test_path=null", *args.set])
        with per_step(rows):
            run_train(cfg)
    if len(rows) < 2:
        raise SystemExit("profile_step: need at least 2 RL steps (--steps)")
    out = table(rows)
    print(f"profile of one RL step: mean over steps 2-{len(rows)} of the demo ({out['tokens']:.0f} sampled "
          f"tokens and {out['tool calls']:.0f} tool calls per step)")
    print(f"{'phase':30} {'s/step':>8} {'share':>7}")
    order = ["sample (wall)", "  sampler: model forward", "  sampler: token sampling", "  sampler: scheduling",
             "  sampler: idle", *(f"  {k}" for k in CONCURRENT), *SEQUENTIAL, "other", "step (wall)"]
    for name in order:
        print(f"{name:30} {out[name]:>8.3f} {out[name] / out['step (wall)']:>7.1%}")


if __name__ == "__main__":
    main()
