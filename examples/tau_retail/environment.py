"""A retail customer-service environment in the shape of tau-bench's retail domain, ported the
way a production toolset is ported with `turnwise.env`.

tau-bench (sierra-research/tau-bench, MIT licence) keeps its state in one JSON database
(`users`, `orders`, `products`), describes its tools with OpenAI schemas, returns
`json.dumps(...)` of the records a tool touched, answers a failed call with `"Error: ..."`,
ends the episode when the agent transfers to a human, and rewards an episode when the final
database hashes like the one its gold actions reach and every required output was said. The
database here is generated in that shape by `generate.py` (no data is downloaded), and the
tools are written for this example; what is ported is the contract:

- schemas: `data/production_tools.json` is the "production" file; every tool declares its
  entry (`@tool(schema=PRODUCTION[...])`), so the model sees it byte for byte and
  `turnwise verify` compares against the same file, while the functions stay typed;
- `modify_user_address` has a real argument called `state` (a US state): the episode arrives
  through the parameter annotated `Episode`, so nothing collides;
- results: the toolbox serializes with `json.dumps` defaults (`serialize="json"`), as the
  benchmark's tools do, not canonical JSON;
- errors: a `ToolError("order not found")` reads "Error: order not found", the benchmark's text;
- state: one `SeedData` of the database, shared copy-on-write by every episode;
- `transfer_to_human_agents` is terminal: the tool loop stops there;
- reward: `gold_state_match` (the gold actions replayed once per task into a fresh episode)
  times `outputs_in_messages`, times "ended by a transfer exactly when the gold did".
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from turnwise.env import (
    Episode,
    LoopResult,
    SeedData,
    StopReason,
    ToolBox,
    ToolError,
    gold_state_match,
    load_schemas,
    outputs_in_messages,
    tool,
)

HERE = Path(__file__).parent
DATA = HERE / "data"
PRODUCTION = load_schemas(DATA / "production_tools.json")
"""The production tool schemas, by name (what verify's schema check compares against)."""
SYSTEM_PROMPT = ("Retail support agent. Cancel only pending orders; transfer anything else to a human. "
                 "Confirm what you did in one sentence.")
MAX_TURNS = 4


def load_db() -> dict[str, Any]:
    return json.loads((DATA / "db.json").read_text())


def _orders(ep: Episode) -> dict[str, Any]:
    return ep.data["orders"]


def _users(ep: Episode) -> dict[str, Any]:
    return ep.data["users"]


@tool(schema=PRODUCTION["find_user_id_by_email"])
def find_user_id_by_email(email: str, ep: Episode) -> str:
    for user_id, user in _users(ep).items():
        if user["email"].lower() == email.lower():
            return user_id
    raise ToolError("user not found")


@tool(schema=PRODUCTION["get_user_details"])
def get_user_details(user_id: str, ep: Episode) -> dict[str, Any]:
    if user_id not in _users(ep):
        raise ToolError("user not found")
    return _users(ep)[user_id]


@tool(schema=PRODUCTION["get_order_details"])
def get_order_details(order_id: str, ep: Episode) -> dict[str, Any]:
    if order_id not in _orders(ep):
        raise ToolError("order not found")
    return _orders(ep)[order_id]


@tool(schema=PRODUCTION["cancel_pending_order"])
def cancel_pending_order(order_id: str, reason: Literal["no longer needed", "ordered by mistake"],
                         ep: Episode) -> dict[str, Any]:
    if order_id not in _orders(ep):
        raise ToolError("order not found")
    order = _orders(ep)[order_id]
    if order["status"] != "pending":
        raise ToolError("non-pending order cannot be cancelled")
    refunds = [{"transaction_type": "refund", "amount": p["amount"], "payment_method_id": p["payment_method_id"]}
               for p in order["payment_history"] if p["transaction_type"] == "payment"]
    for refund in refunds:  # a gift card is refunded at once
        if refund["payment_method_id"].startswith("gift_card"):
            method = _users(ep)[order["user_id"]]["payment_methods"][refund["payment_method_id"]]
            method["balance"] = round(method["balance"] + refund["amount"], 2)
    order["status"] = "cancelled"
    order["cancel_reason"] = reason
    order["payment_history"].extend(refunds)
    return order


@tool(schema=PRODUCTION["modify_user_address"])
def modify_user_address(user_id: str, address1: str, address2: str, city: str, state: str, country: str,
                        zip: str, ep: Episode) -> dict[str, Any]:
    if user_id not in _users(ep):
        raise ToolError("user not found")
    user = _users(ep)[user_id]
    user["address"] = {"address1": address1, "address2": address2, "city": city, "state": state,
                       "country": country, "zip": zip}
    return user


@tool(schema=PRODUCTION["transfer_to_human_agents"], terminal=True)
def transfer_to_human_agents(summary: str) -> str:
    return "Transfer successful"


TOOLBOX = ToolBox([find_user_id_by_email, get_user_details, get_order_details, cancel_pending_order,
                   modify_user_address, transfer_to_human_agents], serialize="json")
TOOLS = TOOLBOX.schemas()
SEED = SeedData(load_db())
"""The database every episode starts from, shared copy-on-write."""


def open_episode(task: Mapping[str, Any]) -> Episode:
    """A rollout's private state: its own view of the database."""
    return Episode(seed=str(task["id"]), data=SEED)


def messages_for(task: Mapping[str, Any]) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": task["instruction"]}]


async def replay_gold(task: Mapping[str, Any]) -> Episode:
    """A fresh episode with the task's gold actions replayed (`gold_state_match` hashes it once per task)."""
    ep = open_episode(task)
    results = await TOOLBOX.replay(task["actions"], ep)
    failed = [r.content for r in results if r.is_error]
    if failed:
        ep.close()
        raise ValueError(f"task {task['id']}: a gold action failed: {failed[0]}")
    return ep


async def reward(task: Mapping[str, Any], result: LoopResult, ep: Episode) -> dict[str, float]:
    """tau-bench's reward (database hash and outputs) times ending by a transfer when the gold does."""
    state = (await gold_state_match(task, replay_gold, ep)).value
    outputs = outputs_in_messages(task["outputs"], result.messages).value
    ended_right = float((result.stop_reason is StopReason.TERMINAL_TOOL) == task["transfer"])
    return {"reward": state * outputs * ended_right, "state_match": state, "outputs_match": outputs,
            "ended_right": ended_right}
