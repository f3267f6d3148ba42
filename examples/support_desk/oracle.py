"""The oracle agent for `turnwise verify`: the task's gold tool calls, then its gold answer,
through the same tools and reward as the agent (it never calls the model)."""

from __future__ import annotations

from typing import Any

from examples.support_desk.environment import SYSTEM_PROMPT, TOOLBOX, open_episode, reward
from turnwise.env import oracle_rollout


async def oracle(task: dict[str, Any], client: Any, ctx: Any) -> dict[str, Any]:
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": task["question"]}]
    with open_episode(task) as episode:
        result = await oracle_rollout(TOOLBOX, episode, messages, task["gold_actions"], task["answer"])
        return {"reward": reward(result.final_text, episode, task), "state": episode.state_snapshot()}
