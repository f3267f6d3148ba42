"""Tools from typed functions and from OpenAI schemas; every bad call becomes a readable error."""

from __future__ import annotations

import asyncio
import enum
import json
from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from turnwise.env.episode import Episode
from turnwise.env.schema import schema_diff, validate
from turnwise.env.tools import Tool, ToolBox, ToolError, serialize_result, tool


class Reason(str, enum.Enum):
    DAMAGED = "damaged"
    LATE = "late"


@tool
def refund_order(order_id: str, amount: float, reason: Reason, notify: bool = True, ep: Episode | None = None) -> dict:
    """Refund part or all of an order.

    Args:
        order_id: The order to refund, like "ord_123".
        amount: Amount in dollars; must not exceed
            the order total.
        reason: Why the customer wants a refund.
        notify: Email the customer.
    """
    if order_id == "missing":
        raise ToolError(f"order {order_id} not found")
    if order_id == "crash":
        raise KeyError("boom")
    assert ep is not None
    ep.data.setdefault("refunds", []).append(order_id)
    return {"order_id": order_id, "refunded": amount, "reason": reason.value, "status": "ok", "notify": notify}


@tool(name="ping")
async def _ping() -> str:
    """Check the service."""
    await asyncio.sleep(0)
    return "pong"


def run(coro):
    return asyncio.run(coro)


def test_schema_from_signature_and_docstring():
    s = refund_order.schema()
    assert s["type"] == "function"
    fn = s["function"]
    assert fn["name"] == "refund_order"
    assert fn["description"] == "Refund part or all of an order."
    params = fn["parameters"]
    assert params["type"] == "object"
    assert params["additionalProperties"] is False
    assert set(params["properties"]) == {"order_id", "amount", "reason", "notify"}  # state is hidden
    assert params["required"] == ["order_id", "amount", "reason"]
    assert params["properties"]["amount"]["description"] == "Amount in dollars; must not exceed the order total."
    assert params["properties"]["notify"]["default"] is True
    assert '"title"' not in json.dumps(params)  # pydantic's titles are stripped
    reason = params["$defs"]["Reason"] if "$defs" in params else params["properties"]["reason"]
    assert reason["enum"] == ["damaged", "late"]


def test_successful_call_is_canonical_json_and_gets_state():
    box = ToolBox([refund_order, _ping])
    with Episode() as ep:
        r = run(box.call("refund_order", '{ "reason": "late", "amount": 5, "order_id": "ord_1" }', ep))
        assert not r.is_error
        assert r.content == '{"notify":true,"order_id":"ord_1","reason":"late","refunded":5.0,"status":"ok"}'
        assert ep.data == {"refunds": ["ord_1"]}
    assert run(box.call("ping", "", None)).content == "pong"  # "" means no arguments


@pytest.mark.parametrize("name,args,kind,needle", [
    ("nope", "{}", "unknown_tool", "available tools: refund_order, ping"),
    ("refund_order", '{"order_id": "a", ', "invalid_json", "not valid JSON"),
    ("refund_order", "[1, 2]", "invalid_arguments", "must be a JSON object"),
    ("refund_order", '{"order_id": "a", "reason": "late"}', "invalid_arguments", "amount: Field required"),
    ("refund_order", '{"order_id": 5, "amount": 1, "reason": "late"}', "invalid_arguments", "order_id"),
    ("refund_order", '{"order_id": "a", "amount": "1", "reason": "late"}', "invalid_arguments", "amount"),
    ("refund_order", '{"order_id": "a", "amount": 1, "reason": "lost"}', "invalid_arguments", "reason"),
    ("refund_order", '{"order_id": "a", "amount": 1, "reason": "late", "x": 1}', "invalid_arguments",
     "x: unexpected argument"),
    ("refund_order", '{"order_id": "missing", "amount": 1, "reason": "late"}', "tool_error",
     "Error: order missing not found"),
    ("refund_order", '{"order_id": "crash", "amount": 1, "reason": "late"}', "exception",
     "refund_order failed: KeyError: 'boom'"),
])
def test_every_bad_call_becomes_an_error_result(name, args, kind, needle):
    with Episode() as ep:
        r = run(ToolBox([refund_order, _ping]).call(name, args, ep))
    assert r.is_error and r.error_kind == kind
    assert r.content.startswith("Error: ")
    assert needle in r.content


