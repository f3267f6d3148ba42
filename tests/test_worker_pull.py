"""Pull workers in process: `WorkerDispatcher` queues tasks on a real runtime server on loopback,
`Worker`s lease them over HTTP, run the agent (real OpenAI SDK), heartbeat and report."""

from __future__ import annotations

import asyncio
from contextlib import contextmanager

import pytest

from turnwise.adapter import RolloutContext
from turnwise.adapter.worker import Worker, WorkerError, as_rollout_handler
from turnwise.config import AgentConfig, ConfigError
from turnwise.rollout.dispatch import make_dispatcher
from turnwise.rollout.pull import WorkerDispatcher
from turnwise.runtime.server import RuntimeServer
from turnwise.runtime.store import TrajectoryStore
from turnwise.runtime.tasks import TaskQueue, TaskStatus
from turnwise.runtime.testing import stub_app
from turnwise.train.metrics import apply_failure_policy
from turnwise.types import Task, TrajectoryStatus

PARAMS = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 16}
TASKS = [Task("a", {"id": "a", "prompt": "2+2?"}), Task("b", {"id": "b", "prompt": "3+3?"})]


@contextmanager
def runtime(tmp_path, **kwargs):
    store = TrajectoryStore(tmp_path / "t.db", "job-1")
    with RuntimeServer(stub_app(store, reply="Done.", **kwargs)) as server:
        yield server.base_url, store


async def trainer_style(task: dict, client, ctx: RolloutContext) -> float:
    r = await client.chat.completions.create(model=ctx.model, messages=[{"role": "user", "content": task["prompt"]}],
                                             **ctx.sampling_kwargs())
    return 1.0 if r.choices[0].message.content == "Done." and task["id"] == "a" else 0.25


async def run_with_workers(dispatcher: WorkerDispatcher, workers: list[Worker], tasks, group_size):
    stop = asyncio.Event()
    running = [asyncio.create_task(w.run(stop)) for w in workers]
    try:
        return await dispatcher.run_groups(tasks, group_size, PARAMS)
    finally:
        stop.set()
        await asyncio.gather(*running)


def test_workers_run_every_queued_rollout_once(tmp_path):
    with runtime(tmp_path) as (url, store):
        d = WorkerDispatcher(model="stub", store=store, timeout=10.0, poll_interval=0.02)
        workers = [Worker(trainer_style, url, concurrency=2, poll_interval=0.02, worker_id=f"w{i}") for i in range(2)]
        groups = asyncio.run(run_with_workers(d, workers, TASKS, 3))
    assert [g.task.id for g in groups] == ["a", "b"]
    rewards = [[r.trajectory.rewards for r in g.rollouts_G] for g in groups]
    assert rewards == [[(1.0,)] * 3, [(0.25,)] * 3]
    trajectories = [r.trajectory for g in groups for r in g.rollouts_G]
    assert all(t.status == TrajectoryStatus.REWARDED and len(t.turns) == 1 for t in trajectories)
    assert all(t.id.endswith(".a1") for t in trajectories)  # each task leased once
    assert sum(w.completed for w in workers) == 6 and store.stats().trajectories_by_status["rewarded"] == 6
    assert TaskQueue(store).counts() == {"queued": 0, "leased": 0, "done": 6, "failed": 0}


def test_a_hung_agent_times_out_in_the_worker_and_a_raising_one_fails(tmp_path):
    async def agent(payload: dict, ctx: RolloutContext) -> float:
        client = ctx.async_openai()
        await client.chat.completions.create(model=ctx.model, messages=[{"role": "user", "content": "hi"}])
        await client.close()
        if payload["instance"]["id"] == "a":
            await asyncio.sleep(60)
        raise ValueError("no such order")

    with runtime(tmp_path) as (url, store):
        d = WorkerDispatcher(model="stub", store=store, timeout=0.5, poll_interval=0.02)
        worker = Worker(agent, url, concurrency=2, poll_interval=0.02)
        hung, raised = asyncio.run(run_with_workers(d, [worker], TASKS, 1))
    h, r = hung.rollouts_G[0].trajectory, raised.rollouts_G[0].trajectory
    assert h.status == TrajectoryStatus.FAILED and h.error.startswith("rollout timed out after 0.5s (worker")
    assert r.status == TrajectoryStatus.FAILED and r.error == "ValueError: no such order"
    assert worker.failed == 2 and TaskQueue(store).counts()["failed"] == 2


