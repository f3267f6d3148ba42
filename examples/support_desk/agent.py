"""The support-desk agent: the plain `openai` SDK and its own tool loop, nothing else.

turnwise calls `agent(task, client, ctx)` for every rollout. `client` is an
`openai.AsyncOpenAI` already pointed at the runtime with this rollout's trajectory header;
`ctx.model` and `ctx.inference_params` (temperature, top_p, max_tokens) come from the job.
The tools run against this rollout's own database (`open_episode`), and the agent returns
its reward, a few metrics, and the final state (which `turnwise verify` compares).
"""

from __future__ import annotations

from typing import Any

from examples.support_desk.environment import (
    SYSTEM_PROMPT,
    TOOLBOX,
    TOOLS,
    dense_reward,
    open_episode,
    reward,
)

MAX_TURNS = 4


async def agent(task: dict[str, Any], client: Any, ctx: Any, *, dense: bool = False) -> dict[str, Any]:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": task["question"]},
    ]
    tool_calls = tool_errors = 0
    final = ""
    with open_episode(task) as episode:
        for _ in range(MAX_TURNS):
            response = await client.chat.completions.create(
                model=ctx.model, messages=messages, tools=TOOLS, **ctx.inference_params)
            message = response.choices[0].message
            messages.append(message.model_dump(exclude_none=True))
            if not message.tool_calls:
                final = message.content or ""
                break
            for call in message.tool_calls:  # bad names or arguments come back as "Error: ..."
                result = await TOOLBOX.call(call.function.name, call.function.arguments, episode)
                tool_calls += 1
                tool_errors += result.is_error
                messages.append({"role": "tool", "tool_call_id": call.id, "content": result.content})
        score = (dense_reward if dense else reward)(final, episode, task)
        return {"reward": score, "metrics": {"tool_calls": tool_calls, "tool_errors": tool_errors},
                "state": episode.state_snapshot()}


async def agent_dense(task: dict[str, Any], client: Any, ctx: Any) -> dict[str, Any]:
    """The same agent scored by the dense reward (`agent.function: ...agent:agent_dense`)."""
    return await agent(task, client, ctx, dense=True)
