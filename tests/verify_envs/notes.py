"""A small notes environment for `turnwise verify` tests, clean and deliberately broken.

`agent` is clean: per-rollout state in an `Episode` (own temp dir, deterministic ids and clock),
and it returns `{"reward", "state"}` as verify's contract asks. The broken variants:
- `agent_nondeterministic`: `add_note` puts the wall clock and a random number in its response;
- `agent_leaky`: notes live in a module-level dict that each rollout resets at its start (fine
  one at a time, shared between concurrent rollouts);
- `agent_leaves_files`: writes a temp file outside its episode and never removes it.
"""

from __future__ import annotations

import random
import tempfile
import time
from typing import Any

from turnwise.env import Episode, ToolBox, oracle_rollout, run_tool_loop, tool
from turnwise.env.rewards import extract_final_output

SYSTEM = "You keep notes. Add the user's note, list the notes, then answer with the count."


@tool
def add_note(text: str, state: Episode) -> dict:
    """Add a note.

    Args:
        text: The note's text.
    """
    note = {"id": state.ids.new("note"), "text": text, "created": state.now().isoformat()}
    state.data.setdefault("notes", []).append(note)
    return note


@tool
def list_notes(state: Episode) -> list:
    """List every note."""
    return state.data.get("notes", [])


@tool(name="add_note")
def add_note_noisy(text: str, state: Episode) -> dict:
    """Add a note.

    Args:
        text: The note's text.
    """
    note = {"id": state.ids.new("note"), "text": text, "created": time.time(), "rank": random.random()}
    state.data.setdefault("notes", []).append(note)
    return note


_SHARED: dict[str, Any] = {"notes": []}


@tool(name="add_note")
def add_note_shared(text: str, state: Episode) -> dict:
    """Add a note.

    Args:
        text: The note's text.
    """
    note = {"id": state.ids.new("note"), "text": text}
    _SHARED["notes"].append(note)
    return note


@tool(name="list_notes")
def list_notes_shared(state: Episode) -> list:
    """List every note."""
    return list(_SHARED["notes"])


TOOLBOX = ToolBox([add_note, list_notes])
NOISY = ToolBox([add_note_noisy, list_notes])
SHARED = ToolBox([add_note_shared, list_notes_shared])


def reward(final_text: str, task: dict[str, Any]) -> float:
    got = extract_final_output(final_text)
    return 1.0 if got == task["answer"] else 0.0


async def _run(task: dict[str, Any], client: Any, ctx: Any, toolbox: ToolBox) -> dict[str, Any]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": task["note"]}]
    with Episode(seed=task["id"]) as ep:
        result = await run_tool_loop(client, ctx.model, messages, toolbox, ep, max_turns=4,
                                     inference_params=ctx.inference_params)
        return {"reward": reward(result.final_text, task), "metrics": result.metrics(),
                "state": ep.state_snapshot()}


async def agent(task: dict[str, Any], client: Any, ctx: Any) -> dict[str, Any]:
    return await _run(task, client, ctx, TOOLBOX)


async def agent_nondeterministic(task: dict[str, Any], client: Any, ctx: Any) -> dict[str, Any]:
    return await _run(task, client, ctx, NOISY)


async def agent_leaky(task: dict[str, Any], client: Any, ctx: Any) -> dict[str, Any]:
    _SHARED["notes"] = []  # "reset per episode": right alone, wrong when rollouts overlap
    return await _run(task, client, ctx, SHARED)


async def agent_leaves_files(task: dict[str, Any], client: Any, ctx: Any) -> dict[str, Any]:
    tempfile.mkstemp(prefix="notes-cache-")
    return await _run(task, client, ctx, TOOLBOX)


async def oracle(task: dict[str, Any], client: Any, ctx: Any) -> dict[str, Any]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": task["note"]}]
    with Episode(seed=task["id"]) as ep:
        actions = [{"name": "add_note", "arguments": {"text": task["note"]}}, {"name": "list_notes"}]
        result = await oracle_rollout(TOOLBOX, ep, messages, actions, task["answer"])
        return {"reward": reward(result.final_text, task), "state": ep.state_snapshot()}


async def generous_null(task: dict[str, Any], client: Any, ctx: Any) -> float:
    return 1.0  # a reward that pays for nothing: verify must flag it


TASKS = [{"id": f"t{i}", "note": f"buy {item}", "answer": {"count": 1}}
         for i, item in enumerate(["milk", "eggs", "tea", "rice"])]
