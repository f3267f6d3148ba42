"""Task files (JSONL, CSV, Parquet) to `Task`s, and the seeded order in which training sees them.

The order is a pure function of (seed, epoch), so a resumed run can recompute the batch an
uninterrupted run would have drawn from nothing but the step number.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

from turnwise.types import Task


class TaskFileError(ValueError):
    """A task file is missing or malformed; the message names the file and the line."""


def load_tasks(path: str | Path) -> list[Task]:
    path = Path(path)
    if not path.is_file():
        raise TaskFileError(f"task file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = _read_jsonl(path)
    elif suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            rows = [dict(r) for r in csv.DictReader(f)]
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise TaskFileError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
        rows = pq.read_table(path).to_pylist()
    else:
        raise TaskFileError(f"{path}: unknown task file type {suffix!r} (use .jsonl, .csv or .parquet)")
    if not rows:
        raise TaskFileError(f"{path}: no tasks")
    tasks, seen = [], set()
    for i, row in enumerate(rows):
        task_id = str(row.get("id", i))
        if task_id in seen:
            raise TaskFileError(f"{path}: duplicate task id {task_id!r} (row {i + 1})")
        seen.add(task_id)
        tasks.append(Task(id=task_id, row=row))
    return tasks


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskFileError(f"{path}:{n}: not valid JSON: {e.msg}") from None
        if not isinstance(row, dict):
            raise TaskFileError(f"{path}:{n}: each line must be a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def epoch_order(n_tasks: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    order = list(range(n_tasks))
    if shuffle:
        random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


def batches(tasks: Sequence[Task], batch_size: int, seed: int, shuffle: bool,
            max_epochs: int, start_step: int = 0) -> Iterator[tuple[int, list[Task]]]:
    """(epoch, tasks) for each step from `start_step`; the last partial batch of an epoch is dropped.

    An epoch with fewer tasks than `batch_size` yields one batch of all of them.
    """
    per_epoch = max(1, len(tasks) // batch_size)
    size = min(batch_size, len(tasks))
    for step in range(start_step, per_epoch * max_epochs):
        epoch, k = divmod(step, per_epoch)
        order = epoch_order(len(tasks), seed, epoch, shuffle)
        yield epoch, [tasks[i] for i in order[k * size : (k + 1) * size]]
