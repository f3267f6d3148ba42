"""`EmbeddedRuntime.dispatcher()` for each agent kind, with the built-in tiny model serving:
http pushes to an agent server, worker queues tasks that a pull worker (another thread) runs."""

from __future__ import annotations

import asyncio
import threading

import pytest

from turnwise.adapter import RolloutContext, create_agent_app
from turnwise.adapter.worker import Worker
from turnwise.config import JobConfig
from turnwise.rollout.pull import WorkerDispatcher
from turnwise.rollout.push import PushDispatcher
from turnwise.rollout.runtime import EmbeddedRuntime
from turnwise.runtime.server import RuntimeServer
from turnwise.types import Task, TrajectoryStatus

PARAMS = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 4}
TASKS = [Task("a", {"id": "a", "prompt": "Where is my order?"})]


async def agent(task: dict, client, ctx: RolloutContext) -> float:
    r = await client.chat.completions.create(model=ctx.model, messages=[{"role": "user", "content": task["prompt"]}],
                                             **ctx.sampling_kwargs())
    return float(r.usage.completion_tokens)


async def push_agent(payload: dict, ctx: RolloutContext) -> float:
    client = ctx.async_openai()
    try:
        return await agent(payload["instance"], client, ctx)
    finally:
        await client.close()


@pytest.mark.slow
def test_embedded_runtime_dispatches_http_and_worker_agents(tmp_path):
    with RuntimeServer(create_agent_app(push_agent)) as agent_server:
        cfg = JobConfig.model_validate({"output_dir": str(tmp_path), "agent": {"kind": "http", "url": agent_server.base_url}})
        with EmbeddedRuntime(cfg, tmp_path / "run", job_id="job-e") as rt:
            push = rt.dispatcher()
            assert isinstance(push, PushDispatcher)
            [pushed] = rt.run(push.run_groups(TASKS, 2, PARAMS))

            rt.cfg = cfg.model_copy(update={"agent": cfg.agent.model_copy(update={"kind": "worker"})})
            pull = rt.dispatcher()
            assert isinstance(pull, WorkerDispatcher)
            stop = threading.Event()
            worker = Worker(agent, rt.server.base_url, concurrency=2, poll_interval=0.02)

            async def work() -> None:
                run = asyncio.create_task(worker.run(stopped := asyncio.Event()))
                while not stop.is_set():
                    await asyncio.sleep(0.02)
                stopped.set()
                await run

            thread = threading.Thread(target=asyncio.run, args=(work(),))
            thread.start()
            try:
                [pulled] = rt.run(pull.run_groups(TASKS, 2, PARAMS))
            finally:
                stop.set()
                thread.join(30)
    for group in (pushed, pulled):
        for r in group.rollouts_G:
            t = r.trajectory
            assert t.status == TrajectoryStatus.REWARDED and len(t.turns) == 1
            assert t.rewards == (float(len(t.turns[0].completion_ids)),) and 1 <= t.rewards[0] <= 4
    assert worker.completed == 2
