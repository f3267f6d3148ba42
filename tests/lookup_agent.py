"""A one-tool agent for the eval tests: `lookup_order(order_id)` over the task's own order, then
a `<final_output>` answer rewarded by exact match. Scripted endpoints drive it exactly."""

from __future__ import annotations

import json
from typing import Any

from turnwise.env import exact_match

TOOLS = [{"type": "function", "function": {
    "name": "lookup_order", "description": "Get an order.",
    "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}}}]


def lookup_order(task: dict[str, Any], arguments: str) -> str:
    try:
        order_id = json.loads(arguments).get("order_id")
    except (json.JSONDecodeError, AttributeError):
        return json.dumps({"error": "arguments must be a JSON object"})
    if order_id != task["order"]["order_id"]:
        return json.dumps({"error": f"order {order_id} not found"})
    return json.dumps(task["order"])


async def agent(task: dict[str, Any], client: Any, ctx: Any) -> dict[str, Any]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": "Support agent."},
                                      {"role": "user", "content": task["question"]}]
    tool_calls = tool_errors = 0
    final = ""
    for _ in range(4):
        reply = await client.chat.completions.create(model=ctx.model, messages=messages, tools=TOOLS,
                                                     **ctx.inference_params)
        message = reply.choices[0].message
        messages.append(message.model_dump(exclude_none=True))
        if not message.tool_calls:
            final = message.content or ""
            break
        for call in message.tool_calls:
            result = lookup_order(task, call.function.arguments)
            tool_calls += 1
            tool_errors += '"error"' in result
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    return {"reward": exact_match(final, task["answer"]).value,
            "metrics": {"tool_calls": tool_calls, "tool_errors": tool_errors}}
