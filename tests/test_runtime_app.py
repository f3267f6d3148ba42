"""The runtime server over HTTP on loopback, with the real OpenAI SDK: protocol, capture, every error path.

The policy is a stand-in (byte-level chat format, scripted sampler) so these run in milliseconds;
tests/test_runtime_tiny.py repeats the main flows with the real tiny model.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import contextmanager

import httpx
import openai
import pytest

from turnwise.adapter.context import RolloutContext
from turnwise.adapter.feedback import FeedbackClient
from turnwise.config import default_sampling_params
from turnwise.runtime.app import create_app
from turnwise.runtime.capture import build_segments
from turnwise.runtime.schemas import ChatCompletionResponse
from turnwise.runtime.server import RuntimeServer
from turnwise.runtime.store import TrajectoryStore
from turnwise.runtime.testing import IM_END, ByteChat, ScriptedSampler
from turnwise.types import TrajectoryStatus

CHAT = ByteChat()
TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "Find a record",
                                           "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]
CALL = CHAT.encode('<tool_call>{"name": "lookup", "arguments": {"q": "order 7", "limit": 1}}</tool_call>') + [IM_END]
DONE = CHAT.encode("Order 7 shipped.") + [IM_END]


def reply_by_last_role(prompt_ids):
    """A tool call after a user message, a final answer after a tool result."""
    text = CHAT.decode(prompt_ids)
    return DONE if text.rfind("<|im_start|>tool") > text.rfind("<|im_start|>user") else CALL


@contextmanager
def serve(tmp_path, script=reply_by_last_role, job="job-1", host="127.0.0.1", **kwargs):
    store = TrajectoryStore(tmp_path / "trajectories.db", job)
    sampler = ScriptedSampler(script)
    app = create_app(sampler=sampler, chat=CHAT, store=store, model_name="policy",
                     default_params=default_sampling_params(max_tokens=512), **kwargs)
    with RuntimeServer(app, host=host) as server:
        yield server, store, sampler


def error_of(response: httpx.Response) -> str:
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == response.status_code
    assert "Traceback" not in response.text
    return body["error"]["message"]


async def tool_conversation(ctx: RolloutContext, echo=lambda m: m.model_dump(exclude_none=True), drop_first=False):
    client = ctx.async_openai()
    messages = [{"role": "system", "content": "You are support."}, {"role": "user", "content": "Where is order 7?"}]
    first = await client.chat.completions.create(model=ctx.model, messages=messages, tools=TOOLS)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "lookup" and json.loads(call.function.arguments) == {"q": "order 7", "limit": 1}
    messages += [echo(choice.message), {"role": "tool", "tool_call_id": call.id, "content": '{"status": "shipped"}'}]
    if drop_first:
        messages = messages[1:]
    second = await client.chat.completions.create(model=ctx.model, messages=messages, tools=TOOLS)
    await client.close()
    return first, second


def test_multi_turn_tool_conversation_is_recorded_token_exactly(tmp_path):
    with serve(tmp_path) as (server, store, sampler):
        ctx = RolloutContext("traj-1", server.base_url, "policy", {})
        first, second = asyncio.run(tool_conversation(ctx))
        assert second.choices[0].message.content == "Order 7 shipped." and second.choices[0].finish_reason == "stop"
        assert first.usage.prompt_tokens == len(sampler.prompts[0])
        assert first.usage.completion_tokens == len(CALL)
        reused = second.usage.prompt_tokens_details.cached_tokens
        assert reused == len(sampler.prompts[0]) + len(CALL) > 0
        # turn 2's prompt starts with exactly what the sampler saw and produced in turn 1
        assert sampler.prompts[1][:reused] == sampler.prompts[0] + tuple(CALL)
        t = store.get("traj-1")
        assert [turn.reused_prompt_tokens for turn in t.turns] == [0, reused]
        assert t.turns[1].prompt_ids == sampler.prompts[1]
        assert [len(turn.request_messages) for turn in t.turns] == [2, 4]
        segments = build_segments(t)
        assert len(segments) == 1
        assert segments[0].tokens_T == sampler.prompts[1] + tuple(DONE)
        assert sum(segments[0].loss_mask_T) == len(CALL) + len(DONE)


def test_reserialized_tool_call_json_still_extends(tmp_path):
    def reserialize(message):
        d = message.model_dump(exclude_none=True)
        for c in d["tool_calls"]:  # other key order and whitespace, as some agent frameworks do
            c["function"]["arguments"] = json.dumps(dict(reversed(json.loads(c["function"]["arguments"]).items())),
                                                    indent=2)
        return d

    with serve(tmp_path) as (server, store, _):
        asyncio.run(tool_conversation(RolloutContext("traj-1", server.base_url, "policy", {}), echo=reserialize))
        t = store.get("traj-1")
        assert t.turns[1].reused_prompt_tokens > 0 and len(build_segments(t)) == 1


def test_dropped_message_starts_a_new_segment(tmp_path):
    with serve(tmp_path) as (server, store, _):
        _, second = asyncio.run(tool_conversation(RolloutContext("traj-1", server.base_url, "policy", {}),
                                                  drop_first=True))
        assert second.usage.prompt_tokens_details.cached_tokens == 0
        t = store.get("traj-1")
        assert t.turns[1].reused_prompt_tokens == 0 and len(build_segments(t)) == 2
        stats = httpx.get(server.base_url + "/jobs/job-1/stats").json()
        assert stats["prompt_plans"] == {"first": 1, "rewritten": 1}


def test_sync_client_sample_alias_and_response_shape(tmp_path):
    with serve(tmp_path, script=lambda p: DONE) as (server, store, _):
        ctx = RolloutContext("traj-s", server.base_url, "policy", {"temperature": 0.5})
        client = ctx.openai()
        r = client.chat.completions.create(model="anything", messages=[{"role": "user", "content": "hi"}],
                                           logprobs=True, **ctx.sampling_kwargs())
        assert r.model == "policy" and r.choices[0].message.content == "Order 7 shipped."
        assert [lp.logprob for lp in r.choices[0].logprobs.content] == [-0.5] * len(DONE)
        raw = httpx.post(server.base_url + "/sample", headers={"X-Amzn-SageMaker-Trajectory-Id": "traj-s"},
                         json={"messages": [{"role": "user", "content": "hi"}, {"role": "assistant",
                               "content": "Order 7 shipped."}, {"role": "user", "content": "thanks"}]})
        assert raw.status_code == 200 and raw.headers["X-Turnwise-Turn-Index"] == "1"
        ChatCompletionResponse.model_validate(raw.json())  # the documented schema is the real one
        assert raw.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        assert len(store.get("traj-s").turns) == 2


def test_streaming_matches_the_plain_response(tmp_path):
    async def run(base_url):
        client = RolloutContext("traj-st", base_url, "policy", {}).async_openai()
        stream = await client.chat.completions.create(
            model="policy", messages=[{"role": "user", "content": "Where is order 7?"}], tools=TOOLS, stream=True,
            stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        await client.close()
        return chunks

    with serve(tmp_path) as (server, store, _):
        chunks = asyncio.run(run(server.base_url))
        calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or ())]
        assert [c.function.name for c in calls] == ["lookup"]
        assert json.loads(calls[0].function.arguments) == {"q": "order 7", "limit": 1}
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
        assert chunks[-1].usage.completion_tokens == len(CALL)
        assert store.get("traj-st").turns[0].message.tool_calls[0].id == calls[0].id


def test_complete_and_reward_flow_is_idempotent(tmp_path):
    async def run(base_url):
        ctx = RolloutContext("traj-r", base_url, "policy", {})
        await tool_conversation(ctx)
        async with FeedbackClient(base_url) as feedback:
            assert await feedback.complete_rollout("traj-r", "ready", client_token="c1")
            assert await feedback.complete_rollout("traj-r", "ready", client_token="c1")  # retry: no-op success
            assert not await feedback.complete_rollout("traj-r", "ready")  # 409 "not in valid status": done
            assert await feedback.update_reward("traj-r", [0.0, 1.0])
            assert not await feedback.update_reward("traj-r", 1.0)

    with serve(tmp_path) as (server, _, _):
        asyncio.run(run(server.base_url))
        t = httpx.get(server.base_url + "/trajectories/traj-r", params={"tokens": "true"}).json()
        assert t["status"] == "rewarded" and t["rewards"] == [0.0, 1.0] and t["reward"] == 1.0
        assert t["segments"] == 1 and len(t["turns"]) == 2
        assert t["turns"][1]["reused_prompt_tokens"] == len(t["turns"][0]["prompt_ids"]) + len(CALL)
        assert t["usage"]["sample_tokens"] == len(CALL) + len(DONE)
        assert t["usage"]["prefill_tokens"] == sum(x["prompt_tokens"] for x in t["turns"])  # no KV reuse here
        stats = httpx.get(server.base_url + "/jobs/job-1/stats").json()
        assert stats["trajectories"]["rewarded"] == 1 and stats["usage"]["turns"] == 2


def test_error_paths(tmp_path):
    with serve(tmp_path, max_body_bytes=4096) as (server, store, _):
        url = server.base_url
        head = {"X-Turnwise-Trajectory-Id": "traj-e"}
        hi = {"messages": [{"role": "user", "content": "hi"}]}
        cases = [
            (httpx.post(url + "/v1/chat/completions", json=hi), 400, "missing header"),
            (httpx.post(url + "/v1/chat/completions", headers={**head, "content-type": "application/json"},
                        content=b"{not json"), 400, "not valid JSON"),
            (httpx.post(url + "/v1/chat/completions", headers=head, json={"messages": [{"role": "robot"}]}),
             400, "messages.0.role"),
            (httpx.post(url + "/v1/chat/completions", headers=head, json={"messages": []}), 400, "messages"),
            (httpx.post(url + "/v1/chat/completions", headers=head, json={**hi, "n": 2}), 400, "n:"),
            (httpx.post(url + "/v1/chat/completions", headers=head,
                        json={"messages": [{"role": "user", "content": "x" * 5000}]}), 413, "larger than 4096"),
            (httpx.post(url + "/complete-rollout", json={"TrajectoryId": "nope", "Status": "ready"}), 404, "unknown"),
            (httpx.post(url + "/update-reward", json={"TrajectoryId": "nope", "Rewards": [1]}), 404, "unknown"),
            (httpx.get(url + "/trajectories/nope"), 404, "unknown trajectory"),
            (httpx.post(url + "/complete-rollout", json={"TrajectoryId": "x", "Status": "done"}), 400, "Status"),
            (httpx.post(url + "/complete-rollout", json={}), 400, "TrajectoryId"),
            (httpx.get(url + "/no/such/route"), 404, "Not Found"),
        ]
        for response, status, text in cases:
            assert response.status_code == status, response.text
            assert text in error_of(response)
        # chunked upload (no Content-Length) over the limit
        big = httpx.post(url + "/v1/chat/completions", headers=head, content=iter([b"{" + b" " * 5000 + b"}"]))
        assert big.status_code == 413 and "larger than" in error_of(big)

        assert httpx.post(url + "/v1/chat/completions", headers=head, json=hi).status_code == 200
        early = httpx.post(url + "/update-reward", json={"TrajectoryId": "traj-e", "Rewards": [1.0]})
        assert early.status_code == 409 and "not in valid status" in error_of(early)
        assert httpx.post(url + "/complete-rollout", json={"TrajectoryId": "traj-e", "Status": "READY"}).status_code == 200
        nan = httpx.post(url + "/update-reward", headers={"content-type": "application/json"},
                         content=b'{"TrajectoryId": "traj-e", "Rewards": [NaN]}')
        assert nan.status_code == 400 and "invalid reward" in error_of(nan) and "finite" in error_of(nan)
        assert store.get("traj-e").status == TrajectoryStatus.FAILED  # that rollout failed, with its reason
        text_reward = httpx.post(url + "/update-reward", json={"TrajectoryId": "traj-e", "Rewards": ["1"]})
        assert text_reward.status_code == 400
        too_many = httpx.post(url + "/update-reward", json={"TrajectoryId": "traj-e", "Rewards": [1, 2, 3]})
        assert too_many.status_code == 400 and "one per turn" in error_of(too_many)
        after = httpx.post(url + "/v1/chat/completions", headers=head, json=hi)
        assert after.status_code == 409 and "not in valid status" in error_of(after)
        assert after.headers["x-should-retry"] == "false"  # the OpenAI SDK must not retry it
        again = httpx.post(url + "/complete-rollout", json={"TrajectoryId": "traj-e", "Status": "failed"})
        assert again.status_code == 409 and "not in valid status" in error_of(again)


def test_openai_client_raises_with_the_message(tmp_path):
    with serve(tmp_path) as (server, _, _):
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="missing header"):
            client.chat.completions.create(model="policy", messages=[{"role": "user", "content": "hi"}])


def test_sampler_failure_is_a_json_500_without_traceback(tmp_path):
    def broken(prompt_ids):
        raise RuntimeError("CUDA exploded at /secret/path")

    with serve(tmp_path, script=broken) as (server, store, _):
        r = httpx.post(server.base_url + "/v1/chat/completions", headers={"X-Turnwise-Trajectory-Id": "t"},
                       json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 500 and "RuntimeError" in error_of(r) and "/secret/path" not in r.text
        assert store.get("t").turns == ()  # nothing half-recorded


def test_api_keys_and_job_scoping(tmp_path):
    keys = {"key-for-job-1-xxxx": "job-1", "key-for-job-2-xxxx": "job-2"}
    with serve(tmp_path, api_keys=keys) as (server, store, _):
        url = server.base_url
        hi = {"messages": [{"role": "user", "content": "hi"}]}

        def post(path, key, body, **headers):
            auth = {"Authorization": f"Bearer {key}"} if key else {}
            return httpx.post(url + path, headers={**auth, **headers}, json=body)

        assert post("/v1/chat/completions", None, hi, **{"X-Turnwise-Trajectory-Id": "t"}).status_code == 401
        bad = post("/v1/chat/completions", "wrong-key-xxxx", hi, **{"X-Turnwise-Trajectory-Id": "t"})
        assert bad.status_code == 401 and "invalid API key" in error_of(bad)
        assert httpx.get(url + "/health").status_code == 200  # probes need no key
        ok = post("/v1/chat/completions", "key-for-job-1-xxxx", hi, **{"X-Turnwise-Trajectory-Id": "t"})
        assert ok.status_code == 200
        assert store.get("t") is not None and store.for_job("job-2").get("t") is None
        # job 2's key cannot see or seal job 1's trajectory
        other = {"Authorization": "Bearer key-for-job-2-xxxx"}
        assert httpx.get(url + "/trajectories/t", headers=other).status_code == 404
        assert post("/complete-rollout", "key-for-job-2-xxxx", {"TrajectoryId": "t", "Status": "ready"}).status_code == 404
        assert httpx.get(url + "/jobs/job-1/stats", headers=other).status_code == 403
        wrong_job = post("/complete-rollout", "key-for-job-2-xxxx",
                         {"TrajectoryId": "t", "Status": "ready", "JobArn": "arn:aws:sagemaker:x:1:job/job-1"})
        assert wrong_job.status_code == 403
        hdr = post("/v1/chat/completions", "key-for-job-2-xxxx", hi,
                   **{"X-Turnwise-Trajectory-Id": "t", "X-Amzn-SageMaker-Job-Arn": "job-1"})
        assert hdr.status_code == 403 and "not valid for job" in error_of(hdr)
        mine = post("/complete-rollout", "key-for-job-1-xxxx",
                    {"TrajectoryId": "t", "Status": "ready", "JobArn": "arn:aws:sagemaker:x:1:job/job-1"})
        assert mine.status_code == 200 and store.get("t").status == TrajectoryStatus.READY


def test_opaque_bearer_tokens_only_on_loopback_mode(tmp_path):
    opaque = {"Authorization": "Bearer c2FnZW1ha2VyLXRva2VuLW9wYXF1ZQ=="}
    body = {"messages": [{"role": "user", "content": "hi"}]}
    for mode, status in ((False, 401), (True, 200)):
        with serve(tmp_path / str(mode), api_keys=["a-real-key-123"], opaque_tokens_on_loopback=mode) as (server, _, _):
            r = httpx.post(server.base_url + "/v1/chat/completions",
                           headers={**opaque, "X-Turnwise-Trajectory-Id": "t"}, json=body)
            assert r.status_code == status


def test_refuses_to_bind_beyond_loopback_without_keys(tmp_path):
    with pytest.raises(ValueError, match="needs API keys"), serve(tmp_path, host="0.0.0.0"):
        pass


def test_openapi_spec_describes_the_protocol(tmp_path):
    with serve(tmp_path) as (server, _, _):
        spec = httpx.get(server.base_url + "/openapi.json").json()
    paths = spec["paths"]
    for path in ("/v1/chat/completions", "/sample", "/complete-rollout", "/update-reward", "/health",
                 "/v1/models", "/trajectories/{trajectory_id}", "/jobs/{job_id}/stats"):
        assert path in paths, path
    chat = paths["/v1/chat/completions"]["post"]
    headers = {p["name"] for p in chat["parameters"] if p["in"] == "header"}
    assert {"X-Amzn-SageMaker-Trajectory-Id", "X-Turnwise-Trajectory-Id", "X-Amzn-SageMaker-Job-Arn"} <= headers
    assert {"200", "400", "401", "409", "413"} <= set(chat["responses"])
    assert "text/event-stream" in chat["responses"]["200"]["content"]
    reward = spec["components"]["schemas"]["UpdateRewardRequest"]
    assert set(reward["required"]) == {"TrajectoryId", "Rewards"}
    assert "422" not in paths["/complete-rollout"]["post"]["responses"]  # validation errors are 400 here


def test_five_turn_tool_conversation_stays_one_token_exact_segment(tmp_path):
    """Four tool calls then an answer; the agent re-serializes every other tool call's JSON."""
    def four_calls_then_answer(prompt_ids):
        return CALL if CHAT.decode(prompt_ids).count("<|im_start|>tool") < 4 else DONE

    def reserialize(d):
        for c in d.get("tool_calls", []):
            c["function"]["arguments"] = json.dumps(dict(reversed(json.loads(c["function"]["arguments"]).items())),
                                                    indent=1)
        return d

    async def agent(ctx):
        client = ctx.async_openai()
        messages = [{"role": "user", "content": "Where is order 7?"}]
        for turn in range(5):
            reply = (await client.chat.completions.create(model=ctx.model, messages=messages, tools=TOOLS)).choices[0]
            message = reply.message.model_dump(exclude_none=True)
            messages.append(reserialize(message) if turn % 2 else message)
            for call in reply.message.tool_calls or ():
                messages.append({"role": "tool", "tool_call_id": call.id, "content": f'{{"hop": {turn}}}'})
        await client.close()

    with serve(tmp_path, script=four_calls_then_answer) as (server, store, sampler):
        asyncio.run(agent(RolloutContext("traj-5", server.base_url, "policy", {})))
        t = store.get("traj-5")
        assert len(t.turns) == 5 and t.turns[-1].message.content == "Order 7 shipped."
        for prev, turn in zip(t.turns[:-1], t.turns[1:], strict=True):  # each turn reuses all before it
            assert turn.reused_prompt_tokens == len(prev.prompt_ids) + len(prev.completion_ids)
            assert turn.prompt_ids[:turn.reused_prompt_tokens] == prev.prompt_ids + prev.completion_ids
        [segment] = build_segments(t)
        assert segment.tokens_T == sampler.prompts[-1] + tuple(DONE)
        assert sum(segment.loss_mask_T) == 4 * len(CALL) + len(DONE)
        sampled = [tok for tok, m in zip(segment.tokens_T, segment.loss_mask_T, strict=True) if m]
        assert sampled == 4 * list(CALL) + list(DONE)