def test_a_worker_that_loses_its_lease_drops_the_rollout(tmp_path):
    started = asyncio.Event()

    async def agent(payload: dict, ctx: RolloutContext) -> float:
        client = ctx.async_openai()
        await client.chat.completions.create(model=ctx.model, messages=[{"role": "user", "content": "hi"}])
        started.set()
        await asyncio.sleep(60)
        return 1.0

    async def scenario(url: str, store: TrajectoryStore) -> Worker:
        queue = TaskQueue(store, max_attempts=2)
        [task_id] = queue.add([(None, {"instance": {"id": "x"}, "metadata": {}, "model_name": "stub"})])
        worker = Worker(agent, url, lease_seconds=0.3, poll_interval=0.02, max_tasks=1)
        run = asyncio.create_task(worker.run())
        await asyncio.wait_for(started.wait(), 10)
        store.complete(f"{task_id}.a1", TrajectoryStatus.FAILED, error="failed elsewhere")
        with store.transaction() as conn:  # the server gave up on this worker: its lease expired
            conn.execute("UPDATE tasks SET lease_expires_at=0 WHERE id=?", (task_id,))
        await asyncio.wait_for(run, 10)
        assert queue.get(task_id).status == TaskStatus.QUEUED and queue.get(task_id).attempt == 1
        return worker

    with runtime(tmp_path) as (url, store):
        worker = asyncio.run(scenario(url, store))
    assert (worker.lost, worker.completed, worker.failed) == (1, 0, 0)


def test_worker_with_a_bad_key_stops_with_a_clear_error(tmp_path):
    with runtime(tmp_path, api_keys=["right-key-123"]) as (url, _), pytest.raises(WorkerError, match="HTTP 401"):
        asyncio.run(Worker(trainer_style, url, api_key="wrong-key-123").run())


def test_as_rollout_handler_accepts_both_agent_styles():
    async def handler_style(payload, ctx):
        return 1.0

    wrapped = as_rollout_handler(trainer_style)
    assert getattr(wrapped, "__turnwise_rollout_handler__", False)
    assert as_rollout_handler(wrapped) is wrapped
    assert getattr(as_rollout_handler(handler_style), "__turnwise_rollout_handler__", False)


def test_make_dispatcher_worker_kind(tmp_path):
    store = TrajectoryStore(tmp_path / "t.db", "job-1")
    d = make_dispatcher(AgentConfig(kind="worker", rollout_max_retries=0, rollout_timeout=7.0), None,
                        base_url="http://127.0.0.1:1", model="m", store=store)
    assert isinstance(d, WorkerDispatcher) and d.max_retries == 0 and d.timeout == 7.0
    assert d.queue_timeout == 600.0
    with pytest.raises(ConfigError, match="queue_timeout"):
        make_dispatcher(AgentConfig(kind="worker", rollout_timeout=700.0), None,
                        base_url="http://127.0.0.1:1", model="m", store=store)


def test_without_workers_queued_rollouts_fail_after_the_queue_timeout(tmp_path):
    store = TrajectoryStore(tmp_path / "t.db", "job-1")
    d = WorkerDispatcher(model="stub", store=store, timeout=0.1, poll_interval=0.02, queue_timeout=0.3)
    groups = asyncio.run(asyncio.wait_for(d.run_groups(TASKS, 2, PARAMS), 10))  # never hangs
    trajectories = [r.trajectory for g in groups for r in g.rollouts_G]
    assert len(trajectories) == 4 and all(t.status == TrajectoryStatus.FAILED for t in trajectories)
    assert all("queue timed out after 0.3s" in t.error for t in trajectories)
    assert TaskQueue(store).counts() == {"queued": 0, "leased": 0, "done": 0, "failed": 4}
    _, metrics = apply_failure_policy(groups, "keep")
    assert metrics["rollout/timeouts"] == 4 and metrics["train/groups_dropped_empty"] == 2
