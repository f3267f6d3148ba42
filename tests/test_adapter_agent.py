"""The agent side end to end: push payload -> serve_agent -> @rollout_handler -> runtime server.

Agents use the adapter's OpenAI clients, its header-injecting httpx clients (plain OpenAI SDK and
LangChain's ChatOpenAI), and report through the feedback client.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import contextmanager

import httpx
import openai
import pytest

from turnwise.adapter import (
    RolloutContext,
    async_http_client,
    create_agent_app,
    current_rollout,
    http_client,
    outcome_of,
    rollout_handler,
)
from turnwise.runtime.capture import build_segments
from turnwise.runtime.server import RuntimeServer
from turnwise.runtime.store import TrajectoryStore
from turnwise.runtime.testing import stub_app
from turnwise.types import TrajectoryStatus


@contextmanager
def runtime(tmp_path, **kwargs):
    store = TrajectoryStore(tmp_path / "t.db", "job-1")
    with RuntimeServer(stub_app(store, reply="All done.", **kwargs)) as server:
        yield server, store


def payload(endpoint: str, trajectory_id: str | None = None) -> dict:
    return {"instance": {"id": "task-1", "question": "2+2?"}, "prompt": "2+2?", "model_name": "stub",
            "metadata": {"job_arn": "arn:aws:sagemaker:us-west-2:1:training-job/job-1", "jobArn": "x",
                         "trajectory_id": trajectory_id or f"t-{uuid.uuid4().hex[:8]}", "rolloutId": "r",
                         "endpoint": endpoint, "region": "us-west-2"},
            "inference_params": {"temperature": 0.0, "max_tokens": 64, "top_p": 1.0},
            "inferenceParams": {"temperature": 0.0, "max_tokens": 64, "top_p": 1.0}}


async def two_turn_agent(task: dict, ctx: RolloutContext) -> list[float]:
    client = ctx.async_openai()
    messages = [{"role": "user", "content": task["instance"]["question"]}]
    r = await client.chat.completions.create(model=ctx.model, messages=messages, **ctx.sampling_kwargs())
    messages += [r.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": "sure?"}]
    await client.chat.completions.create(model=ctx.model, messages=messages, **ctx.sampling_kwargs())
    await client.close()
    return [0.0, 1.0]


def test_outcome_of_agent_return_values():
    assert outcome_of(0.5).rewards == (0.5,)
    assert outcome_of([1, 0]).rewards == (1.0, 0.0)
    assert outcome_of({"reward": 2}).rewards == (2.0,)
    assert outcome_of(None) == outcome_of({}) and not outcome_of(None).rewards
    assert outcome_of({"status": "error", "error": "boom"}).error == "boom"
    for bad in (True, "1", [float("nan")], [], {"reward": [None]}):
        with pytest.raises(ValueError):
            outcome_of(bad)


def test_served_agent_records_completes_and_rewards(tmp_path):
    with runtime(tmp_path) as (rt, store), RuntimeServer(create_agent_app(two_turn_agent)) as agent:
        assert httpx.get(agent.base_url + "/health").json() == {"status": "healthy"}
        body = payload(rt.base_url, "t-ok")
        r = httpx.post(agent.base_url + "/rollout", json=body, timeout=30)
        assert r.status_code == 200 and r.json() == {"status": "completed", "trajectory_id": "t-ok", "error": None}
        t = store.get("t-ok")
        assert t.status == TrajectoryStatus.REWARDED and t.rewards == (0.0, 1.0)
        assert len(t.turns) == 2 and len(build_segments(t)) == 1


def test_agent_failure_is_reported_with_its_reason(tmp_path):
    @rollout_handler
    async def crashes(task, ctx):
        client = ctx.async_openai()
        await client.chat.completions.create(model="stub", messages=[{"role": "user", "content": "hi"}])
        await client.close()
        raise RuntimeError("tool sandbox died")

    with runtime(tmp_path) as (rt, store), RuntimeServer(create_agent_app(crashes)) as agent:
        r = httpx.post(agent.base_url + "/rollout", json=payload(rt.base_url, "t-bad"), timeout=30)
        assert r.json()["status"] == "failed" and "tool sandbox died" in r.json()["error"]
        t = store.get("t-bad")
        assert t.status == TrajectoryStatus.FAILED and "RuntimeError: tool sandbox died" in t.error
        bad = httpx.post(agent.base_url + "/rollout", json={"instance": {}}, timeout=30)
        assert bad.status_code == 400 and "metadata" in bad.json()["error"]["message"]


def test_background_rollouts_and_error_status(tmp_path):
    async def says_error(task):
        client = RolloutContext.from_payload(task).async_openai()
        await client.chat.completions.create(model="stub", messages=[{"role": "user", "content": "hi"}])
        await client.close()
        return {"status": "error", "error": "gave up"}

    with runtime(tmp_path) as (rt, store), RuntimeServer(create_agent_app(says_error, wait=False)) as agent:
        r = httpx.post(agent.base_url + "/rollout", json=payload(rt.base_url, "t-bg"), timeout=30)
        assert r.status_code == 202 and r.json()["status"] == "accepted"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and store.get("t-bg") is None or store.get("t-bg").status.value == "in_progress":
            time.sleep(0.02)
        t = store.get("t-bg")
        assert t.status == TrajectoryStatus.FAILED and t.error == "gave up"


def test_sync_agent_with_header_injecting_httpx_client(tmp_path):
    shared = http_client()  # one client for every rollout; headers come from the context per request

    @rollout_handler
    def sync_agent(task, ctx):
        assert current_rollout.get() is ctx
        client = openai.OpenAI(base_url=ctx.openai_base_url, api_key="x", http_client=shared)
        client.chat.completions.create(model="stub", messages=[{"role": "user", "content": "hi"}])
        return 0.25

    with runtime(tmp_path) as (rt, store), RuntimeServer(create_agent_app(sync_agent)) as agent:
        for name in ("t-s1", "t-s2"):
            assert httpx.post(agent.base_url + "/rollout", json=payload(rt.base_url, name), timeout=30).status_code == 200
        assert [store.get(n).rewards for n in ("t-s1", "t-s2")] == [(0.25,), (0.25,)]
    # outside a rollout the client sends nothing extra
    request = httpx.Request("GET", "http://x")
    for hook in shared.event_hooks["request"]:
        hook(request)
    assert "X-Amzn-SageMaker-Trajectory-Id" not in request.headers


def test_api_key_from_context_reaches_a_keyed_runtime(tmp_path):
    with runtime(tmp_path, api_keys=["runtime-key-123"]) as (rt, store):
        handler = rollout_handler(two_turn_agent, api_key="runtime-key-123")
        asyncio.run(handler(payload(rt.base_url, "t-key")))
        assert store.get("t-key").status == TrajectoryStatus.REWARDED
        nokey = rollout_handler(two_turn_agent)
        with pytest.raises(openai.AuthenticationError):
            asyncio.run(nokey(payload(rt.base_url, "t-nokey")))


def test_langchain_chat_openai_through_the_adapter_clients(tmp_path):
    langchain_openai = pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage

    sync_client, async_client = http_client(), async_http_client()

    @rollout_handler
    async def langchain_agent(task, ctx):
        llm = langchain_openai.ChatOpenAI(model=ctx.model or "stub", base_url=ctx.openai_base_url, api_key="x",
                                          temperature=0, http_client=sync_client, http_async_client=async_client)
        history = [HumanMessage("2+2?")]
        first = await llm.ainvoke(history)
        history += [first, HumanMessage("sure?")]
        await asyncio.to_thread(llm.invoke, history)  # the sync client, in a thread with a copied context
        return 1.0

    with runtime(tmp_path) as (rt, store):
        asyncio.run(langchain_agent(payload(rt.base_url, "t-lc")))
        t = store.get("t-lc")
        assert t.status == TrajectoryStatus.REWARDED and len(t.turns) == 2
        assert t.turns[0].message.content == "All done."
        assert t.turns[1].reused_prompt_tokens > 0 and len(build_segments(t)) == 1


def agentcore_payload(trajectory_id: str) -> dict:
    """What the managed service's AgentCore runtime sends: no instance, camelCase names."""
    return {"prompt": "2+2?", "metadata": {"jobArn": "arn:aws:sagemaker:us-west-2:1:training-job/job-1",
                                           "rolloutId": trajectory_id},
            "inferenceParams": {"temperature": 0.0, "maxTokens": 64, "topP": 1.0}}


