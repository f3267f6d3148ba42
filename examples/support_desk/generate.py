"""Seeded generator: tasks (train/val/test), the scripted expert's demonstrations, the knowledge
base cassette and the production tool schemas.

    .venv/bin/python -m examples.support_desk.generate      # rewrites data/

Every ground truth comes from running the gold actions through the environment's own tools
(`oracle_rollout`), so `answer` and `expected_state` are what an SOP-perfect agent reaches.

The expert is imperfect in two documented ways, so RL has something to fix:
- it follows version 1 of the SOP for lost parcels (refund instead of replacement) in
  `EXPERT_OUTDATED_RATE` of its demonstrations;
- it overlooks the fraud flag on damaged and lost orders in `EXPERT_MISSES_FLAG_RATE` of them.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from turnwise.env import Cassette, ToolBox, oracle_rollout

DATA = Path(__file__).parent / "data"
EXPERT_OUTDATED_RATE = 0.7
EXPERT_MISSES_FLAG_RATE = 0.7
KIND_WEIGHTS = {"order": 0.8, "policy": 0.1, "report": 0.1}
STATUS_WEIGHTS = {"delivered": 0.15, "shipped": 0.15, "damaged": 0.35, "lost": 0.35}
KB = {  # the live knowledge base the cassette was recorded from
    "returns": ("Unused items can be returned within 30 days of delivery.", 30),
    "shipping": ("Standard shipping takes 5 business days.", 5),
    "warranty": ("Every product carries a 90 days warranty.", 90),
    "refunds": ("Refunds reach the original payment method within 7 days.", 7),
}
ORDER_QUESTIONS = [
    "Hi, what is going on with my order?",
    "Where is my parcel?",
    "My order has a problem. Can you help?",
    "Please check my last order for me.",
    "I need help with my order.",
    "Something is wrong with my delivery.",
]
POLICY_QUESTIONS = {
    "returns": ["How long do I have to return an item?", "What is your return window?"],
    "shipping": ["How long does shipping take?", "When will a new order arrive?"],
    "warranty": ["How long is the warranty?", "Is my product still under warranty?"],
    "refunds": ["How long does a refund take?", "When will I see my refund?"],
}
REPORT_QUESTIONS = {  # table counted -> (answer field, true when the count is ...)
    "orders": ["Is this my first order with you?", "Have I ordered from you before?"],
    "refunds": ["Have I ever been refunded?", "Did I get a refund before?"],
}
REPORT_FIELDS = {"orders": "first_order", "refunds": "refunded_before"}


def recording_toolbox() -> ToolBox:
    """The environment's tools with the knowledge base recorded afresh from `KB`, every topic
    once (the cassette replays them during training)."""
    from examples.support_desk.environment import KB_CASSETTE_PATH, make_toolbox

    KB_CASSETTE_PATH.write_text("")
    toolbox = make_toolbox(Cassette(KB_CASSETTE_PATH, record=True), live_kb=lambda topic: KB[topic][0])
    for topic in KB:
        asyncio.run(toolbox.call("search_policy", {"topic": topic}))
    return toolbox


def make_task(rng: random.Random, index: int, split: str) -> dict[str, Any]:
    kind = rng.choices(list(KIND_WEIGHTS), weights=list(KIND_WEIGHTS.values()))[0]
    customer = {"customer_id": f"C{rng.randrange(10_000, 100_000)}", "tier": rng.choice(["standard"] * 7 + ["gold"] * 3)}
    ids = [f"A{n}" for n in rng.sample(range(1000, 10_000), 4)]
    past = [{"order_id": ids[i], "amount": rng.randrange(15, 300),
             "status": rng.choice(["delivered", "refunded"]), "fraud_flag": False}
            for i in range(rng.randrange(0, 4))]
    status = rng.choices(list(STATUS_WEIGHTS), weights=list(STATUS_WEIGHTS.values()))[0]
    large = rng.random() < 0.5
    latest = {"order_id": ids[len(past)],
              "amount": rng.randrange(120, 480) if large else rng.randrange(15, 96), "status": status,
              "fraud_flag": rng.random() < (0.3 if status in ("damaged", "lost") else 0.15)}
    task: dict[str, Any] = {"id": f"{split}-{index:04d}", "kind": kind, "customer": customer,
                            "orders": [*past, latest],
                            "past_refunds": [[o["order_id"], o["amount"]] for o in past if o["status"] == "refunded"]}
    if kind == "order":
        task["question"] = rng.choice(ORDER_QUESTIONS)
    elif kind == "policy":
        topic = rng.choice(sorted(KB))
        task["question"], task["topic"] = rng.choice(POLICY_QUESTIONS[topic]), topic
    else:
        table = rng.choice(sorted(REPORT_QUESTIONS))
        task["question"], task["table"] = rng.choice(REPORT_QUESTIONS[table]), table
    return task


def decide(order: Mapping[str, Any], tier: str, *, outdated_lost: bool = False,
           ignore_flag: bool = False) -> tuple[list[dict[str, Any]], str]:
    """The SOP's order tool calls and action for an order (sop.md, rules 1-5)."""
    status = order["status"]
    if status == "delivered":
        return [], "close"
    if status == "shipped":
        return [], "wait"
    if order["fraud_flag"] and not ignore_flag:
        return [{"name": "escalate", "arguments": {"reason": "fraud"}}], "escalate"
    if status == "lost" and not outdated_lost:
        return [{"name": "create_replacement"}], "replace"
    if tier == "standard" and order["amount"] > 100:
        return [{"name": "escalate", "arguments": {"reason": "amount_limit"}}], "escalate"
    return [{"name": "issue_refund"}], "refund"


