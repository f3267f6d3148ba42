"""Porting a production toolset exactly: the footguns of issue 22, each shown failing first.

A real argument called `state`, a production schema kept byte for byte on a typed function,
production's result formatting and error text, and sync tools that must not block the event
loop every other rollout shares.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import threading
import time
from typing import Literal

import pytest

from turnwise.env import Episode, ToolBox, ToolError, tool
from turnwise.env.tools import Tool
from turnwise.eval.verify import CheckStatus, check_schemas

PRODUCTION = {  # as a production tools file has it: no additionalProperties, an empty required, extra keys
    "type": "function",
    "function": {
        "name": "modify_user_address",
        "description": "Modify the default address of a user.",
        "parameters": {
            "type": "object",
            "properties": {
                "user_id": {"type": "string", "description": "The user id, such as 'sara_doe_496'."},
                "city": {"type": "string"},
                "state": {"type": "string", "description": "The state, such as 'CA'."},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["user_id", "city", "state", "zip"],
        },
    },
}
SHIP = {"type": "function", "function": {
    "name": "schedule", "description": "Schedule a pickup.",
    "parameters": {"type": "object", "properties": {"day": {"type": "string", "format": "date"},
                                                     "speed": {"type": "string", "enum": ["slow", "fast"]}},
                   "required": []}, "strict": False}}


def run(coro):
    return asyncio.run(coro)


def test_a_real_argument_named_state_keeps_its_place_in_the_schema():
    @tool
    def modify_user_address(user_id: str, city: str, state: str, zip: str, ep: Episode) -> dict:
        """Modify the default address of a user."""
        ep.data.setdefault("users", {})[user_id] = {"city": city, "state": state, "zip": zip}
        return ep.data["users"][user_id]

    assert list(modify_user_address.parameters["properties"]) == ["user_id", "city", "state", "zip"]
    assert "state" in modify_user_address.parameters["required"]
    assert modify_user_address.state_param == "ep"  # found by its annotation, not its name
    with Episode() as ep:
        r = run(ToolBox([modify_user_address]).call(
            "modify_user_address", {"user_id": "u1", "city": "Austin", "state": "TX", "zip": "78701"}, ep))
        assert not r.is_error, r.content
        assert ep.data["users"]["u1"]["state"] == "TX"


def test_the_state_parameter_is_found_by_type_and_must_be_unique():
    @tool
    def note(text: str, episode: Episode | None = None) -> str:
        """Note."""
        return text if episode is None else f"{text}@{episode.seed}"

    assert set(note.parameters["properties"]) == {"text"}
    with Episode(seed="s") as ep:
        assert run(ToolBox([note]).call("note", {"text": "hi"}, ep)).content == "hi@s"
    with pytest.raises(TypeError, match="both take the state"):
        @tool
        def twice(a: Episode, b: Episode) -> str:
            return ""


def test_a_declared_production_schema_is_offered_byte_for_byte_and_still_typed():
    seen = {}

    @tool(schema=SHIP)
    def schedule(day: dt.date | None = None, speed: Literal["slow", "fast"] = "slow") -> str:
        seen.update(day=day, speed=speed)
        return "ok"

    box = ToolBox([schedule])
    assert json.dumps(box.schemas()) == json.dumps([SHIP])  # same bytes: key order, empty required, extra keys
    assert run(box.call("schedule", {"day": "2025-03-01", "speed": "fast"})).content == "ok"
    assert seen == {"day": dt.date(2025, 3, 1), "speed": "fast"}  # converted to the function's types
    bad = run(box.call("schedule", {"speed": "warp"}))
    assert bad.is_error and "$.speed: must be one of ['slow', 'fast']" in bad.content
    report = check_schemas([SHIP], box.schemas(), [])
    assert report.status is CheckStatus.PASS, report


def test_a_declared_schema_must_agree_with_the_function():
    with pytest.raises(TypeError, match="the schema has 'state', the function does not take it"):
        @tool(schema=PRODUCTION)
        def modify_user_address(user_id: str, city: str, zip: str, ep: Episode) -> str:
            return ""
    with pytest.raises(TypeError, match="'speed' has no default in the function but is optional"):
        @tool(schema=SHIP)
        def schedule(speed: str, day: str = "") -> str:
            return ""
    with pytest.raises(ValueError, match="differs from its schema's name"):
        tool(lambda: "", schema=SHIP, name="other")
    with pytest.raises(ValueError, match="the description comes from its schema"):
        tool(lambda: "", schema=SHIP, description="mine")


def test_the_production_schema_validates_where_pydantic_would_not():
    @tool(schema=PRODUCTION)
    def modify_user_address(user_id: str, city: str, state: str, zip: str, ep: Episode) -> dict:
        return {"user_id": user_id, "state": state}

    with Episode() as ep:
        r = run(ToolBox([modify_user_address]).call(
            "modify_user_address", {"user_id": "u", "city": "c", "state": "TX", "zip": "7870"}, ep))
    assert r.is_error and "$.zip: does not match pattern" in r.content


ORDER = {"order_id": "#W1", "status": "pending", "items": [{"name": "Lamp", "price": 12.5}]}


@pytest.mark.parametrize("mode, expected", [
    ("canonical", '{"items":[{"name":"Lamp","price":12.5}],"order_id":"#W1","status":"pending"}'),
    ("json", json.dumps(ORDER)),
    ("str", str(ORDER)),
])
def test_result_serialization_is_a_toolbox_choice(mode, expected):
    @tool
    def get_order() -> dict:
        """Order."""
        return ORDER

    assert run(ToolBox([get_order], serialize=mode).call("get_order", {})).content == expected


def test_result_serialization_is_a_per_tool_choice_over_the_toolbox():
    @tool(serialize=lambda v: json.dumps(v, indent=2))
    def pretty() -> dict:
        """Pretty."""
        return ORDER

    @tool
    def own() -> str:
        """The function's own string is always verbatim."""
        return '{"b": 1,  "a": 2}'

    box = ToolBox([pretty, own], serialize="canonical")
    assert run(box.call("pretty", {})).content == json.dumps(ORDER, indent=2)
    assert run(box.call("own", {})).content == '{"b": 1,  "a": 2}'
    with pytest.raises(ValueError, match="serialize must be one of"):
        ToolBox([own], serialize="yaml")  # type: ignore[arg-type]


