"""Oracle and null rollouts on a small stateful environment: what `turnwise verify` will check."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from turnwise.env.episode import Episode
from turnwise.env.oracle import format_final_output, null_rollout, oracle_rollout
from turnwise.env.rewards import exact_match, state_match
from turnwise.env.tools import ToolBox, ToolError, tool


@tool
def cancel_order(order_id: str, state: Episode) -> dict:
    """Cancel an order.

    Args:
        order_id: Order to cancel.
    """
    if state.db.execute("UPDATE orders SET status = 'cancelled' WHERE id = ?", (order_id,)).rowcount == 0:
        raise ToolError(f"order {order_id} not found")
    return {"order_id": order_id, "ticket": state.ids.new("tk")}


TASK = {"messages": [{"role": "user", "content": "Cancel ord_2."}],
        "actions": [{"name": "cancel_order", "arguments": {"order_id": "ord_2"}}],
        "answer": {"order_id": "ord_2", "status": "cancelled"}}


def test_oracle_scores_one_null_scores_zero_and_runs_are_identical(tmp_path: Path):
    seed = tmp_path / "seed.sqlite3"
    conn = sqlite3.connect(seed)
    conn.execute("CREATE TABLE orders (id TEXT PRIMARY KEY, status TEXT)")
    conn.executemany("INSERT INTO orders VALUES (?, 'open')", [("ord_1",), ("ord_2",)])
    conn.commit()
    conn.close()
    box = ToolBox([cancel_order])

    async def oracle():
        async with Episode("task-7:0", seed_db=seed) as ep:
            res = await oracle_rollout(box, ep, TASK["messages"], TASK["actions"], TASK["answer"])
            return res, ep.state_hash()

    async def null():
        async with Episode("task-7:0", seed_db=seed) as ep:
            return null_rollout(TASK["messages"], "I cannot help."), ep.state_hash()

    (a, hash_a), (b, hash_b) = asyncio.run(oracle()), asyncio.run(oracle())
    (n, hash_n) = asyncio.run(null())
    assert a.messages == b.messages and hash_a == hash_b  # reproducible, ids included
    assert a.tool_errors == 0 and a.messages[2].content.startswith('{"order_id":"ord_2","ticket":"tk_')
    assert exact_match(a.messages, TASK["answer"]).value == 1.0
    assert exact_match(n.messages, TASK["answer"]).value == 0.0
    assert state_match(hash_n, hash_a).value == 0.0
    assert format_final_output({"b": 1, "a": 2}) == '<final_output>{"a":2,"b":1}</final_output>'
