"""Oracle and null rollouts on a small stateful environment: what `turnwise verify` will check."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

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


@tool(terminal=True)
def transfer_to_human_agents(summary: str, state: Episode) -> str:
    """Hand the conversation to a human."""
    state.data["transferred"] = summary
    return "Transfer successful"


def test_the_oracle_stops_at_a_terminal_tool():
    box = ToolBox([transfer_to_human_agents])
    gold = [{"name": "transfer_to_human_agents", "arguments": {"summary": "refund above limit"}}]

    async def main(actions):
        with Episode() as ep:
            return await oracle_rollout(box, ep, TASK["messages"], actions, TASK["answer"]), ep.data

    result, data = asyncio.run(main(gold))
    assert result.stop_reason.value == "terminal_tool" and result.terminal_tool == "transfer_to_human_agents"
    assert result.messages[-1].role == "tool" and data == {"transferred": "refund above limit"}
    assert exact_match(result.messages, TASK["answer"]).value == 0.0  # no answer after the episode ended
    with pytest.raises(ValueError, match=r"gold action 2 \(transfer_to_human_agents\) comes after the terminal"):
        asyncio.run(main(gold * 2))


def test_box_replay_stops_at_a_terminal_tool():
    box = ToolBox([transfer_to_human_agents, cancel_order])
    with Episode() as ep:
        results = asyncio.run(box.replay([{"name": "transfer_to_human_agents", "arguments": {"summary": "s"}},
                                          {"name": "cancel_order", "arguments": {"order_id": "x"}}], ep))
    assert [r.terminal for r in results] == [True]
