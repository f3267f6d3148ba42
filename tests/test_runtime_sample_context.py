"""A scripted policy knows which trajectory, task and turn it samples for (`SampleContext`), with
no help from the agent: a real runtime on loopback, the real OpenAI SDK, and each dispatcher
(in process, push to an agent server, pull workers) recording the task id of its trajectories."""

from __future__ import annotations

import asyncio
import sqlite3
from contextlib import ExitStack, contextmanager

import pytest

from turnwise.adapter import RolloutContext, create_agent_app
from turnwise.adapter.worker import Worker, as_rollout_handler
from turnwise.config import default_sampling_params
from turnwise.rollout.inprocess import InProcessDispatcher
from turnwise.rollout.pull import WorkerDispatcher
from turnwise.rollout.push import PushDispatcher, push_payload
from turnwise.runtime.app import create_app
from turnwise.runtime.server import RuntimeServer
from turnwise.runtime.store import TrajectoryStore
from turnwise.runtime.tasks import TaskQueue
from turnwise.runtime.testing import IM_END, ByteChat, ScriptedSampler
from turnwise.types import SampleContext, SamplingParams, Task, TrajectoryStatus

CHAT = ByteChat()
PARAMS = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 64}
TASKS = [Task("a", {"id": "a"}), Task("b", {"id": "b"})]
TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "Find a record",
                                           "parameters": {"type": "object", "properties": {}}}}]


def per_task(prompt_ids, context):
    """The policy's answer depends on the task and turn alone, never on the prompt."""
    return CHAT.encode(f"task {context.task_id} turn {context.turn}") + [IM_END]


def make_agent(replies: dict[str, list[str]]):
    async def agent(task: dict, client, ctx: RolloutContext) -> float:
        """Two turns whose own messages are the same for every task: nothing in them names it."""
        messages = [{"role": "user", "content": "Hello."}]
        for _ in range(2):
            r = await client.chat.completions.create(model=ctx.model, messages=messages, tools=TOOLS)
            content = r.choices[0].message.content
            replies.setdefault(ctx.trajectory_id, []).append(content)
            messages += [{"role": "assistant", "content": content}, {"role": "user", "content": "And then?"}]
        return 1.0

    return agent


@contextmanager
def dispatcher_of(kind: str, agent, url: str, store: TrajectoryStore):
    """A dispatcher of `kind` for `agent` against the runtime at `url`, with what it needs running."""
    if kind == "python":
        yield InProcessDispatcher(agent, base_url=url, model="policy", store=store, concurrency=4, timeout=10.0)
    elif kind == "push":
        with RuntimeServer(create_agent_app(as_rollout_handler(agent))) as agent_server:
            yield PushDispatcher(agent_server.base_url, base_url=url, model="policy", store=store, concurrency=4,
                                 timeout=10.0, unavailable_timeout=5.0)
    else:
        yield WorkerDispatcher(model="policy", store=store, timeout=10.0, poll_interval=0.02)


async def run_groups(kind: str, dispatcher, agent, url: str):
    if kind != "pull":
        return await dispatcher.run_groups(TASKS, 2, PARAMS)
    stop = asyncio.Event()
    workers = [asyncio.create_task(Worker(agent, url, concurrency=4, poll_interval=0.02).run(stop))]
    try:
        return await dispatcher.run_groups(TASKS, 2, PARAMS)
    finally:
        stop.set()
        await asyncio.gather(*workers)


