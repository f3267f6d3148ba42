"""Seeded generator: the retail database (tau-bench's shape), tasks and the expert's demonstrations.

    .venv/bin/python -m examples.tau_retail.generate      # rewrites data/ (same seed, same files)

No benchmark data is downloaded: `make_db` draws users, orders and products in the shape of
tau-bench's retail database (`users`, `orders`, `products`, keyed by id; orders with
`status`, `items`, `payment_history`; gift cards with a balance), smaller and with shorter ids
(the tiny model's tokenizer spends a token per digit, and every prompt holds a tool's JSON). A task is one self-contained customer instruction (tau-bench
simulates the user with an LLM; here the whole request is the first message):

- cancel: "please cancel order #W..., I no longer need it / I ordered it by mistake". Gold:
  look the order up, then cancel it with the stated reason if it is pending, else transfer to
  a human (a terminal tool; the episode ends there);
- total: "how much did I pay for order #W...?". Gold: look it up; the amount is a required
  output;
- address: "I moved to ...; update my address". Gold: `modify_user_address`, whose `state`
  argument is the US state;
- count: "my email is ...; how many orders do I have?". Gold: find the user, read their
  details; the count is a required output.

The ground truth is what the gold actions do to the database (`gold_state_match` replays
them) plus `outputs`; `reply` is the gold final message. The expert that writes the warm-start
demonstrations is imperfect in one documented way: on "ordered by mistake" cancellations it
passes reason "no longer needed" in `EXPERT_WRONG_REASON_RATE` of them, which leaves the
database different from the gold one (reward 0).
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

from turnwise.env import Episode, SeedData, ToolBox, oracle_rollout

DATA = Path(__file__).parent / "data"
SEED, N_USERS, N_ORDERS, N_TRAIN, N_VAL, N_DEMOS = 0, 40, 80, 256, 16, 32
"""What the committed data/ files were generated with."""
EXPERT_WRONG_REASON_RATE = 0.6
KIND_WEIGHTS = {"cancel": 0.45, "total": 0.2, "address": 0.15, "count": 0.2}
FIRST = ("ava", "omar", "mei", "raj", "sofia", "lucas", "emma", "yusuf", "ines", "noah")
LAST = ("moore", "khan", "ahmed", "li", "rossi", "martin", "lopez", "silva", "kim", "novak")
CITIES = (("Austin", "TX", "787"), ("Dallas", "TX", "752"), ("Columbus", "OH", "432"), ("Denver", "CO", "802"),
          ("Seattle", "WA", "981"), ("Boston", "MA", "021"))
STREETS = ("Main Street", "Elm Avenue", "River Road", "Cedar Lane", "Hillcrest Drive", "Broadway")
PRODUCTS = {"Water Bottle": {"color": ("blue", "red")}, "Desk Lamp": {"color": ("black", "white")},
            "Office Chair": {"material": ("fabric", "leather")}, "Backpack": {"size": ("small", "large")}}
REASONS = {"no longer needed": "I no longer need it", "ordered by mistake": "I ordered it by mistake"}


def _price(rng: random.Random) -> float:
    """A price whose two decimals both show (so "12.30" is never written "12.3" in the JSON)."""
    return round(rng.randrange(10, 99) + rng.randrange(1, 10) / 10 + rng.randrange(1, 10) / 100, 2)


def _address(rng: random.Random) -> dict[str, str]:
    city, state, zip3 = rng.choice(CITIES)
    return {"address1": f"{rng.randrange(1, 99)} {rng.choice(STREETS)}",
            "address2": rng.choice(["", "", f"Suite {rng.randrange(1, 9)}"]),
            "city": city, "country": "USA", "state": state, "zip": f"{zip3}{rng.randrange(10, 99)}"}


def make_db(rng: random.Random, n_users: int = N_USERS, n_orders: int = N_ORDERS) -> dict[str, Any]:
    """Users, orders and products in tau-bench's retail shape."""
    products: dict[str, Any] = {}
    for name, options in PRODUCTS.items():
        pid = str(rng.randrange(1000, 9999))
        variants = {}
        for _ in range(3):
            iid = str(rng.randrange(1000, 9999))
            variants[iid] = {"item_id": iid, "options": {k: rng.choice(v) for k, v in options.items()},
                             "available": rng.random() < 0.8, "price": _price(rng)}
        products[pid] = {"name": name, "product_id": pid, "variants": variants}
    users: dict[str, Any] = {}
    while len(users) < n_users:
        first, last = rng.choice(FIRST), rng.choice(LAST)
        uid = f"{first}_{last}_{rng.randrange(10, 99)}"
        card = f"{rng.choice(['gift_card', 'credit_card'])}_{rng.randrange(100, 999)}"
        method = {"source": card.rsplit("_", 1)[0], "id": card}
        if card.startswith("gift_card"):
            method["balance"] = float(rng.randrange(0, 200))
        users[uid] = {"user_id": uid, "name": {"first_name": first.title(), "last_name": last.title()},
                      "address": _address(rng), "email": f"{uid.replace('_', '.')}@example.com",
                      "payment_methods": {card: method}, "orders": []}
    orders: dict[str, Any] = {}
    uids = list(users)
    while len(orders) < n_orders:
        oid = f"#W{rng.randrange(1000, 9999)}"
        user = users[rng.choice(uids)]
        product = products[rng.choice(list(products))]
        iid = rng.choice(list(product["variants"]))
        variant = product["variants"][iid]
        items = [{"name": product["name"], "product_id": product["product_id"], "item_id": iid,
                  "price": variant["price"], "options": variant["options"]}]
        card = next(iter(user["payment_methods"]))
        orders[oid] = {"order_id": oid, "user_id": user["user_id"], "address": dict(user["address"]), "items": items,
                       "fulfillments": [], "status": rng.choice(["pending", "pending", "processed", "delivered"]),
                       "payment_history": [{"transaction_type": "payment", "amount": variant["price"],
                                            "payment_method_id": card}]}
        user["orders"].append(oid)
    return {"users": users, "orders": orders, "products": products}


