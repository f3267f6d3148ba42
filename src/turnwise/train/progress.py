"""What a run prints while it trains, on stdout: rich bars on a terminal (warm start, then RL:
step, reward, pass rate, ETA), plain lines elsewhere (a CI log, `nohup`, `make demo > log.txt`):
one per RL step and one every `warm_start_every`-th of the warm start's steps, e.g.

    warm start 12/38  loss 1.734  ETA 0:00:41
    step 3/30  reward 0.512  pass 0.438  val 0.611  tokens/s 1840  12.1 s/step  ETA 0:05:39
    checkpoint step_00003: runs/support_desk-.../checkpoints/step_00003

Third-party progress bars (Hugging Face's shard writing and weight loading, MLflow's artifact
downloads) are silenced for the run: they would add lines that say nothing about training.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from datetime import timedelta
from typing import TextIO

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

from turnwise.track import silence_third_party_bars


def _eta(seconds: float) -> str:
    return str(timedelta(seconds=round(max(0.0, seconds))))


class Progress:
    """`bars`: rich bars (a terminal); `lines`: one plain line per step (anything else)."""

    def __init__(self, total_steps: int, *, bars: bool = True, lines: bool = False, stream: TextIO | None = None,
                 warm_start_lines: int = 10) -> None:
        self.total_steps = total_steps
        self.lines = lines
        self.stream = stream or sys.stdout
        self.warm_start_lines = warm_start_lines
        """Warm-start lines per warm start (one every total/this steps, and the last)."""
        self._bar: RichProgress | None = None
        self._task = None
        self._phase_total = 0
        self._phase_start = 0
        self._t0 = time.monotonic()
        silence_third_party_bars()
        if bars:
            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                TimeRemainingColumn(), transient=False)
            self._bar.start()

    @property
    def enabled(self) -> bool:
        return self._bar is not None

    def _print(self, line: str) -> None:
        if self.lines:
            print(line, file=self.stream, flush=True)

    def _eta(self, done: int) -> str:
        """Time left in the phase, at the mean pace of its steps so far."""
        n = done - self._phase_start
        if n <= 0:
            return "?"
        return _eta((time.monotonic() - self._t0) / n * (self._phase_total - done))

    def start_warm_start(self, total: int) -> None:
        self._phase_total, self._phase_start, self._t0 = total, 0, time.monotonic()
        if self._bar:
            self._task = self._bar.add_task("warm start", total=total, info="")

    def update_warm_start(self, k: int, loss: float) -> None:
        if self._bar and self._task is not None:
            self._bar.update(self._task, completed=k, info=f"loss {loss:.3f}")
        every = max(1, math.ceil(self._phase_total / max(1, self.warm_start_lines)))
        if k % every == 0 or k == self._phase_total:
            self._print(f"warm start {k}/{self._phase_total}  loss {loss:.3f}  ETA {self._eta(k)}")

    def start_rl(self, start_step: int = 0) -> None:
        self._phase_total, self._phase_start, self._t0 = self.total_steps, start_step, time.monotonic()
        if self._bar:
            self._task = self._bar.add_task("RL step", total=self.total_steps, completed=start_step, info="")

    def update(self, step: int, metrics: Mapping[str, float], val_reward: float | None = None) -> None:
        """After RL step `step`: its metrics (reward, pass rate, throughput, step time) and the
        validation reward when validation ran after it."""
        reward, pass_rate = metrics.get("reward/mean", 0.0), metrics.get("reward/pass_rate", 0.0)
        if self._bar and self._task is not None:
            self._bar.update(self._task, completed=step, info=f"reward {reward:.3f} pass {pass_rate:.2f}")
        parts = [f"step {step}/{self.total_steps}", f"reward {reward:.3f}", f"pass {pass_rate:.3f}"]
        if val_reward is not None:
            parts.append(f"val {val_reward:.3f}")
        if "speed/tokens_per_s" in metrics:
            parts.append(f"tokens/s {metrics['speed/tokens_per_s']:.0f}")
        if "speed/step_s" in metrics:
            parts.append(f"{metrics['speed/step_s']:.1f} s/step")
        self._print("  ".join([*parts, f"ETA {self._eta(step)}"]))

    def validated(self, step: int, val_reward: float | None) -> None:
        """Validation that ran outside a step's line (before RL, after the last step)."""
        if val_reward is not None:
            self._print(f"{'before RL' if step == 0 else f'step {step}/{self.total_steps}'}  val {val_reward:.3f}")

    def note(self, line: str) -> None:
        """A plain line (a checkpoint written); on a terminal the bars say enough."""
        self._print(line)

    def close(self) -> None:
        if self._bar:
            self._bar.stop()
            self._bar = None