@pytest.mark.parametrize("shape", ["sdk", "agentcore"])
def test_serve_agent_and_rollout_handler_take_both_payload_shapes(tmp_path, shape):
    seen: list[dict] = []

    async def agent(p: dict, ctx: RolloutContext) -> float:
        seen.append({"instance": p["instance"], "prompt": p["prompt"], "meta": p["metadata"],
                     "params": p["inference_params"], "ctx": ctx})
        client = ctx.async_openai()
        r = await client.chat.completions.create(model=ctx.model, messages=[{"role": "user", "content": p["prompt"]}],
                                                 **ctx.sampling_kwargs())
        await client.close()
        return 1.0 if r.choices[0].message.content else 0.0

    with runtime(tmp_path) as (server, store):
        tid = f"t-{uuid.uuid4().hex[:8]}"
        body = payload(server.base_url, tid) if shape == "sdk" else agentcore_payload(tid)
        with RuntimeServer(create_agent_app(agent, base_url=server.base_url)) as agent_server:
            r = httpx.post(agent_server.base_url + "/rollout", json=body, timeout=30)
        assert r.status_code == 200 and r.json()["status"] == "completed" and r.json()["trajectory_id"] == tid, r.text
        [got] = seen
        assert got["prompt"] == "2+2?" and got["meta"]["trajectory_id"] == got["ctx"].trajectory_id == tid
        assert got["meta"]["rolloutId"] == (tid if shape == "agentcore" else "r")  # given names are kept
        assert got["meta"]["job_arn"].endswith("job-1") and got["ctx"].job_arn.endswith("job-1")
        assert got["params"]["max_tokens"] == 64 and got["ctx"].sampling_kwargs()["max_tokens"] == 64
        assert got["instance"] == ({"prompt": "2+2?"} if shape == "agentcore" else body["instance"])
        t = store.get(tid)
        assert t.status is TrajectoryStatus.REWARDED and t.rewards == (1.0,)
        # the decorator alone, called directly with the other shape's payload
        handled = rollout_handler(agent, base_url=server.base_url)
        other = f"t-{uuid.uuid4().hex[:8]}"
        asyncio.run(handled(agentcore_payload(other) if shape == "sdk" else payload(server.base_url, other)))
        assert store.get(other).status is TrajectoryStatus.REWARDED


def test_a_payload_with_neither_instance_nor_prompt_is_refused(tmp_path):
    with RuntimeServer(create_agent_app(lambda p: 1.0, base_url="http://127.0.0.1:1")) as agent_server:
        r = httpx.post(agent_server.base_url + "/rollout", json={"metadata": {"rolloutId": "r1"}})
    assert r.status_code == 400 and "instance (SDK) or prompt (AgentCore)" in r.json()["error"]["message"]
