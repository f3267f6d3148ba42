"""The retail agent: turnwise's standard tool loop (`run_tool_loop`) over the environment's tools.

It stops when the model answers, after `MAX_TURNS` requests, or at `transfer_to_human_agents`
(a terminal tool), and returns its reward, a few metrics, and the final state for verify.
"""

from __future__ import annotations

from typing import Any

from examples.tau_retail.environment import MAX_TURNS, TOOLBOX, messages_for, open_episode, reward
from turnwise.env import run_tool_loop


async def agent(task: dict[str, Any], client: Any, ctx: Any) -> dict[str, Any]:
    with open_episode(task) as episode:
        result = await run_tool_loop(client, ctx.model, messages_for(task), TOOLBOX, episode,
                                     max_turns=MAX_TURNS, inference_params=ctx.inference_params)
        scores = await reward(task, result, episode)
        return {"reward": scores.pop("reward"),
                "metrics": {**scores, "tool_calls": result.tool_calls, "tool_errors": result.tool_errors,
                            "transferred": float(result.terminal_tool is not None)},
                "state": await episode.state_snapshot_async()}
