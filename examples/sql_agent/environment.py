"""The shop-database environment: schema, question templates, the `run_sql` tool and the reward.

Each task carries its own tiny shop (`setup`: a SQL script of a few customers and orders), so
the answer differs from task to task and the agent must read it from the database rather than
memorize it. The tool runs one SQL statement in turnwise's sandbox (`turnwise.env.run_sql`)
on a private copy built from that script: no shared state between rollouts, no live database.

Every question template has ONE gold query; the generator runs it in the same sandbox to get the
ground truth, so the reward (exact match of `<final_output>{"answer": ...}</final_output>`) is
verifiable. Shared by the agent (`agent.py`) and the generator (`generate.py`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from turnwise.env import SandboxLimits, exact_match, run_sql

SYSTEM_PROMPT = "Answer questions about the shop with run_sql."
"""Short on purpose: every prompt token dilutes the tiny model's attention to the tool's result.
The answer format is taught by the demonstrations (a larger model would be told it here)."""
SCHEMA = """\
create table customers (id integer primary key, name text);
create table orders (id integer primary key, customer_id integer, category text, status text);
"""
CATEGORIES = ("keyboard", "monitor", "jacket", "backpack")
STATUSES = ("delivered", "shipped", "lost")
NAMES = ("Alice", "Bob", "Carmen", "Dmitri", "Emma", "Farid")

TEMPLATES: dict[str, tuple[tuple[str, ...], str]] = {
    # name: (paraphrases of the question, the one gold query); lowercase SQL tokenizes shorter
    "orders": (("How many orders are there?", "How many orders do we have?"),
               "select count(*) as answer from orders"),
    "customers": (("How many customers are there?", "How many customers do we have?"),
                  "select count(*) as answer from customers"),
    "lost": (("How many orders were lost?", "How many orders got lost?"),
             "select count(*) as answer from orders where status = 'lost'"),
    "delivered": (("How many orders were delivered?", "How many orders arrived?"),
                  "select count(*) as answer from orders where status = 'delivered'"),
    "categories": (("How many categories were ordered?", "How many kinds of products were ordered?"),
                   "select count(distinct category) as answer from orders"),
}
"""Every answer is a count from 0 to 6, one token of the tiny tokenizer that the model copies from
the tool's result (the 2.9M-parameter model learns that copy after ~120 warm-start batches)."""

TOOLS: list[dict[str, Any]] = [{"type": "function", "function": {
    "name": "run_sql",
    "description": "Run SQL on customers(id, name), orders(id, customer_id, category, status).",
    "parameters": {"type": "object", "properties": {"query": {"type": "string", "description": "One SQL statement"}},
                   "required": ["query"]}}}]
TOOL_NAMES = frozenset(t["function"]["name"] for t in TOOLS)
SQL_LIMITS = SandboxLimits(wall_s=5.0, cpu_s=2, memory_mb=256)
"""A model's query runs in a subprocess with these limits; runaway SQL is stopped and reported."""
MAX_ROWS = 10


async def call_tool(name: str, arguments: str, setup: str) -> str:
    """Run one model-written tool call against the task's database; the tool message's content.

    Rows come back as compact JSON records, `[{"answer":3}]`: a gold query names its column
    `answer`, so its result holds the final answer's own tokens (`{"answer":3`) for the model to
    repeat.
    Anything wrong (unknown tool, arguments that are not a JSON object, no `query`, SQL that
    fails) becomes an `Error: ...` message the model reads on its next turn, never an exception.
    """
    if name not in TOOL_NAMES:
        return f"Error: unknown tool {name!r}; the only tool is run_sql"
    try:
        args = json.loads(arguments or "{}")
    except json.JSONDecodeError as e:
        return f"Error: arguments are not valid JSON ({e.msg})"
    if not isinstance(args, dict) or not isinstance(args.get("query"), str) or not args["query"].strip():
        return 'Error: run_sql needs {"query": "<one SQL statement>"}'
    result = await run_sql(args["query"], setup=setup, max_rows=MAX_ROWS, limits=SQL_LIMITS)
    if not result.ok:
        return f"Error: {result.error or result.status.value}"
    records = [dict(zip(result.result["columns"], row, strict=True)) for row in result.result["rows"]]
    more = f" (first {MAX_ROWS} rows)" if result.result.get("truncated") else ""
    return json.dumps(records, separators=(",", ":")) + more


def reward(final_text: str, task: Mapping[str, Any]) -> float:
    """1.0 when the last `<final_output>` JSON equals the task's `answer` ({"answer": ...}), else 0.0."""
    return exact_match(final_text, task["answer"]).value
