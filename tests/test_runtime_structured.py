"""Forced tool use, structured output and top logprobs through the runtime, with the tiny model's real
sampler engine on loopback and the real clients (`openai`, the OpenAI Agents SDK).

The tiny model's weights are random: left alone it never writes a tool call or JSON. Every valid call
and every parsed object below is there because the grammar constrained the sampler.
"""

from __future__ import annotations

import asyncio
import json
from typing import Literal

import jsonschema
import pytest
import torch
from pydantic import BaseModel, Field

from turnwise.adapter.context import RolloutContext
from turnwise.config import ModelConfig, default_sampling_params
from turnwise.policy.logprobs import token_logprobs
from turnwise.runtime.app import create_app
from turnwise.runtime.capture import build_segments
from turnwise.runtime.server import RuntimeServer
from turnwise.runtime.store import TrajectoryStore

REFUND = {"type": "object", "additionalProperties": False, "required": ["order_id", "reason"], "properties": {
    "order_id": {"type": "string", "maxLength": 6}, "reason": {"type": "string", "enum": ["damaged", "late"]},
    "amount": {"type": "integer", "minimum": 1, "maximum": 99}}}
LOOKUP = {"type": "object", "additionalProperties": False, "required": ["order_id"],
          "properties": {"order_id": {"type": "string", "maxLength": 5}}}
TOOLS = [{"type": "function", "function": {"name": "issue_refund", "description": "Refund", "parameters": REFUND}},
         {"type": "function", "function": {"name": "lookup_order", "description": "Find", "parameters": LOOKUP}}]
SCHEMAS = {"issue_refund": REFUND, "lookup_order": LOOKUP}
QUESTION = [{"role": "user", "content": "Where is order 7?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from turnwise.policy.chat import ChatFormat
    from turnwise.policy.load import load_policy
    from turnwise.policy.sampler import SamplerEngine

    model, tokenizer = load_policy(ModelConfig())
    store = TrajectoryStore(tmp_path_factory.mktemp("db") / "t.db", "job")
    chat = ChatFormat(tokenizer)
    with SamplerEngine(model, tokenizer, max_batch_size=8) as engine:
        app = create_app(sampler=engine, chat=chat, store=store, model_name="tiny",
                         default_params=default_sampling_params(temperature=1.0, max_tokens=160))
        with RuntimeServer(app) as s:
            yield s, store, model


def _client(server, trajectory: str):
    return RolloutContext(trajectory, server[0].base_url, "tiny", {}).openai()


def test_tool_choice_required_gets_a_valid_call_and_the_turn_is_recorded_token_exactly(server):
    client = _client(server, "required")
    r = client.chat.completions.create(model="tiny", messages=QUESTION, tools=TOOLS, tool_choice="required",
                                       logprobs=True)
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and calls
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    # the tool result extends the same segment: the constrained tokens are the stored ones
    follow = [*QUESTION, r.choices[0].message.model_dump(exclude_none=True),
              *({"role": "tool", "tool_call_id": c.id, "content": "shipped"} for c in calls)]
    r2 = client.chat.completions.create(model="tiny", messages=follow, tools=TOOLS, max_tokens=4)
    t = server[1].get("required")
    assert len(build_segments(t)) == 1 and r2.usage.prompt_tokens_details.cached_tokens == \
        len(t.turns[0].prompt_ids) + len(t.turns[0].completion_ids)
    assert [lp.logprob for lp in r.choices[0].logprobs.content] == pytest.approx(list(t.turns[0].logprobs))

    # recorded logprobs are the masked distribution's; the trainer recomputes the unmasked model's, lower
    model = server[2]
    ids = torch.tensor([[*t.turns[0].prompt_ids, *t.turns[0].completion_ids]])
    with torch.no_grad():
        full, _ = token_logprobs(model, ids, torch.ones_like(ids), temperature=1.0)
    recomputed = full[0, len(t.turns[0].prompt_ids):]
    recorded = torch.tensor(t.turns[0].logprobs)
    assert bool((recorded >= recomputed - 1e-4).all()) and bool((recorded > recomputed + 1e-3).any())


def test_a_named_function_is_called_once(server):
    r = _client(server, "named").chat.completions.create(
        model="tiny", messages=QUESTION, tools=TOOLS, tool_choice={"type": "function",
                                                                   "function": {"name": "lookup_order"}})
    calls = r.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["lookup_order"]
    jsonschema.validate(json.loads(calls[0].function.arguments), LOOKUP)


def test_json_object_and_json_schema(server):
    client = _client(server, "json")
    schema = {"type": "object", "additionalProperties": False, "required": ["city", "nights"], "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome"]}, "nights": {"type": "integer", "minimum": 1,
                                                                         "maximum": 9}}}
    r = client.chat.completions.create(model="tiny", messages=QUESTION, response_format={
        "type": "json_schema", "json_schema": {"name": "trip", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    r = _client(server, "json-object").chat.completions.create(
        model="tiny", messages=QUESTION, response_format={"type": "json_object"}, max_tokens=300, seed=3)
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content), dict)


def test_what_cannot_be_honoured_is_a_400_naming_the_field(server):
    import openai

    client = _client(server, "bad")
    with pytest.raises(openai.BadRequestError, match="tool_choice names 'nope'"):
        client.chat.completions.create(model="tiny", messages=QUESTION, tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(openai.BadRequestError, match="response_format.*cannot use this JSON schema"):
        client.chat.completions.create(model="tiny", messages=QUESTION,
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "x", "schema": {"type": "strin"}}})


