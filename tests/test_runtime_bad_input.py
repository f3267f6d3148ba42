"""Bad input fails the one rollout or request it is in, with its reason; never a step or the server.

Real servers on loopback (the stub policy), the real feedback client and python dispatcher.
"""

from __future__ import annotations

import asyncio
import math
import re
from pathlib import Path

import httpx
import pytest
import yaml

from turnwise.adapter.feedback import FeedbackClient
from turnwise.config import default_sampling_params, validate_config
from turnwise.rollout.inprocess import InProcessDispatcher
from turnwise.runtime.app import create_app
from turnwise.runtime.server import RuntimeServer
from turnwise.runtime.store import TrajectoryStore
from turnwise.runtime.testing import IM_END, ByteChat, ScriptedSampler, stub_app
from turnwise.types import Task, TrajectoryStatus

HI = {"messages": [{"role": "user", "content": "hi"}]}
README = Path(__file__).resolve().parents[1] / "README.md"


def _chat(url: str, trajectory_id: str, **headers: str) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json=HI,
                      headers={"X-Amzn-SageMaker-Trajectory-Id": trajectory_id, **headers})


def test_wrong_length_and_non_finite_rewards_fail_only_their_rollout(tmp_path):
    store = TrajectoryStore(tmp_path / "t.db", job_id="job")
    rewards = {"good": 1.0, "too many": [1.0, 0.0, 1.0], "nan list": [math.nan]}

    async def agent(task, client, ctx):
        await client.chat.completions.create(model=ctx.model, messages=HI["messages"])
        return rewards[task["kind"]]

    with RuntimeServer(stub_app(store)) as server:
        dispatcher = InProcessDispatcher(agent, base_url=server.base_url, model="stub", store=store, concurrency=4, timeout=10)
        tasks = [Task(k, {"kind": k}) for k in rewards]
        groups = asyncio.run(dispatcher.run_groups(tasks, 2, {}))  # the step completes
        by_task = {g.task.id: [r.trajectory for r in g.rollouts_G] for g in groups}
        assert [t.status for t in by_task["good"]] == [TrajectoryStatus.REWARDED] * 2
        for kind in ("too many", "nan list"):
            assert [t.status for t in by_task[kind]] == [TrajectoryStatus.FAILED] * 2, kind
        too_many = by_task["too many"][0]
        assert too_many.error.startswith("invalid reward: got 3 rewards for a trajectory of 1 turns")
        assert "finite" in by_task["nan list"][0].error
        counts = store.stats().trajectories_by_status
        assert (counts["rewarded"], counts["failed"], counts["ready"], counts["in_progress"]) == (2, 4, 0, 0)

        async def report_over_http() -> tuple[bool, bool]:  # an HTTP agent (serve_agent, the SDK) sending NaN
            for tid in ("x", "y"):
                assert _chat(server.base_url, tid).status_code == 200
            async with FeedbackClient(server.base_url) as fb:
                await fb.complete_rollout("x")
                await fb.complete_rollout("y")
                return await fb.update_reward("x", [math.inf]), await fb.update_reward("y", 0.5)

        assert asyncio.run(report_over_http()) == (False, True)
        assert store.get("x").status is TrajectoryStatus.FAILED and store.get("x").error.startswith("invalid reward")
        assert store.get("y").status is TrajectoryStatus.REWARDED


def test_status_defaults_to_ready(tmp_path):
    store = TrajectoryStore(tmp_path / "t.db", job_id="job")
    with RuntimeServer(stub_app(store)) as server:
        assert _chat(server.base_url, "t").status_code == 200
        r = httpx.post(server.base_url + "/complete-rollout", json={"TrajectoryId": "t"})
        assert r.status_code == 200 and r.json()["Status"] == "ready"
        assert store.get("t").status is TrajectoryStatus.READY


