"""What every dispatcher satisfies (`RolloutDispatcher`), and grouping rollouts by task."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from turnwise.types import Group, RolloutResult, Task


class RolloutDispatcher(Protocol):
    """What the loops, eval and verify need from a dispatcher, whatever the agent kind."""

    async def run_groups(self, tasks: Sequence[Task], group_size: int,
                         inference_params: Mapping[str, Any]) -> list[Group]:
        """A `Group` per task with `group_size` rollouts; failed ones FAILED with their kind."""
        ...

    async def run_one(self, task: Task, inference_params: Mapping[str, Any],
                      trajectory_id: str | None = None) -> RolloutResult:
        """One rollout; `trajectory_id` names its (first attempt's) trajectory (verify routes by it)."""
        ...


def as_groups(tasks: Sequence[Task], group_size: int, results: Sequence[RolloutResult]) -> list[Group]:
    """Rollouts in task-major order -> one `Group` per task."""
    return [Group(task=t, rollouts_G=tuple(results[i * group_size:(i + 1) * group_size]))
            for i, t in enumerate(tasks)]