def solution(task: Mapping[str, Any], expert_rng: random.Random | None = None) -> tuple[list[dict[str, Any]], dict]:
    """Gold (or, given the expert's rng, the expert's) tool calls and final answer for a task."""
    if task["kind"] == "policy":
        return [{"name": "search_policy", "arguments": {"topic": task["topic"]}}], \
            {"action": "answer", "days": KB[task["topic"]][1]}
    if task["kind"] == "report":
        table = task["table"]
        yes = len(task["orders"]) == 1 if table == "orders" else len(task["past_refunds"]) > 0
        return [{"name": "run_report", "arguments": {"sql": f"SELECT COUNT(*) FROM {table}"}}], \
            {"action": "report", REPORT_FIELDS[table]: yes}
    order = task["orders"][-1]
    quirks = {}
    if expert_rng is not None:
        quirks = {"ignore_flag": expert_rng.random() < EXPERT_MISSES_FLAG_RATE,
                  "outdated_lost": expert_rng.random() < EXPERT_OUTDATED_RATE}
    calls, action = decide(order, task["customer"]["tier"], **quirks)
    return [{"name": "lookup_order"}, *calls], {"action": action}


async def play(toolbox: ToolBox, task: Mapping[str, Any], actions: list[dict[str, Any]],
               answer: dict) -> tuple[list[dict], dict]:
    """Run actions through the environment's tools: the transcript and the final database state."""
    from examples.support_desk.environment import SYSTEM_PROMPT, db_state, open_episode

    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": task["question"]}]
    with open_episode(task) as ep:
        result = await oracle_rollout(toolbox, ep, messages, actions, answer)
        if result.tool_errors:
            raise RuntimeError(f"{task['id']}: a gold tool call failed: {result.final_text}")
        return [m.to_openai() for m in result.messages], db_state(ep)


def main(seed: int = 0, n_train: int = 512, n_val: int = 64, n_test: int = 64, n_demos: int = 2048) -> None:
    rng = random.Random(seed)
    DATA.mkdir(exist_ok=True)
    toolbox = recording_toolbox()
    tools = toolbox.schemas()
    (DATA / "production_tools.json").write_text(json.dumps(tools, indent=2) + "\n")
    for split, n in {"train": n_train, "val": n_val, "test": n_test}.items():
        rows = []
        for i in range(n):
            task = make_task(rng, i, split)
            actions, task["answer"] = solution(task)
            task["gold_actions"] = actions
            task["expected_state"] = asyncio.run(play(toolbox, task, actions, task["answer"]))[1]
            rows.append(task)
        (DATA / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    demos = []
    for i in range(n_demos):
        task = make_task(rng, i, "demo")
        messages, _ = asyncio.run(play(toolbox, task, *solution(task, expert_rng=rng)))
        demos.append({"tools": tools, "messages": messages})
    (DATA / "demos.jsonl").write_text("".join(json.dumps(d) + "\n" for d in demos))


if __name__ == "__main__":
    main()
