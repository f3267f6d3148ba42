"""Replay tools: canonical lookup, miss policies, record mode with redaction."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from turnwise.env.replay import Cassette, CassetteMiss
from turnwise.env.tools import ToolBox, ToolError


def get_weather(city: str, days: int = 1, units: str = "metric") -> dict:
    """Weather forecast.

    Args:
        city: City name.
        days: Days ahead.
        units: metric or imperial.
    """
    raise AssertionError("the live function must not run during replay")


RECORDS = [
    {"tool": "get_weather", "arguments": {"city": "Paris", "days": 1, "units": "metric"}, "response": {"temp_c": 18}},
    {"tool": "get_weather", "arguments": {"units": "metric", "days": 3.0, "city": "Paris"}, "response": {"temp_c": 21}},
    {"tool": "get_weather", "arguments": {"city": "Oslo"}, "response": "snow"},
    {"tool": "get_weather", "arguments": {"city": "Atlantis"}, "error": "unknown city Atlantis"},
]


@pytest.fixture
def cassette_path(tmp_path: Path) -> Path:
    path = tmp_path / "weather.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def call(box: ToolBox, args: str, name: str = "get_weather"):
    return asyncio.run(box.call(name, args))


def test_lookup_ignores_key_order_whitespace_number_format_and_defaults(cassette_path: Path):
    box = ToolBox([Cassette(cassette_path).tool(get_weather)])
    assert call(box, '{"city":"Paris"}').content == '{"temp_c":18}'  # defaults filled in
    assert call(box, '{ "days" : 3, "city" : "Paris" }').content == '{"temp_c":21}'  # 3 == 3.0
    assert call(box, '{"city": "Oslo", "units": "metric", "days": 1}').content == "snow"
    r = call(box, '{"city": "Atlantis"}')
    assert r.is_error and r.content == "Error: unknown city Atlantis"
    assert call(box, '{"city": "Paris", "days": "3"}').is_error  # still validated against the schema


def test_miss_policies(cassette_path: Path):
    err = ToolBox([Cassette(cassette_path, miss="error").tool(get_weather)])
    r = call(err, '{"city": "Rome"}')
    assert r.is_error and "no recorded response for get_weather" in r.content

    nearest = Cassette(cassette_path, miss="nearest")
    box = ToolBox([nearest.tool(get_weather)])
    assert call(box, '{"city": "Paris", "days": 2}').content == '{"temp_c":18}'  # shares city and units
    assert nearest.stats["nearest"] == 1

    strict = ToolBox([Cassette(cassette_path, miss="raise").tool(get_weather)])
    with pytest.raises(CassetteMiss, match="get_weather"):
        call(strict, '{"city": "Rome"}')


def test_record_once_with_redaction_then_replay(tmp_path: Path):
    path = tmp_path / "new.jsonl"
    calls: list[str] = []

    async def lookup_customer(customer_id: str) -> dict:
        """Look up a customer."""
        calls.append(customer_id)
        if customer_id == "c_0":
            raise ToolError("no such customer")
        return {"id": customer_id, "name": "Ada", "api_token": "sk-live-secret"}

    def redact(rec: dict) -> dict:
        if "response" in rec:
            rec["response"] = {k: v for k, v in rec["response"].items() if k != "api_token"}
        return rec

    recording = Cassette(path, record=True, redact=redact)
    box = ToolBox([recording.tool(lookup_customer)])
    first = call(box, '{"customer_id": "c_1"}', "lookup_customer")
    again = call(box, '{ "customer_id" : "c_1" }', "lookup_customer")
    missing = call(box, '{"customer_id": "c_0"}', "lookup_customer")
    assert calls == ["c_1", "c_0"]  # the live function ran once per distinct call
    assert first.content == again.content == '{"id":"c_1","name":"Ada"}'
    assert "sk-live" not in path.read_text()
    assert recording.stats == {"hits": 1, "misses": 0, "nearest": 0, "recorded": 2}

    # replay from the production schema alone: no live function at all
    replay = ToolBox([Cassette(path, miss="raise").tool(
        {"name": "lookup_customer", "description": "Look up a customer.",
         "parameters": {"type": "object", "properties": {"customer_id": {"type": "string"}},
                        "required": ["customer_id"]}})])
    assert call(replay, '{"customer_id": "c_1"}', "lookup_customer").content == first.content
    assert call(replay, '{"customer_id": "c_0"}', "lookup_customer").content == missing.content


def test_bad_cassettes_fail_loudly(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        Cassette(tmp_path / "absent.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"tool": "x", "arguments": {}}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        Cassette(bad)
