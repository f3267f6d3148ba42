"""Seeded generator of support-desk tasks and of the scripted expert's demonstrations.

    python -m examples.support_desk.generate      # rewrites data/*.jsonl

The expert is imperfect in one documented way, so RL has something to fix: for lost parcels
it follows the outdated SOP (refund instead of replace) in 60% of its demonstrations.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from examples.support_desk.environment import SOP, SYSTEM_PROMPT, TOOLS, order_record

DATA = Path(__file__).parent / "data"
QUESTIONS = [
    "Hi, what is going on with my order?",
    "Where is my parcel?",
    "My order has a problem. Can you help?",
    "Please check my last order for me.",
    "I need help with my order.",
    "Something is wrong with my delivery.",
]
EXPERT_OUTDATED_RATE = 0.6


def make_task(rng: random.Random, index: int, split: str) -> dict:
    order_id = str(rng.randrange(1000, 10000))
    status = rng.choice(sorted(SOP))
    return {
        "id": f"{split}-{index:04d}",
        "question": rng.choice(QUESTIONS),
        "order": {"order_id": order_id, "status": status},
        "answer": {"action": SOP[status]},
    }


def expert_demo(task: dict, rng: random.Random) -> dict:
    order = task["order"]
    action = SOP[order["status"]]
    if order["status"] == "lost" and rng.random() < EXPERT_OUTDATED_RATE:
        action = "refund"
    final = json.dumps({"action": action})
    return {"tools": TOOLS, "messages": [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": task["question"]},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_0", "type": "function", "function": {"name": "lookup_order", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_0",
         "content": order_record(order)},
        {"role": "assistant", "content": f"<final_output>{final}</final_output>"},
    ]}


def main(seed: int = 0, n_train: int = 512, n_val: int = 64, n_test: int = 64, n_demos: int = 512) -> None:
    rng = random.Random(seed)
    DATA.mkdir(exist_ok=True)
    splits = {"train": n_train, "val": n_val, "test": n_test}
    tasks = {s: [make_task(rng, i, s) for i in range(n)] for s, n in splits.items()}
    for split, rows in tasks.items():
        (DATA / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    demo_tasks = [make_task(rng, i, "demo") for i in range(n_demos)]
    (DATA / "demos.jsonl").write_text("".join(json.dumps(expert_demo(t, rng)) + "\n" for t in demo_tasks))


if __name__ == "__main__":
    main()