def _check_top(entries) -> None:
    for e in entries:
        top = [t.logprob for t in e.top_logprobs]
        assert len(top) == 5 and top == sorted(top, reverse=True) and all(lp <= 0 for lp in top)
        same = [t.logprob for t in e.top_logprobs if t.token == e.token]
        if len(same) == 1 and e.token.strip("\ufffd"):  # a token's text is unique unless it is a partial character
            assert same[0] == pytest.approx(e.logprob, abs=1e-5)
        elif not same:
            assert e.logprob <= top[-1] + 1e-5


def test_top_logprobs_plain_and_streamed(server):
    client = _client(server, "top")
    r = client.chat.completions.create(model="tiny", messages=QUESTION, logprobs=True, top_logprobs=5, max_tokens=12)
    _check_top(r.choices[0].logprobs.content)
    assert sum(any(t.token == e.token for t in e.top_logprobs) for e in r.choices[0].logprobs.content) > 0
    stream = _client(server, "top-stream").chat.completions.create(
        model="tiny", messages=QUESTION, logprobs=True, top_logprobs=5, max_tokens=12, stream=True,
        temperature=0)
    entries = [e for chunk in stream for ch in chunk.choices if ch.logprobs for e in ch.logprobs.content or ()]
    assert len(entries) == server[1].get("top-stream").turns[0].completion_ids.__len__()
    _check_top(entries)
    # greedy: the sampled token is the most likely one
    assert all(e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-5) for e in entries)
    assert all(e.top_logprobs[0].token == e.token for e in entries if e.token.strip("\ufffd"))


class Trip(BaseModel):
    city: Literal["Paris", "Rome", "Oslo"]
    nights: int = Field(ge=1, le=9)
    note: str = Field(max_length=8)


def test_openai_agents_sdk_output_type_gets_a_parsed_object(server):
    from agents import Agent, OpenAIChatCompletionsModel, Runner, set_tracing_disabled
    from openai import AsyncOpenAI

    set_tracing_disabled(True)
    ctx = RolloutContext("agents-sdk", server[0].base_url, "tiny", {})

    async def run() -> Trip:
        client: AsyncOpenAI = ctx.async_openai()
        agent = Agent(name="planner", instructions="Plan a trip.", output_type=Trip,
                      model=OpenAIChatCompletionsModel(model="tiny", openai_client=client))
        result = await Runner.run(agent, "A short trip, please.")
        await client.close()
        return result.final_output

    trip = asyncio.run(run())
    assert isinstance(trip, Trip) and trip.city in ("Paris", "Rome", "Oslo") and 1 <= trip.nights <= 9
    turn = server[1].get("agents-sdk").turns[0]
    assert Trip.model_validate_json(turn.message.content) == trip


def test_a_streamed_forced_call_arrives_as_tool_call_chunks(server):
    stream = _client(server, "stream-call").chat.completions.create(
        model="tiny", messages=QUESTION, tools=TOOLS, tool_choice={"type": "function",
                                                                   "function": {"name": "issue_refund"}}, stream=True)
    chunks = [ch for chunk in stream for ch in chunk.choices]
    calls = [c for ch in chunks for c in ch.delta.tool_calls or ()]
    assert [c.function.name for c in calls] == ["issue_refund"] and chunks[-1].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(calls[0].function.arguments), REFUND)
    assert not "".join(ch.delta.content or "" for ch in chunks).strip()
