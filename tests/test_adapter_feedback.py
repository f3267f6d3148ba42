"""RolloutContext headers and clients; FeedbackClient retries, idempotency and error reporting."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest

from turnwise.adapter.context import RolloutContext, current_rollout, headers, rollout_scope
from turnwise.adapter.feedback import FeedbackClient, FeedbackError
from turnwise.config import default_sampling_params
from turnwise.runtime.app import create_app
from turnwise.runtime.server import RuntimeServer
from turnwise.runtime.store import TrajectoryStore
from turnwise.runtime.testing import IM_END, ByteChat, ScriptedSampler
from turnwise.types import TrajectoryStatus


def test_context_headers_and_clients():
    ctx = RolloutContext("traj-1", "http://127.0.0.1:9/", "policy", {"temperature": 0.7, "top_p": None},
                         job_arn="arn:job/j", api_key="secret-key")
    assert ctx.headers() == {"X-Amzn-SageMaker-Trajectory-Id": "traj-1", "X-Turnwise-Trajectory-Id": "traj-1",
                             "X-Amzn-SageMaker-Job-Arn": "arn:job/j"}
    assert ctx.sampling_kwargs() == {"temperature": 0.7}
    client = ctx.async_openai()
    assert str(client.base_url) == "http://127.0.0.1:9/v1/" and client.api_key == "secret-key"
    assert client.default_headers["X-Amzn-SageMaker-Trajectory-Id"] == "traj-1"
    assert RolloutContext("t", "http://h", "m").openai().api_key == "turnwise"


def test_current_rollout_is_per_task():
    async def one(i: int) -> dict:
        with rollout_scope(RolloutContext(f"t{i}", "http://h", "m")):
            await asyncio.sleep(0.01 * (3 - i))
            return headers()

    async def main():
        return await asyncio.gather(*(one(i) for i in range(3)))

    got = asyncio.run(main())
    assert [h["X-Turnwise-Trajectory-Id"] for h in got] == ["t0", "t1", "t2"]
    assert headers() == {} and current_rollout.get() is None


def test_from_push_payload():
    payload = {"instance": {"id": 1}, "prompt": "p", "model_name": "policy",
               "metadata": {"jobArn": "arn:j", "rolloutId": "r-1", "endpoint": "http://127.0.0.1:5"},
               "inferenceParams": {"temperature": 0.2, "max_tokens": 9}}
    ctx = RolloutContext.from_payload(payload)
    assert (ctx.trajectory_id, ctx.base_url, ctx.job_arn, ctx.model) == ("r-1", "http://127.0.0.1:5", "arn:j", "policy")
    assert ctx.sampling_kwargs() == {"temperature": 0.2, "max_tokens": 9}
    with pytest.raises(ValueError, match="trajectory_id"):
        RolloutContext.from_payload({"metadata": {}})


def test_retries_transient_errors_with_one_client_token():
    seen: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        if len(seen) == 1:
            raise httpx.ConnectError("refused")
        if len(seen) == 2:
            return httpx.Response(503, json={"error": {"message": "busy"}})
        return httpx.Response(200, json={})

    async def main():
        async with FeedbackClient("http://runtime", transport=httpx.MockTransport(handler), backoff=0.001) as fb:
            return await fb.complete_rollout("t", "ready")

    assert asyncio.run(main()) is True
    assert len(seen) == 3 and len({s["ClientToken"] for s in seen}) == 1


def test_refusals_raise_with_the_server_message():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": {"message": "rewards must be finite", "code": 400}})

    async def main():
        async with FeedbackClient("http://runtime", transport=httpx.MockTransport(handler)) as fb:
            await fb.update_reward("t", 1.0)

    with pytest.raises(FeedbackError, match="rewards must be finite") as info:
        asyncio.run(main())
    assert info.value.status == 400


def test_reports_reach_a_server_that_starts_late(tmp_path):
    """Connection refused while the runtime (re)starts: the report is retried until it lands."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = TrajectoryStore(tmp_path / "t.db", "job")
    store.begin("t")
    chat = ByteChat()
    app = create_app(sampler=ScriptedSampler([[IM_END]]), chat=chat, store=store, model_name="m",
                     default_params=default_sampling_params())
    server = RuntimeServer(app, port=port)
    timer = threading.Timer(0.5, server.start)
    timer.start()

    async def main():
        async with FeedbackClient(f"http://127.0.0.1:{port}", retries=8, backoff=0.1) as fb:
            start = time.monotonic()
            assert await fb.complete_rollout("t", "failed", error="agent crashed")
            return time.monotonic() - start

    try:
        waited = asyncio.run(main())
    finally:
        timer.join()
        server.stop()
    assert waited >= 0.4
    t = store.get("t")
    assert t.status == TrajectoryStatus.FAILED and t.error == "agent crashed"
