"""The oracle agent for `turnwise verify`: the task's gold actions, then its gold reply (none
after a transfer: the episode ends there), through the same tools and reward as the agent."""

from __future__ import annotations

from typing import Any

from examples.tau_retail.environment import TOOLBOX, messages_for, open_episode, reward
from turnwise.env import oracle_rollout


async def oracle(task: dict[str, Any], client: Any, ctx: Any) -> dict[str, Any]:
    with open_episode(task) as episode:
        result = await oracle_rollout(TOOLBOX, episode, messages_for(task), task["actions"], reply=task["reply"])
        scores = await reward(task, result, episode)
        return {"reward": scores["reward"], "state": await episode.state_snapshot_async()}
