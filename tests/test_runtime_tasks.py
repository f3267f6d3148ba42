"""Pull-worker task leasing: leases, heartbeats, expiry, retries with fresh trajectories, no double counting."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from turnwise.adapter import rollout_handler
from turnwise.runtime.server import RuntimeServer
from turnwise.runtime.store import TrajectoryStore
from turnwise.runtime.tasks import LeaseLost, TaskQueue, TaskStatus
from turnwise.runtime.testing import stub_app
from turnwise.types import TrajectoryStatus


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def payload(i: int) -> dict:
    return {"instance": {"id": i}, "prompt": f"task {i}", "metadata": {"job_arn": "job"}, "model_name": "stub"}


def test_lease_expiry_retries_with_a_new_trajectory_and_refuses_the_dead_worker(tmp_path):
    clock = Clock()
    store = TrajectoryStore(tmp_path / "t.db", "job")
    queue = TaskQueue(store, max_attempts=2, clock=clock)
    assert queue.add([("a", payload(1)), ("b", payload(2)), ("a", payload(9))]) == ["a", "b", "a"]
    first = queue.lease("w1", max_tasks=1, lease_seconds=10)
    assert [(x.task_id, x.attempt, x.trajectory_id) for x in first] == [("a", 1, "a.a1")]
    assert first[0].payload["metadata"]["trajectory_id"] == "a.a1" and first[0].payload["instance"] == {"id": 1}
    assert store.get("a.a1").status == TrajectoryStatus.IN_PROGRESS  # created at lease time
    clock.now += 5
    queue.heartbeat("a", first[0].lease_id, lease_seconds=10)
    clock.now += 9  # still alive thanks to the heartbeat
    assert queue.get("a").status == TaskStatus.LEASED
    clock.now += 2  # w1 died: the lease expires
    second = queue.lease("w2", max_tasks=5)
    assert [(x.task_id, x.attempt) for x in second] == [("a", 2), ("b", 1)]
    assert store.get("a.a1").status == TrajectoryStatus.FAILED and "lease expired" in store.get("a.a1").error
    with pytest.raises(LeaseLost, match="not current"):
        queue.report("a", first[0].lease_id, "done")
    with pytest.raises(LeaseLost):
        queue.heartbeat("a", first[0].lease_id)
    store.complete("a.a2", "ready")
    done = queue.report("a", second[0].lease_id, "done")
    assert (done.status, done.trajectory_id, done.attempt) == (TaskStatus.DONE, "a.a2", 2)
    assert queue.report("a", second[0].lease_id, "done") == done  # a retried report is a no-op
    clock.now += 120  # b's second lease expires too: max_attempts=2 reached after one more
    third = queue.lease("w3")
    assert [(x.task_id, x.attempt) for x in third] == [("b", 2)]
    clock.now += 120
    assert queue.get("b").status == TaskStatus.FAILED and "expired" in queue.get("b").error
    assert queue.counts() == {"queued": 0, "leased": 0, "done": 1, "failed": 1}
    # one counted trajectory per task
    assert [t.id for t in store.list(TrajectoryStatus.READY)] == ["a.a2"]


def test_tasks_survive_a_restart(tmp_path):
    clock = Clock()
    queue = TaskQueue(TrajectoryStore(tmp_path / "t.db", "job"), clock=clock)
    queue.add([("a", payload(1))])
    lease = queue.lease("w1")[0]
    again = TaskQueue(TrajectoryStore(tmp_path / "t.db", "job"), clock=clock)
    assert again.get("a").status == TaskStatus.LEASED
    again.report("a", lease.lease_id, "failed", error="agent crashed")
    state = again.get("a")
    assert state.status == TaskStatus.FAILED and state.error == "agent crashed"
    assert again.store.get("a.a1").status == TrajectoryStatus.FAILED


def test_pull_worker_over_http(tmp_path):
    store = TrajectoryStore(tmp_path / "t.db", "job")

    @rollout_handler
    async def agent(task, ctx):
        client = ctx.async_openai()
        await client.chat.completions.create(model="stub", messages=[{"role": "user", "content": task["prompt"]}])
        await client.close()
        return 1.0

    with RuntimeServer(stub_app(store)) as server:
        url = server.base_url
        added = httpx.post(url + "/tasks", json={"Tasks": [{"TaskId": f"t{i}", "Payload": payload(i)}
                                                           for i in range(3)]})
        assert added.json() == {"TaskIds": ["t0", "t1", "t2"]}
        leases = httpx.post(url + "/tasks/lease", json={"WorkerId": "w", "MaxTasks": 8}).json()["Leases"]
        assert [x["TaskId"] for x in leases] == ["t0", "t1", "t2"]
        assert leases[0]["Payload"]["metadata"]["endpoint"] == url  # the worker knows where to call
        for lease in leases:
            hb = httpx.post(url + f"/tasks/{lease['TaskId']}/heartbeat", json={"LeaseId": lease["LeaseId"]})
            assert hb.status_code == 200 and hb.json()["ExpiresAt"] > lease["ExpiresAt"] - 1
            asyncio.run(agent(lease["Payload"]))
            r = httpx.post(url + f"/tasks/{lease['TaskId']}/report", json={"LeaseId": lease["LeaseId"], "Status": "done"})
            assert r.status_code == 200 and r.json()["Status"] == "done"
        stale = httpx.post(url + "/tasks/t0/report", json={"LeaseId": "not-the-lease", "Status": "done"})
        assert stale.status_code == 409 and "not current" in stale.json()["error"]["message"]
        assert httpx.get(url + "/tasks/nope").status_code == 404
        assert httpx.post(url + "/tasks/lease", json={"WorkerId": "w"}).json() == {"Leases": []}
        task = httpx.get(url + "/tasks/t1").json()
        assert task["Status"] == "done" and task["TrajectoryId"] == "t1.a1"
        stats = httpx.get(url + "/jobs/job/stats").json()
        assert stats["tasks"]["done"] == 3 and stats["trajectories"]["rewarded"] == 3
