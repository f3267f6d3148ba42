"""Seeded generator: tasks (train/val) and the scripted expert's demonstrations.

    .venv/bin/python -m examples.sql_agent.generate      # rewrites data/ (same seed, same files)

A task is a tiny shop (`setup`: a SQL script of 1-4 customers and 1-6 orders), a question from
one of `TEMPLATES`, its gold query and the ground truth `answer`, computed by running the gold
query through the same sandbox the agent's tool uses. Demonstrations are transcripts in the
warm start's format (`{"tools", "messages"}`, read by `turnwise.train.sft.load_demos`), whose
tool messages are produced by the agent's own `call_tool`, so the warm start sees exactly what
the agent later sends.

The expert is imperfect in one documented way, so RL has something to fix: asked how many orders
were lost or delivered, it forgets the `where status = ...` filter (and counts every order) in
`EXPERT_FORGETS_FILTER_RATE` of its demonstrations. Imitation copies that habit; the reward,
computed from the gold query, does not.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from examples.sql_agent.environment import (
    CATEGORIES,
    NAMES,
    SCHEMA,
    STATUSES,
    SYSTEM_PROMPT,
    TEMPLATES,
    TOOLS,
    call_tool,
)
from turnwise.env import format_final_output

DATA = Path(__file__).parent / "data"
SEED, N_TRAIN, N_VAL, N_DEMOS = 0, 256, 40, 640
"""What the committed data/ files were generated with."""
EXPERT_FORGETS_FILTER_RATE = 0.6
FILTERED = ("lost", "delivered")
"""The templates whose gold query filters on the status."""
SANDBOX_CONCURRENCY = 4
"""Sandboxed queries run at once while generating (each is a short subprocess)."""


def make_setup(rng: random.Random) -> str:
    """A shop of 1-4 customers and 1-6 orders, as a SQL script (schema included)."""
    customers = [f"({i}, '{name}')" for i, name in enumerate(rng.sample(NAMES, rng.randint(1, 4)), start=1)]
    orders = [f"({i}, {rng.randint(1, len(customers))}, '{rng.choice(CATEGORIES)}', '{rng.choice(STATUSES)}')"
              for i in range(1, rng.randint(1, 6) + 1)]
    return (SCHEMA + f"insert into customers values {', '.join(customers)};\n"
            + f"insert into orders values {', '.join(orders)};\n")


def make_task(rng: random.Random, index: int, split: str) -> dict[str, Any]:
    """A task row without its answer (see `answer_of`)."""
    template = rng.choice(sorted(TEMPLATES))
    questions, gold_sql = TEMPLATES[template]
    return {"id": f"{split}-{index:04d}", "template": template, "question": rng.choice(questions),
            "setup": make_setup(rng), "gold_sql": gold_sql}


def first_cell(tool_content: str) -> Any:
    """The value a query answered (first column of the first row), read from the tool message."""
    records = json.loads(tool_content)  # raises on an "Error: ..." message: a gold query must not fail
    return next(iter(records[0].values()))


def expert_sql(task: Mapping[str, Any], rng: random.Random) -> str:
    """The expert's query: the gold one, except the documented mistake (the status filter forgotten)."""
    if task["template"] in FILTERED and rng.random() < EXPERT_FORGETS_FILTER_RATE:
        return TEMPLATES["orders"][1]
    return task["gold_sql"]


async def transcript(task: Mapping[str, Any], sql: str) -> list[dict[str, Any]]:
    """The conversation of an agent that runs `sql` once and answers with its first cell."""
    call = {"id": "call_0", "type": "function",
            "function": {"name": "run_sql", "arguments": json.dumps({"query": sql})}}
    content = await call_tool("run_sql", call["function"]["arguments"], task["setup"])
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": task["question"]},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_0", "content": content},
            {"role": "assistant", "content": format_final_output({"answer": first_cell(content)})}]


async def answer_of(task: Mapping[str, Any]) -> dict[str, Any]:
    """The ground truth: the gold query's result, run in the sandbox."""
    messages = await transcript(task, task["gold_sql"])
    return {"answer": first_cell(messages[3]["content"])}


async def _bounded(limit: asyncio.Semaphore, coro: Any) -> Any:
    async with limit:
        return await coro


def draw(seed: int, n_train: int, n_val: int, n_demos: int) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """Every random choice, in order, so the files depend on `seed` only: the task rows per split
    (without answers; "demo" holds the demonstrations' tasks) and the expert's query per demo."""
    rng = random.Random(seed)
    splits = {"train": [make_task(rng, i, "train") for i in range(n_train)],
              "val": [make_task(rng, i, "val") for i in range(n_val)],
              "demo": [make_task(rng, i, "demo") for i in range(n_demos)]}
    return splits, [expert_sql(t, rng) for t in splits["demo"]]


async def build(seed: int, n_train: int, n_val: int, n_demos: int) -> dict[str, list[dict[str, Any]]]:
    """The rows of every file: train and val tasks with their sandboxed answers, and the demos."""
    splits, demo_sql = draw(seed, n_train, n_val, n_demos)
    limit = asyncio.Semaphore(SANDBOX_CONCURRENCY)
    tasks = splits["train"] + splits["val"]
    answers = await asyncio.gather(*(_bounded(limit, answer_of(t)) for t in tasks))
    for task, answer in zip(tasks, answers, strict=True):
        task["answer"] = answer
    demos = await asyncio.gather(*(_bounded(limit, transcript(t, sql))
                                   for t, sql in zip(splits["demo"], demo_sql, strict=True)))
    return {"train": splits["train"], "val": splits["val"], "demos": [{"tools": TOOLS, "messages": m} for m in demos]}


def main(seed: int = SEED, n_train: int = N_TRAIN, n_val: int = N_VAL, n_demos: int = N_DEMOS) -> None:
    DATA.mkdir(exist_ok=True)
    for name, rows in asyncio.run(build(seed, n_train, n_val, n_demos)).items():
        (DATA / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{DATA / name}.jsonl: {len(rows)} rows")


if __name__ == "__main__":
    main()
