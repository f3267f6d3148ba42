"""The SQL agent, served over HTTP: the plain `openai` SDK, its own tool loop, the turnwise adapter.

    .venv/bin/python -m examples.sql_agent.agent --port 8080     # POST /rollout, GET /health

The trainer (`agent.kind: http`) POSTs each rollout to `/rollout` (the managed agent SDK's
contract, DESIGN.md); `@rollout_handler` builds the `RolloutContext` from that payload, and
after `sql_agent` returns it reports complete-rollout and update-reward to the runtime server
itself. The agent never imports the trainer: it could run on another machine.
"""

from __future__ import annotations

import argparse
from typing import Any

from examples.sql_agent.environment import SYSTEM_PROMPT, TOOLS, call_tool, reward
from turnwise.adapter import RolloutContext, rollout_handler, serve_agent

MAX_TURNS = 3
"""Model calls per rollout: the query, the answer, and one retry after a tool error."""


@rollout_handler
async def sql_agent(payload: dict[str, Any], ctx: RolloutContext) -> dict[str, Any]:
    """One rollout: ask the policy, run its SQL in the sandbox, grade its final answer."""
    task = payload["instance"]
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM_PROMPT},
                                      {"role": "user", "content": task["question"]}]
    final = ""
    # ctx.async_openai(): an AsyncOpenAI for the runtime that sends this rollout's trajectory header
    async with ctx.async_openai() as client:
        for _ in range(MAX_TURNS):
            response = await client.chat.completions.create(
                model=ctx.model, messages=messages, tools=TOOLS, **ctx.sampling_kwargs())
            message = response.choices[0].message
            messages.append(message.model_dump(exclude_none=True))
            if not message.tool_calls:
                final = message.content or ""
                break
            for call in message.tool_calls:
                content = await call_tool(call.function.name, call.function.arguments, task["setup"])
                messages.append({"role": "tool", "tool_call_id": call.id, "content": content})
    return {"reward": reward(final, task)}


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the SQL agent (POST /rollout, GET /health).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    serve_agent(sql_agent, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
