"""Push dispatch against real agent servers on loopback: the payload of DESIGN.md, the agent's own
reports, timeouts and HTTP 500s retried with fresh trajectory ids, refusals not retried."""

from __future__ import annotations

import asyncio
import threading
from contextlib import contextmanager

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from turnwise.adapter import RolloutContext, create_agent_app, rollout_handler
from turnwise.config import AgentConfig, ConfigError
from turnwise.rollout.dispatch import make_dispatcher
from turnwise.rollout.push import AgentUnavailable, PushDispatcher
from turnwise.runtime.server import RuntimeServer
from turnwise.runtime.store import TrajectoryStore
from turnwise.runtime.testing import stub_app
from turnwise.types import Task, TrajectoryStatus

PARAMS = {"temperature": 0.5, "top_p": 0.9, "max_tokens": 32}
TASKS = [Task("a", {"id": "a", "prompt": "2+2?", "answer": "4"}), Task("b", {"id": "b", "prompt": "3+3?"})]


@contextmanager
def runtime(tmp_path):
    store = TrajectoryStore(tmp_path / "t.db", "job-1")
    with RuntimeServer(stub_app(store, reply="Done.")) as server:
        yield server.base_url, store


def dispatcher(agent_url: str, base_url: str, store: TrajectoryStore, **kwargs) -> PushDispatcher:
    kwargs = {"concurrency": 4, "timeout": 10.0, "max_retries": 1, "unavailable_timeout": 0.5, **kwargs}
    return PushDispatcher(agent_url, base_url=base_url, model="stub", store=store, **kwargs)


def test_push_rollouts_send_the_managed_payload_and_wait_for_the_agents_reports(tmp_path):
    seen: list[dict] = []

    async def agent(payload: dict, ctx: RolloutContext) -> float:
        seen.append(payload)
        client = ctx.async_openai()  # the real OpenAI SDK, with the trajectory headers
        r = await client.chat.completions.create(model=ctx.model, messages=[{"role": "user", "content":
                                                                            payload["prompt"]}],
                                                 **ctx.sampling_kwargs())
        await client.close()
        return 1.0 if r.choices[0].message.content == "Done." else 0.0

    with runtime(tmp_path) as (base_url, store), RuntimeServer(create_agent_app(agent)) as agent_server:
        groups = asyncio.run(dispatcher(agent_server.base_url, base_url, store).run_groups(TASKS, 2, PARAMS))
    assert [g.task.id for g in groups] == ["a", "b"] and all(len(g.rollouts_G) == 2 for g in groups)
    trajectories = [r.trajectory for g in groups for r in g.rollouts_G]
    assert all(t.status == TrajectoryStatus.REWARDED and t.rewards == (1.0,) and len(t.turns) == 1
               for t in trajectories)
    assert len({t.id for t in trajectories}) == 4
    first = next(p for p in seen if p["metadata"]["trajectory_id"] == trajectories[0].id)
    assert first["instance"] == {"id": "a", "prompt": "2+2?", "answer": "4"} and first["prompt"] == "2+2?"
    assert first["inference_params"] == first["inferenceParams"] == PARAMS and first["model_name"] == "stub"
    meta = first["metadata"]
    assert meta["rolloutId"] == meta["trajectory_id"] and meta["endpoint"] == base_url
    assert meta["job_arn"] == meta["jobArn"] == "job-1" and "region" in meta


def test_timeouts_are_retried_with_a_fresh_trajectory_then_recorded_failed(tmp_path):
    release = threading.Event()
    ids: list[str] = []

    async def slow_agent(payload: dict, ctx: RolloutContext) -> float:
        ids.append(ctx.trajectory_id)
        client = ctx.async_openai()
        await client.chat.completions.create(model=ctx.model, messages=[{"role": "user", "content": "hi"}])
        while not release.is_set():
            await asyncio.sleep(0.01)
        await client.close()
        return 1.0

    with runtime(tmp_path) as (base_url, store), RuntimeServer(create_agent_app(slow_agent)) as agent_server:
        d = dispatcher(agent_server.base_url, base_url, store, timeout=0.4, max_retries=1)
        [group] = asyncio.run(d.run_groups(TASKS[:1], 1, PARAMS))
        release.set()
    t = group.rollouts_G[0].trajectory
    assert len(ids) == 2 and ids[0] != ids[1] and t.id == ids[1]
    assert t.status == TrajectoryStatus.FAILED and "timed out after 0.4s (attempt 2 of 2)" in t.error
    first = store.get(ids[0])
    assert first.status == TrajectoryStatus.FAILED and "attempt 1 of 2" in first.error
    assert len(first.turns) == 1  # what the abandoned attempt recorded stays, sealed as failed


