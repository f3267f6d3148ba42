"""The text the built-in tiny tokenizer is trained on.

Embedded so the tokenizer is identical on every machine with no download: customer-support
prose (orders, refunds, shipping), JSON objects, tool-call and tool-response syntax in the
Hermes and Llama-3.1 shapes, and chat-template scaffolding. Everything is generated from
fixed lists with a seeded `random.Random`, so the corpus (and the trained vocabulary) is the
same on every run.
"""

from __future__ import annotations

import json
import random

_PROSE = """\
Thank you for contacting customer support. I am sorry to hear that your order has not arrived yet.
Let me look up the order for you. Could you please share the order number and the email address
used at checkout? Once I have them I can check the shipping status and the tracking number.
Your refund has been approved and will be returned to the original payment method within five to
seven business days. If you do not see the refund after that time, please contact your bank.
The item you ordered is out of stock. We can offer a replacement, a store credit, or a full refund.
Orders can be cancelled free of charge before they ship. After shipping, please start a return
from your account page and print the prepaid return label. Returns are accepted within thirty days
of delivery for unused items in their original packaging. Damaged or defective products are
replaced at no cost. The customer asked to change the delivery address of an open order.
I have updated the address and the new estimated delivery date is shown below.
According to our policy, refunds over the order total are not allowed. A partial refund is
possible when only some items of the order are returned. The account is verified.
The user wants to know the status of a payment. The payment was declined by the card issuer.
Please try again with a different card or contact the issuer. Is there anything else I can help
you with today? Have a great day! The answer is final. The total price includes tax and shipping.
We need the customer id, the order id and the reason for the return before we can proceed.
The tool returned an error: the order was not found. Please check the order id and try again.
The product id is invalid. The quantity must be a positive integer. The discount code expired.
Your subscription renews on the first day of each month. You can cancel it at any time.
I found two orders on your account. Which one would you like me to refund?
You are a support agent. Follow the standard operating procedure (SOP) for every request.
Look up the order first, then answer. Call a tool when you need data; read the tool response.
The system prompt lists the tools. The user asks; the assistant answers; the tool responds.
Each tool is a function with a name, a description and parameters: a JSON object whose
properties are typed (string, number, integer, boolean, array, object) and some are required.
SOP: a delivered order is closed, an order in transit means the customer should wait, a damaged
parcel is refunded, a lost parcel is replaced. Escalate fraud to a human. The action is final.
Support agent for the signed-in customer. Follow the SOP. The latest order is fraud-flagged.
Gold tier customers have no refund limit; standard tier refunds above the amount limit escalate.
Search the policy knowledge base. Run a read-only SQL report: SELECT COUNT(*) FROM orders.
Replace the latest order. Refund the latest order. Escalate the latest order to a human.
"""

# Tool signature lines as the chat template renders tools: `name(arg: type, choice: a|b): description`.
_SIGNATURES = {
    "search_policy": ("Policy knowledge base.", {"topic": ["returns", "shipping", "warranty", "refunds"]}),
    "lookup_order": ("The latest order.", {}),
    "issue_refund": ("Refund the latest order.", {}),
    "create_replacement": ("Replace the latest order.", {}),
    "escalate": ("Escalate the latest order to a human.", {"reason": ["fraud", "amount_limit"]}),
    "run_report": ("Read-only SQL over tables orders and refunds.", {"sql": "string"}),
    "get_weather": ("Current weather.", {"city": "string"}),
    "cancel_order": ("Cancel an order.", {"order_id": "string"}),
}

_NAMES = ["Alice", "Bob", "Carmen", "Dmitri", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jamal",
          "Kira", "Liam", "Maya", "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tariq"]
_PRODUCTS = ["wireless headphones", "coffee maker", "running shoes", "phone case", "desk lamp",
             "backpack", "water bottle", "keyboard", "monitor", "blender", "jacket", "book"]
_STATUSES = ["pending", "processing", "shipped", "delivered", "cancelled", "returned", "refunded",
             "in_transit", "lost", "damaged"]
_REASONS = ["damaged", "wrong item", "late delivery", "changed mind", "defective", "not as described"]
_TOOLS = {
    "get_order": {"order_id": "string"},
    "lookup_order": {"order_id": "string"},
    "list_orders": {"customer_id": "string", "status": "string"},
    "refund_order": {"order_id": "string", "amount": "number", "reason": "string"},
    "cancel_order": {"order_id": "string"},
    "get_customer": {"email": "string"},
    "update_address": {"order_id": "string", "address": "string"},
    "track_shipment": {"tracking_number": "string"},
    "search_products": {"query": "string", "limit": "integer"},
}


