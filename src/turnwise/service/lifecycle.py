"""Job lifecycle and categories, in the managed service's names.

    Pending -> InProgress -> Completed | Failed | Stopping -> Stopped
    Pending -> Stopped (stopped before it started) | Failed (could not start)

`Stopping` means a stop was asked (by a user, or `max_runtime_s`): the job checkpoints, then exits.
"""

from __future__ import annotations

from enum import Enum


class JobStatus(str, Enum):
    PENDING = "Pending"
    IN_PROGRESS = "InProgress"
    COMPLETED = "Completed"
    FAILED = "Failed"
    STOPPING = "Stopping"
    STOPPED = "Stopped"


TERMINAL = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.STOPPED})

TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.PENDING: frozenset({JobStatus.IN_PROGRESS, JobStatus.STOPPED, JobStatus.FAILED}),
    JobStatus.IN_PROGRESS: frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.STOPPING}),
    JobStatus.STOPPING: frozenset({JobStatus.STOPPED, JobStatus.FAILED, JobStatus.COMPLETED}),
    JobStatus.COMPLETED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.STOPPED: frozenset(),
}


class JobCategory(str, Enum):
    TRAIN = "train"
    EVAL = "eval"


CATEGORY_ALIASES = {"train": JobCategory.TRAIN, "AgentRFT": JobCategory.TRAIN,
                    "eval": JobCategory.EVAL, "AgentRFTEvaluation": JobCategory.EVAL}
"""Our names and the managed service's `JobCategory` values."""


def parse_category(name: str) -> JobCategory:
    try:
        return CATEGORY_ALIASES[name]
    except KeyError:
        raise ValueError(f"unknown job category {name!r}; use one of {', '.join(CATEGORY_ALIASES)}") from None


class TransitionError(ValueError):
    """A status change `TRANSITIONS` does not allow."""


def check_transition(old: JobStatus, new: JobStatus) -> None:
    if new != old and new not in TRANSITIONS[old]:
        raise TransitionError(f"a job cannot go from {old.value} to {new.value}")