def failing_server(fail_first: int, handler) -> tuple[FastAPI, list[str]]:
    """An agent server whose /rollout answers HTTP 500 to its first `fail_first` requests."""
    app, ids = FastAPI(), []

    @app.get("/health")
    async def health() -> dict:
        return {"status": "healthy"}

    @app.post("/rollout")
    async def rollout(request: Request) -> JSONResponse:
        payload = await request.json()
        ids.append(payload["metadata"]["trajectory_id"])
        if len(ids) <= fail_first:
            return JSONResponse({"error": {"message": "agent crashed: KeyError 'order'"}}, status_code=500)
        await handler(payload)
        return JSONResponse({"status": "completed"})

    return app, ids


@rollout_handler
async def one_call_agent(payload: dict, ctx: RolloutContext) -> float:
    client = ctx.async_openai()
    await client.chat.completions.create(model=ctx.model, messages=[{"role": "user", "content": payload["prompt"]}])
    await client.close()
    return 0.5


def test_http_500_is_retried_with_a_fresh_trajectory_then_recorded_failed_with_its_reason(tmp_path):
    always, always_ids = failing_server(99, one_call_agent)
    once, once_ids = failing_server(1, one_call_agent)
    with runtime(tmp_path) as (base_url, store), RuntimeServer(always) as s1, RuntimeServer(once) as s2:
        [failed] = asyncio.run(dispatcher(s1.base_url, base_url, store, max_retries=2).run_groups(TASKS[:1], 1, PARAMS))
        [recovered] = asyncio.run(dispatcher(s2.base_url, base_url, store).run_groups(TASKS[:1], 1, PARAMS))
    t = failed.rollouts_G[0].trajectory
    assert len(set(always_ids)) == 3 and t.id == always_ids[-1]
    assert t.status == TrajectoryStatus.FAILED
    assert t.error == "agent server answered HTTP 500: agent crashed: KeyError 'order' (attempt 3 of 3)"
    assert all(store.get(i).status == TrajectoryStatus.FAILED for i in always_ids)
    r = recovered.rollouts_G[0].trajectory
    assert len(set(once_ids)) == 2 and r.id == once_ids[1]
    assert r.status == TrajectoryStatus.REWARDED and r.rewards == (0.5,)
    assert store.get(once_ids[0]).status == TrajectoryStatus.FAILED


def test_refusals_are_not_retried_and_an_agent_failure_is_its_outcome(tmp_path):
    calls: list[str] = []

    async def agent(payload: dict, ctx: RolloutContext) -> float:
        calls.append(ctx.trajectory_id)
        client = ctx.async_openai()
        await client.chat.completions.create(model=ctx.model, messages=[{"role": "user", "content": "hi"}])
        await client.close()
        if payload["instance"]["id"] == "b":
            raise RuntimeError("tool 'refund' is not available")
        return 1.0

    app = create_agent_app(agent, inbound_api_key="agent-key-123")
    with runtime(tmp_path) as (base_url, store), RuntimeServer(app) as agent_server:
        [refused] = asyncio.run(dispatcher(agent_server.base_url, base_url, store).run_groups(TASKS[:1], 1, PARAMS))
        ok, failed = asyncio.run(dispatcher(agent_server.base_url, base_url, store, api_key="agent-key-123")
                                 .run_groups(TASKS, 1, PARAMS))
    t = refused.rollouts_G[0].trajectory
    assert t.status == TrajectoryStatus.FAILED and t.error.startswith("agent server refused the rollout: HTTP 401")
    assert ok.rollouts_G[0].trajectory.status == TrajectoryStatus.REWARDED
    f = failed.rollouts_G[0].trajectory
    assert f.status == TrajectoryStatus.FAILED and f.error == "RuntimeError: tool 'refund' is not available"
    assert len(calls) == 2  # the 401 never reached the agent; the agent's own failure was not retried


def test_an_unhealthy_agent_server_stops_the_batch_before_it_starts(tmp_path):
    with runtime(tmp_path) as (base_url, store):
        d = dispatcher("http://127.0.0.1:9", base_url, store, unavailable_timeout=0.3)
        with pytest.raises(AgentUnavailable, match="127.0.0.1:9 is not healthy"):
            asyncio.run(d.run_groups(TASKS, 1, PARAMS))
        assert store.stats().trajectories_by_status["in_progress"] == 0


def test_make_dispatcher_picks_the_agent_kind(tmp_path):
    store = TrajectoryStore(tmp_path / "t.db", "job-1")
    push = make_dispatcher(AgentConfig(kind="http", url="http://127.0.0.1:8080/", rollout_max_retries=4),
                           None, base_url="http://127.0.0.1:1", model="m", store=store)
    assert isinstance(push, PushDispatcher) and push.url == "http://127.0.0.1:8080" and push.max_retries == 4
    with pytest.raises(ConfigError, match="agent.url"):
        make_dispatcher(AgentConfig(kind="http"), None, base_url="http://x", model="m", store=store)