def _tool_schema(name: str, params: dict[str, str]) -> dict[str, object]:
    return {"type": "function", "function": {
        "name": name, "description": f"{name.replace('_', ' ').capitalize()}.",
        "parameters": {"type": "object", "properties": {k: {"type": v} for k, v in params.items()},
                       "required": list(params)}}}


def _signature(name: str, description: str, params: dict[str, object]) -> str:
    args = ", ".join(f"{k}: {'|'.join(v) if isinstance(v, list) else v}" for k, v in params.items())
    return f"{name}({args}): {description}"


def _arguments(rng: random.Random, params: dict[str, str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, kind in params.items():
        if kind == "number":
            out[key] = round(rng.uniform(1, 500), 2)
        elif kind == "integer":
            out[key] = rng.randint(1, 20)
        elif key == "email":
            out[key] = f"{rng.choice(_NAMES).lower()}@example.com"
        elif key == "status":
            out[key] = rng.choice(_STATUSES)
        elif key == "reason":
            out[key] = rng.choice(_REASONS)
        elif key == "query":
            out[key] = rng.choice(_PRODUCTS)
        elif key == "address":
            out[key] = f"{rng.randint(1, 999)} Main Street, Springfield"
        else:
            out[key] = f"{key[:3].upper()}-{rng.randint(1000, 99999)}"
    return out


def _order(rng: random.Random) -> dict[str, object]:
    return {"order_id": f"ORD-{rng.randint(1000, 99999)}", "customer": rng.choice(_NAMES),
            "status": rng.choice(_STATUSES), "total": round(rng.uniform(5, 900), 2),
            "items": [{"product": rng.choice(_PRODUCTS), "quantity": rng.randint(1, 4)}]}


def tiny_corpus(n_dialogues: int = 400) -> list[str]:
    """Deterministic training texts for the tiny BPE (same list on every call)."""
    rng = random.Random(0)
    texts = [line for line in _PROSE.splitlines() if line]
    texts.append(_PROSE)
    for name, params in _TOOLS.items():
        texts.append(json.dumps(_tool_schema(name, params), separators=(",", ":")))
    for _ in range(8):
        texts += [_signature(name, *spec) for name, spec in _SIGNATURES.items()]
    for _ in range(n_dialogues):
        name, params = rng.choice(list(_TOOLS.items()))
        args = _arguments(rng, params)
        order = _order(rng)
        who = rng.choice(_NAMES)
        compact = json.dumps(args, separators=(",", ":"))
        spaced = json.dumps(args)
        texts.append(
            f"<|im_start|>user\nHi, I am {who}. My order {order['order_id']} is {order['status']}. "
            f"I want a refund for the {rng.choice(_PRODUCTS)}.<|im_end|>\n"
            f"<|im_start|>assistant\n<tool_call>\n{{\"name\": \"{name}\", \"arguments\": {spaced}}}\n"
            f"</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n{json.dumps(order)}\n"
            f"</tool_response><|im_end|>\n<|im_start|>assistant\nThe order {order['order_id']} "
            f"has a total of {order['total']} and is {order['status']}.<|im_end|>\n"
        )
        texts.append(f"<|python_tag|>{{\"name\": \"{name}\", \"parameters\": {spaced}}}<|eom_id|>")
        texts.append(f"{{\"name\":\"{name}\",\"arguments\":{compact}}}")
        texts.append(f"<final_output>{json.dumps({'order_id': order['order_id'], 'refund': order['total']})}"
                     "</final_output>")
        texts.append(f"<|im_start|>system\nYou are a support agent.<|im_end|>\n<|im_start|>user\n"
                     f"{rng.choice(_PRODUCTS)}<|im_end|>\n<|im_start|>assistant\n"
                     f"<final_output>{json.dumps({'action': rng.choice(_STATUSES)})}</final_output><|im_end|>")
        texts.append(" ".join(str(rng.randint(0, 10**rng.randint(1, 9))) for _ in range(8)))
        record = {"amount": rng.randint(5, 500), "fraud_flag": rng.random() < 0.3, "order_id": order["order_id"],
                  "status": order["status"], "tier": rng.choice(["standard", "gold"])}
        action = rng.choice(["close", "wait", "refund", "replace", "escalate", "answer", "report"])
        texts.append(f"# Tools\nCall a tool as <tool_call>\n<tool_response>\n{json.dumps(record, separators=(',', ':'))}"
                     f"\n</tool_response><final_output>{json.dumps({'action': action}, separators=(',', ':'))}"
                     "</final_output>")
    return texts
