"""Requests the sampler cannot honour are refused with a 400 naming the field, never silently ignored."""

from __future__ import annotations

import openai
import pytest

from turnwise.adapter.context import RolloutContext
from turnwise.runtime.server import RuntimeServer
from turnwise.runtime.store import TrajectoryStore
from turnwise.runtime.testing import stub_app

TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}]
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("extra, field", [
    ({"tool_choice": "required", "tools": TOOLS}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "lookup"}}, "tools": TOOLS}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}},
     "response_format"),
    ({"logprobs": True, "top_logprobs": 3}, "top_logprobs"),
])
def test_unsupported_fields_are_a_400_naming_them(tmp_path, extra: dict, field: str) -> None:
    store = TrajectoryStore(tmp_path / "t.db", "job")
    with RuntimeServer(stub_app(store)) as server:
        client = RolloutContext("t", server.base_url, "stub", {}).openai()
        with pytest.raises(openai.BadRequestError, match=f"unsupported request field: {field}"):
            client.chat.completions.create(model="stub", messages=MESSAGES, **extra)
        ok = client.chat.completions.create(model="stub", messages=MESSAGES, tools=TOOLS, tool_choice="auto",
                                            response_format={"type": "text"})
        assert ok.choices[0].message.content == "ok"
    assert store.get("t").turns and len(store.get("t").turns) == 1