@pytest.mark.parametrize("payload,problem", [
    ({"instance": {"id": 1}, "metadata": "not-an-object"}, "metadata"),
    ({"instance": {"id": 1}, "metadata": ["a"]}, "metadata"),
    ({"instance": "a string", "metadata": {}}, "instance"),
    ({"instance": {"id": 1}, "inference_params": 3}, "inference_params"),
    ("a string", "Payload"),
])
def test_bad_task_payload_is_refused_at_post_and_the_queue_still_leases(tmp_path, payload, problem):
    store = TrajectoryStore(tmp_path / "t.db", job_id="job")
    with RuntimeServer(stub_app(store)) as server:
        url = server.base_url
        bad = httpx.post(url + "/tasks", json={"Tasks": [{"TaskId": "bad", "Payload": payload}]})
        assert bad.status_code == 400 and problem in bad.json()["error"]["message"]
        ok = httpx.post(url + "/tasks", json={"Tasks": [{"TaskId": "ok", "Payload": {"instance": {"id": 2}}}]})
        assert ok.status_code == 200
        leased = httpx.post(url + "/tasks/lease", json={"WorkerId": "w", "MaxTasks": 8})
        assert leased.status_code == 200
        [lease] = leased.json()["Leases"]  # only the good one was queued
        assert lease["TaskId"] == "ok" and lease["Payload"]["metadata"]["trajectory_id"] == lease["TrajectoryId"]


def test_openapi_marks_the_trajectory_header_required(tmp_path):
    app = stub_app(TrajectoryStore(tmp_path / "t.db", job_id="job"))
    spec = app.openapi()
    for path in ("/v1/chat/completions", "/sample"):
        params = {p["name"]: p for p in spec["paths"][path]["post"]["parameters"]}
        assert params["X-Amzn-SageMaker-Trajectory-Id"]["required"] is True
        assert params["X-Turnwise-Trajectory-Id"].get("required", False) is False  # the alias


def _readme_auth_yaml() -> dict:
    text = README.read_text()
    block = re.search(r"```yaml\n(# job-scoped keys.*?)```", text, re.DOTALL)
    assert block, "README lost its job-scoped keys example"
    return yaml.safe_load(block.group(1))


def test_readme_job_scoped_keys_example(tmp_path):
    cfg = validate_config(_readme_auth_yaml())
    plain = [k for k in cfg.runtime.api_keys if isinstance(k, str)]
    scoped = [k for k in cfg.runtime.api_keys if not isinstance(k, str)]
    assert plain and scoped and cfg.runtime.own_key() == plain[0]
    store = TrajectoryStore(tmp_path / "t.db", job_id="support-desk")
    chat = ByteChat()
    app = create_app(sampler=ScriptedSampler(lambda _: chat.encode("ok") + [IM_END]), chat=chat, store=store,
                     model_name="stub", default_params=default_sampling_params(), api_keys=cfg.runtime.api_keys)
    with RuntimeServer(app) as server:
        url = server.base_url
        assert _chat(url, "t").status_code == 401
        assert _chat(url, "t", Authorization=f"Bearer {plain[0]}").status_code == 200
        other = scoped[0]  # a key for another job reaches only that job
        assert other.job != "support-desk"
        r = _chat(url, "t2", Authorization=f"Bearer {other.key}", **{"X-Amzn-SageMaker-Job-Arn": "support-desk"})
        assert r.status_code == 403
        assert _chat(url, "t3", Authorization=f"Bearer {other.key}").status_code == 200
        assert store.for_job(other.job).get("t3") is not None and store.get("t3") is None
        seen = httpx.get(url + "/trajectories/t", headers={"Authorization": f"Bearer {other.key}"})
        assert seen.status_code == 404  # the own job's trajectory is out of its reach


@pytest.mark.parametrize("keys,message", [(["short"], "at least 8 characters"),
                                          ([{"key": "long-enough-key"}], "job"),
                                          ([{"key": "long-enough-key", "job": "j", "x": 1}], "x")])
def test_bad_api_keys_fail_at_config_load(keys, message):
    with pytest.raises(ValueError, match=message):
        validate_config({"runtime": {"api_keys": keys}})


def test_api_keys_mapping_is_the_list_of_key_job_entries():
    as_map = validate_config({"runtime": {"api_keys": {"a-long-secret-key": "job-3", "another-long-secret": "eval-7"}}})
    as_list = validate_config({"runtime": {"api_keys": [{"key": "a-long-secret-key", "job": "job-3"},
                                                        {"key": "another-long-secret", "job": "eval-7"}]}})
    assert as_map.runtime.api_keys == as_list.runtime.api_keys and as_map.runtime.api_keys[1].job == "eval-7"
    with pytest.raises(ValueError, match="at least 8 characters"):
        validate_config({"runtime": {"api_keys": {"short": "job-3"}}})