def cancel_pending_order(order_id, reason):  # production code: its own checks, its own messages
    if reason not in ("no longer needed", "ordered by mistake"):
        raise ValueError("Error: invalid reason")
    return f"cancelled {order_id}"


def test_production_error_text_is_kept_verbatim():
    schema = {"name": "cancel_pending_order", "parameters": {
        "type": "object", "properties": {"order_id": {"type": "string"},
                                         "reason": {"type": "string", "enum": ["no longer needed", "ordered by mistake"]}},
        "required": ["order_id", "reason"]}}
    ours = ToolBox([Tool.from_schema(schema, cancel_pending_order)])
    raw = ToolBox([Tool.from_schema(schema, cancel_pending_order, validate=False, errors="raw")])
    args = {"order_id": "#W1", "reason": "changed my mind"}
    assert "invalid arguments for cancel_pending_order" in run(ours.call("cancel_pending_order", args)).content
    r = run(raw.call("cancel_pending_order", args))
    assert (r.is_error, r.error_kind, r.content) == (True, "exception", "Error: invalid reason")
    missing = run(raw.call("cancel_pending_order", {"order_id": "#W1"}))  # Python's own TypeError, verbatim
    assert missing.content == "cancel_pending_order() missing 1 required positional argument: 'reason'"


def test_errors_can_be_formatted_as_production_formats_them():
    @tool(errors=lambda e: f"Error: {e}")  # tau-bench's env.step: observation = f"Error: {e}"
    def get_user(user_id: str, ep: Episode) -> dict:
        """User."""
        if user_id == "gone":
            raise ToolError("user not found")
        return ep.data["users"][user_id]

    with Episode() as ep:
        box = ToolBox([get_user])
        assert run(box.call("get_user", {"user_id": "gone"}, ep)).content == "Error: user not found"
        assert run(box.call("get_user", {"user_id": "u9"}, ep)).content == "Error: 'users'"


def test_toolbox_wide_raw_errors():
    @tool
    def boom() -> str:
        """Boom."""
        raise KeyError("order #W1")

    assert run(ToolBox([boom], errors="raw").call("boom", {})).content == "'order #W1'"
    assert run(ToolBox([boom]).call("boom", {})).content == "Error: boom failed: KeyError: 'order #W1'"


def heartbeat_gap(box: ToolBox, name: str) -> tuple[float, set[str]]:
    """The longest the event loop went without running a 1 ms heartbeat while `name` ran."""
    async def main() -> float:
        gaps: list[float] = []
        done = asyncio.Event()

        async def beat() -> None:
            last = time.perf_counter()
            while not done.is_set():
                await asyncio.sleep(0.001)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        beater = asyncio.create_task(beat())
        await asyncio.sleep(0.01)
        await box.call(name, {})
        done.set()
        await beater
        return max(gaps)

    return run(main()), threads


threads: set[str] = set()


def test_sync_tools_run_off_the_event_loop():
    @tool
    def slow() -> str:
        """A blocking production call."""
        threads.add(threading.current_thread().name)
        time.sleep(0.3)
        return "done"

    inline = Tool.from_function(slow.fn, name="slow_inline", offload=False)
    box = ToolBox([slow, inline])
    gap, names = heartbeat_gap(box, "slow")
    assert gap < 0.15 and all(n.startswith("turnwise-env") for n in names)
    threads.clear()
    gap, names = heartbeat_gap(box, "slow_inline")
    assert gap >= 0.3 and names == {threading.current_thread().name}


def test_load_schemas_reads_the_production_file_by_name(tmp_path):
    import yaml

    from turnwise.env import load_schemas

    (tmp_path / "tools.json").write_text(json.dumps({"tools": [PRODUCTION, SHIP["function"]]}))
    (tmp_path / "tools.yaml").write_text(yaml.safe_dump([PRODUCTION]))
    schemas = load_schemas(tmp_path / "tools.json")
    assert list(schemas) == ["modify_user_address", "schedule"] and schemas["modify_user_address"] == PRODUCTION
    assert load_schemas(tmp_path / "tools.yaml") == {"modify_user_address": PRODUCTION}
    (tmp_path / "bad.json").write_text('{"name": "x"}')
    with pytest.raises(ValueError, match="expected a list of OpenAI tool schemas"):
        load_schemas(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="tool schema file not found"):
        load_schemas(tmp_path / "missing.json")
