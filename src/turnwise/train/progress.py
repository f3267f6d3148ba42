"""Terminal progress: a rich bar for the warm start and one for RL (step, reward, pass rate, ETA)."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress


class Progress:
    def __init__(self, total_steps: int, enabled: bool = True) -> None:
        self.total_steps = total_steps
        self.enabled = enabled
        self._bar: RichProgress | None = None
        self._task = None
        if enabled:
            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                TimeRemainingColumn(), transient=False)
            self._bar.start()

    def start_warm_start(self, total: int) -> None:
        if self._bar:
            self._task = self._bar.add_task("warm start", total=total, info="")

    def update_warm_start(self, k: int, loss: float) -> None:
        if self._bar and self._task is not None:
            self._bar.update(self._task, completed=k, info=f"loss {loss:.3f}")

    def start_rl(self, start_step: int = 0) -> None:
        if self._bar:
            self._task = self._bar.add_task("RL step", total=self.total_steps, completed=start_step, info="")

    def update(self, step: int, reward: float, pass_rate: float) -> None:
        if self._bar and self._task is not None:
            self._bar.update(self._task, completed=step, info=f"reward {reward:.3f} pass {pass_rate:.2f}")

    def close(self) -> None:
        if self._bar:
            self._bar.stop()
            self._bar = None