def test_parameter_named_title_and_literal():
    @tool
    def tag(title: str, color: Literal["red", "blue"]) -> str:
        """Tag a ticket."""
        return f"{title}:{color}"

    params = tag.parameters
    assert set(params["properties"]) == {"title", "color"}
    assert params["properties"]["color"]["enum"] == ["red", "blue"]
    assert run(ToolBox([tag]).call("tag", '{"title": "t", "color": "red"}')).content == "t:red"
    assert run(ToolBox([tag]).call("tag", '{"title": "t", "color": "green"}')).is_error


def test_lax_mode_coerces_strings():
    @tool(strict=False)
    def add(a: int, b: int) -> int:
        """Add."""
        return a + b

    assert run(ToolBox([add]).call("add", '{"a": "2", "b": 3}')).content == "5"
    strict_add = Tool.from_function(add.fn, name="add2")
    assert run(ToolBox([strict_add]).call("add2", '{"a": "2", "b": 3}')).is_error


def test_cancellation_is_not_swallowed():
    @tool
    async def slow() -> str:
        """Sleep."""
        await asyncio.sleep(10)
        return "done"

    async def main():
        task = asyncio.create_task(ToolBox([slow]).call("slow", "{}"))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())


PRODUCTION_SCHEMA = {
    "type": "function",
    "function": {
        "name": "lookup_order",
        "description": "Look up an order.",
        "parameters": {
            "type": "object",
            "properties": {
                "order_id": {"type": "string", "pattern": "^ord_[0-9]+$"},
                "fields": {"type": "array", "items": {"$ref": "#/$defs/field"}, "maxItems": 2},
                "limit": {"type": "integer", "minimum": 1},
            },
            "required": ["order_id"],
            "additionalProperties": False,
            "$defs": {"field": {"type": "string", "enum": ["status", "total"]}},
        },
    },
}


def test_tool_from_explicit_schema_validates_against_it():
    t = Tool.from_schema(PRODUCTION_SCHEMA, lambda order_id, fields=(), limit=1: {"id": order_id, "f": list(fields)})
    box = ToolBox([t])
    assert box.schemas() == [PRODUCTION_SCHEMA]
    assert run(box.call("lookup_order", '{"order_id": "ord_1", "fields": ["total"]}')).content == \
        '{"f":["total"],"id":"ord_1"}'
    r = run(box.call("lookup_order", '{"order_id": "x1", "fields": ["total", "color", "status"], "limit": 0, "y": 1}'))
    assert r.is_error
    for needle in ["$.order_id: does not match pattern", "$.fields: more than 2 items",
                   "$.fields[1]: must be one of ['status', 'total']", "$.limit: must be >= 1",
                   "unexpected property 'y'"]:
        assert needle in r.content


def test_validator_types_and_combinators():
    assert validate(1.0, {"type": "integer"}) == []
    assert validate(True, {"type": "integer"}) != []
    assert validate(None, {"type": ["string", "null"]}) == []
    assert validate(3, {"anyOf": [{"type": "string"}, {"type": "integer"}]}) == []
    assert validate(3.5, {"anyOf": [{"type": "string"}, {"type": "integer"}]}) != []
    assert validate({}, {"type": "object", "required": ["a"]}) == ["$: missing required property 'a'"]


def test_replay_runs_gold_actions_in_order():
    box = ToolBox([refund_order])
    with Episode() as ep:
        results = run(box.replay([{"name": "refund_order", "arguments": {"order_id": "a", "amount": 1, "reason": "late"}},
                                  {"name": "refund_order", "arguments": {"order_id": "b", "amount": 2, "reason": "damaged"}}],
                                 ep))
        assert [r.is_error for r in results] == [False, False]
        assert ep.data["refunds"] == ["a", "b"]


def test_schema_diff_reports_drift():
    changed = json.loads(json.dumps(PRODUCTION_SCHEMA))
    changed["function"]["parameters"]["properties"]["limit"]["type"] = "number"
    del changed["function"]["parameters"]["required"]
    assert schema_diff(PRODUCTION_SCHEMA, PRODUCTION_SCHEMA) == []
    diff = schema_diff(changed, PRODUCTION_SCHEMA)
    assert "$.function.parameters.required: missing" in diff
    assert "$.function.parameters.properties.limit.type: 'number' != expected 'integer'" in diff


def test_duplicate_and_bad_names_rejected():
    with pytest.raises(ValueError, match="duplicate"):
        ToolBox([refund_order, refund_order])
    with pytest.raises(ValueError, match="must match"):
        Tool.from_schema({"name": "bad name"}, lambda: None)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10)


@given(st.dictionaries(st.text(max_size=5), json_values, max_size=5))
def test_serialization_ignores_key_order(d):
    shuffled = dict(reversed(list(d.items())))
    assert serialize_result(d) == serialize_result(shuffled)
    assert json.loads(serialize_result(d)) == d