@pytest.mark.parametrize("kind", ["python", "push", "pull"])
def test_a_scripted_policy_answers_per_task_and_turn_while_the_prompts_are_identical(tmp_path, kind):
    replies: dict[str, list[str]] = {}
    agent = make_agent(replies)
    store = TrajectoryStore(tmp_path / "t.db", "job-1")
    sampler = ScriptedSampler(per_task)
    app = create_app(sampler=sampler, chat=CHAT, store=store, model_name="policy",
                     default_params=default_sampling_params(max_tokens=64))
    with ExitStack() as stack:
        url = stack.enter_context(RuntimeServer(app)).base_url
        dispatcher = stack.enter_context(dispatcher_of(kind, agent, url, store))
        groups = asyncio.run(run_groups(kind, dispatcher, agent, url))

    assert [g.task.id for g in groups] == ["a", "b"]
    contexts = sampler.contexts
    for group in groups:
        for rollout in group.rollouts_G:
            t = rollout.trajectory
            assert t.status == TrajectoryStatus.REWARDED and len(t.turns) == 2, (t.status, t.error)
            assert t.task_id == group.task.id  # recorded by the dispatcher, kept through the runtime's begin
            assert t.tools == tuple(TOOLS)
            assert replies[t.id] == [f"task {group.task.id} turn 0", f"task {group.task.id} turn 1"]
            assert [c for c in contexts if c.trajectory_id == t.id] == [
                SampleContext(trajectory_id=t.id, task_id=group.task.id, turn=0),
                SampleContext(trajectory_id=t.id, task_id=group.task.id, turn=1)]
    first_prompts = {r.trajectory.turns[0].prompt_ids for g in groups for r in g.rollouts_G}
    assert len(first_prompts) == 1  # the same prompt for both tasks: the answer came from the context


def test_push_payloads_carry_the_task_id_and_a_lease_records_it(tmp_path):
    payload = push_payload(TASKS[1], PARAMS, model="policy", job_arn="job-1")
    assert payload["metadata"]["task_id"] == "b"
    store = TrajectoryStore(tmp_path / "t.db", "job-1")
    queue = TaskQueue(store)
    queue.add([("q1", payload), ("q2", {"instance": {}, "metadata": {}})])  # q2: queued by another trainer
    leases = {lease.task_id: lease for lease in queue.lease("w", max_tasks=2)}
    assert store.get(leases["q1"].trajectory_id).task_id == "b"
    assert store.get(leases["q2"].trajectory_id).task_id is None


def test_scripts_of_one_parameter_keep_working_and_a_direct_call_has_no_context():
    params = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=8)
    seen = []
    two = ScriptedSampler(lambda ids, context: seen.append(context) or [IM_END])
    one = ScriptedSampler(lambda ids: [len(ids)])
    assert asyncio.run(two.generate([1, 2], params)).token_ids == (IM_END,) and seen == [None]
    assert asyncio.run(one.generate([1, 2], params, context=SampleContext("t", "a", 0))).token_ids == (2,)


def test_a_store_written_before_task_ids_gains_the_column(tmp_path):
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:  # the trajectories table as it was, with one rollout in it
        conn.execute("CREATE TABLE trajectories (job_id TEXT NOT NULL, id TEXT NOT NULL, status TEXT NOT NULL, "
                     "tools TEXT NOT NULL, error TEXT, failure TEXT, complete_token TEXT, "
                     "n_turns INTEGER NOT NULL DEFAULT 0, prefill_tokens INTEGER NOT NULL DEFAULT 0, "
                     "sample_tokens INTEGER NOT NULL DEFAULT 0, reused_tokens INTEGER NOT NULL DEFAULT 0, "
                     "created_at REAL NOT NULL, updated_at REAL NOT NULL, PRIMARY KEY (job_id, id))")
        conn.execute("INSERT INTO trajectories (job_id, id, status, tools, created_at, updated_at) "
                     "VALUES ('job', 'old', 'in_progress', '[]', 0, 0)")
    conn.close()
    store = TrajectoryStore(path, "job")
    assert store.get("old").task_id is None
    store.begin("new", task_id="a")
    store.begin("new", [{"type": "function", "function": {"name": "f"}}])  # the runtime's, on the first call
    new = store.get("new")
    assert new.task_id == "a" and new.tools[0]["function"]["name"] == "f"