def make_task(rng: random.Random, db: dict[str, Any], index: int, split: str) -> dict[str, Any]:
    """A task row: instruction, gold actions, required outputs, gold reply, whether it ends in a transfer."""
    kind = rng.choices(list(KIND_WEIGHTS), weights=list(KIND_WEIGHTS.values()))[0]
    task: dict[str, Any] = {"id": f"{split}-{index:04d}", "kind": kind, "outputs": [], "transfer": False}
    order_id = rng.choice(sorted(db["orders"]))
    order = db["orders"][order_id]
    user = db["users"][order["user_id"]]
    if kind == "cancel":
        reason = rng.choice(sorted(REASONS))
        task["instruction"] = f"I am {user['user_id']}. Please cancel order {order_id}: {REASONS[reason]}."
        task["reason"] = reason
        task["actions"] = [{"name": "get_order_details", "arguments": {"order_id": order_id}}]
        if order["status"] == "pending":
            task["actions"].append({"name": "cancel_pending_order", "arguments": {"order_id": order_id, "reason": reason}})
            task["reply"] = f"Order {order_id} is cancelled."
        else:
            task["actions"].append({"name": "transfer_to_human_agents",
                                    "arguments": {"summary": f"cancel {order['status']} order {order_id}"}})
            task["transfer"], task["reply"] = True, None
    elif kind == "total":
        amount = order["payment_history"][0]["amount"]
        task["instruction"] = f"How much did I pay for order {order_id}?"
        task["actions"] = [{"name": "get_order_details", "arguments": {"order_id": order_id}}]
        task["outputs"], task["reply"] = [f"{amount:.2f}"], f"You paid {amount:.2f}."
    elif kind == "address":
        new = _address(rng)
        task["instruction"] = (f"I am {user['user_id']} and I moved to {new['address1']}, {new['address2']}, "
                               f"{new['city']}, {new['state']} {new['zip']}, USA. Please update my address.")
        task["actions"] = [{"name": "modify_user_address", "arguments": {"user_id": user["user_id"], **new}}]
        task["reply"] = "Your address is updated."
    else:
        n = len(user["orders"])
        task["instruction"] = f"My email is {user['email']}. How many orders do I have?"
        task["actions"] = [{"name": "find_user_id_by_email", "arguments": {"email": user["email"]}},
                           {"name": "get_user_details", "arguments": {"user_id": user["user_id"]}}]
        task["outputs"], task["reply"] = [str(n)], f"You have {n} orders."
    return task


def expert_actions(task: dict[str, Any], rng: random.Random) -> list[dict[str, Any]]:
    """The expert's actions: the gold ones, except the documented wrong cancellation reason."""
    actions = json.loads(json.dumps(task["actions"]))
    for a in actions:
        if a["name"] == "cancel_pending_order" and a["arguments"]["reason"] == "ordered by mistake" \
                and rng.random() < EXPERT_WRONG_REASON_RATE:
            a["arguments"]["reason"] = "no longer needed"
    return actions


async def transcript(toolbox: ToolBox, seed: SeedData, task: dict[str, Any],
                     actions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation of an agent that takes `actions`, then replies (unless it transferred)."""
    from examples.tau_retail.environment import messages_for

    with Episode(seed=task["id"], data=seed) as ep:
        result = await oracle_rollout(toolbox, ep, messages_for(task), actions, reply=task["reply"])
    if result.tool_errors:
        raise RuntimeError(f"{task['id']}: a gold action failed: {result.messages[-1].content}")
    return [m.to_openai() for m in result.messages]


def draw(seed: int = SEED) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]], list[list[dict[str, Any]]]]:
    """Every random choice, in order: the database, the tasks per split, the expert's actions per demo."""
    rng = random.Random(seed)
    db = make_db(rng)
    splits = {split: [make_task(rng, db, i, split) for i in range(n)]
              for split, n in (("train", N_TRAIN), ("val", N_VAL), ("demo", N_DEMOS))}
    return db, splits, [expert_actions(t, rng) for t in splits["demo"]]


def main(seed: int = SEED) -> None:
    db, splits, demo_actions = draw(seed)
    DATA.mkdir(exist_ok=True)
    (DATA / "db.json").write_text(json.dumps(db, indent=1) + "\n")
    from examples.tau_retail.environment import TOOLBOX, TOOLS

    shared = SeedData(db)
    demos = [{"tools": TOOLS, "messages": asyncio.run(transcript(TOOLBOX, shared, t, a))}
             for t, a in zip(splits["demo"], demo_actions, strict=True)]
    for name, rows in (("train", splits["train"]), ("val", splits["val"]), ("demos", demos)):
        (DATA / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{DATA / name}.jsonl: {len(rows)} rows")


if __name__ == "__main__":
    main()
