"""The support-desk environment: the SOP, the order tool, and the reward.

The SOP maps an order's status to the one action an agent may take:

    delivered -> close      shipped -> wait      damaged -> refund      lost -> replace

The customer is signed in, so `lookup_order` with no arguments returns their latest order. The
agent must look it up (the status is not in the customer's message), then answer with
`<final_output>{"action": "..."}</final_output>`.
The order database is per task (the task row's `order`), so concurrent rollouts share nothing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

SOP = {"delivered": "close", "shipped": "wait", "damaged": "refund", "lost": "replace"}

SYSTEM_PROMPT = "Support agent. Follow the SOP."

TOOLS = [{
    "type": "function",
    "function": {
        "name": "lookup_order",
        "description": "Get an order. Without order_id: the signed-in customer's latest order.",
        "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}},
    },
}]


def lookup_order(task: Mapping[str, Any], arguments: str) -> str:
    """Run the tool against this task's order database; errors come back as text the model sees."""
    try:
        args = json.loads(arguments)
    except json.JSONDecodeError:
        return json.dumps({"error": "arguments are not valid JSON"})
    if not isinstance(args, dict) or not isinstance(args.get("order_id", ""), str):
        return json.dumps({"error": "order_id must be a string"})
    order = task["order"]
    if args.get("order_id", order["order_id"]) != order["order_id"]:
        return json.dumps({"error": f"order {args['order_id']} not found"})
    return order_record(order)


def order_record(order: Mapping[str, Any]) -> str:
    """The tool's JSON answer for an order (status first, as the order system returns it)."""
    return json.dumps({"status": order["status"], "order_id": order["order_id"]})


_FINAL = re.compile(r"<final_output>(.*?)</final_output>", re.DOTALL)


def reward(final_text: str, answer: Mapping[str, Any]) -> float:
    """1.0 when the last <final_output> JSON object equals the ground truth exactly, else 0.0."""
    blocks = _FINAL.findall(final_text or "")
    if not blocks:
        return 0.0
    try:
        got = json.loads(blocks[-1])
    except json.JSONDecodeError:
        return 0.0
    return 1.0 if got == dict(answer) else 0.0
