"""The support-desk agent: the plain `openai` SDK and its own tool loop, nothing else.

turnwise calls `agent(task, client, ctx)` for every rollout. `client` is an
`openai.AsyncOpenAI` already pointed at the runtime with this rollout's trajectory header;
`ctx.inference_params` carries temperature, top_p and max_tokens for this job.
"""

from __future__ import annotations

from typing import Any

from examples.support_desk.environment import SYSTEM_PROMPT, TOOLS, lookup_order, reward

MAX_TURNS = 4


async def agent(task: dict[str, Any], client: Any, ctx: Any) -> dict[str, Any]:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": task["question"]},
    ]
    tool_calls = tool_errors = 0
    final = ""
    for _ in range(MAX_TURNS):
        response = await client.chat.completions.create(
            model=ctx.model, messages=messages, tools=TOOLS, **ctx.inference_params)
        message = response.choices[0].message
        messages.append(message.model_dump(exclude_none=True))
        if not message.tool_calls:
            final = message.content or ""
            break
        for call in message.tool_calls:
            tool_calls += 1
            if call.function.name == "lookup_order":
                result = lookup_order(task, call.function.arguments)
            else:
                result = f'{{"error": "unknown tool {call.function.name}"}}'
            tool_errors += '"error"' in result
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    return {"reward": reward(final, task["answer"]),
            "metrics": {"tool_calls": tool_calls, "tool_errors": tool_errors}}
