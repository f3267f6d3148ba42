"""Protocol fidelity: real streaming, the job's sampling over an agent's, reproducible seeds.

The real OpenAI SDK on loopback; the tiny model's engine where the numbers matter.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence

import httpx
import openai
import pytest

from turnwise.config import ModelConfig, default_sampling_params
from turnwise.runtime.app import create_app
from turnwise.runtime.server import RuntimeServer
from turnwise.runtime.service import derive_seed
from turnwise.runtime.store import TrajectoryStore
from turnwise.runtime.testing import IM_END, ByteChat, ScriptedSampler
from turnwise.types import Completion, FinishReason, SamplingParams

HI = [{"role": "user", "content": "hi"}]


class GatedSampler:
    """Emits one token per `release()`, through `on_token`, like the engine does from its thread."""

    def __init__(self, ids: Sequence[int]) -> None:
        self.ids = list(ids)
        self.gate = threading.Semaphore(0)
        self.version = 0
        self.params: list[SamplingParams] = []

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self.gate.release()

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams,
                       on_token: Callable[[int, float], None] | None = None) -> Completion:
        self.params.append(params)

        def run() -> Completion:
            for tok in self.ids:
                assert self.gate.acquire(timeout=10), "the test never released the next token"
                if on_token is not None:
                    on_token(tok, -0.5)
            return Completion(tuple(self.ids), (-0.5,) * len(self.ids), FinishReason.STOP, 0, len(prompt_ids))

        return await asyncio.to_thread(run)


def test_streaming_sends_each_token_as_it_is_sampled(tmp_path):
    chat = ByteChat()
    sampler = GatedSampler(chat.encode("Hello there") + [IM_END])
    app = create_app(sampler=sampler, chat=chat, store=TrajectoryStore(tmp_path / "t.db", "job"),
                     model_name="stub", default_params=default_sampling_params())
    with RuntimeServer(app) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x",
                               default_headers={"X-Turnwise-Trajectory-Id": "t"})
        stream = client.chat.completions.create(model="stub", messages=HI, stream=True)
        first = next(stream)  # the role chunk is sent before any token
        assert first.choices[0].delta.role == "assistant"
        sampler.release(1)  # exactly one token sampled: "H" must arrive while the rest waits
        content = next(stream).choices[0].delta.content
        assert content == "H"
        sampler.release(len(sampler.ids))
        rest = "".join(c.choices[0].delta.content or "" for c in stream)
        assert content + rest == "Hello there"  # and the end-of-turn token never shows
        turn = httpx.get(server.base_url + "/trajectories/t").json()["turns"][0]
        assert turn["message"]["content"] == "Hello there"


def test_streaming_holds_back_tool_call_markup(tmp_path):
    chat = ByteChat()
    text = 'Let me look. <tool_call>{"name": "lookup", "arguments": {"q": "7"}}</tool_call>'
    sampler = GatedSampler(chat.encode(text) + [IM_END])
    sampler.release(10_000)
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    app = create_app(sampler=sampler, chat=chat, store=TrajectoryStore(tmp_path / "t.db", "job"),
                     model_name="stub", default_params=default_sampling_params())
    with RuntimeServer(app) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x",
                               default_headers={"X-Turnwise-Trajectory-Id": "t"})
        chunks = list(client.chat.completions.create(model="stub", messages=HI, tools=tools, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    assert content == "Let me look." and "<tool_call>" not in content
    assert [(c.function.name, c.function.arguments) for c in calls] == [("lookup", '{"q": "7"}')]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_refused_streaming_request_is_a_plain_http_error(tmp_path):
    chat = ByteChat()
    store = TrajectoryStore(tmp_path / "t.db", "job")
    app = create_app(sampler=GatedSampler([IM_END]), chat=chat, store=store, model_name="stub",
                     default_params=default_sampling_params())
    store.begin("done")
    store.complete("done", "failed", error="x")
    with RuntimeServer(app) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0,
                               default_headers={"X-Turnwise-Trajectory-Id": "done"})
        with pytest.raises(openai.ConflictError, match="not in valid status"):
            client.chat.completions.create(model="stub", messages=HI, stream=True)


@pytest.mark.parametrize("mode,expected_temperature,status", [("warn", 1.0, 200), ("allow", 0.1, 200),
                                                              ("deny", None, 400)])
def test_the_jobs_sampling_wins_over_an_agents_unless_allowed(tmp_path, mode, expected_temperature, status):
    chat = ByteChat()
    seen: list[SamplingParams] = []

    class Recording(ScriptedSampler):
        async def generate(self, prompt_ids, params):
            seen.append(params)
            return await super().generate(prompt_ids, params)

    store = TrajectoryStore(tmp_path / "t.db", "job")
    app = create_app(sampler=Recording(lambda _: chat.encode("ok") + [IM_END]), chat=chat, store=store,
                     model_name="stub", default_params=default_sampling_params(temperature=0.7), sampling_overrides=mode)
    store.expect_sampling("rollout", {"temperature": 1.0, "top_p": 1.0, "max_tokens": 32})  # what the trainer chose
    with RuntimeServer(app) as server:
        # LlamaIndex-style: the framework's own temperature on every request
        r = httpx.post(server.base_url + "/v1/chat/completions", headers={"X-Turnwise-Trajectory-Id": "rollout"},
                       json={"messages": HI, "temperature": 0.1})
        assert r.status_code == status, r.text
        stats = httpx.get(server.base_url + "/jobs/job/stats").json()["sampling_overrides"]
        outcome = {"warn": "replaced", "allow": "allowed", "deny": "denied"}[mode]
        assert stats == {f"temperature/{outcome}": 1}
        if expected_temperature is not None:
            assert seen[-1].temperature == expected_temperature and seen[-1].max_tokens == 32
        else:
            assert "sampling_overrides: deny" in r.json()["error"]["message"] and not seen
        # a trajectory nobody registered (an eval endpoint, an external agent): the request's own
        r = httpx.post(server.base_url + "/v1/chat/completions", headers={"X-Turnwise-Trajectory-Id": "free"},
                       json={"messages": HI, "temperature": 0.1})
        assert r.status_code == 200 and seen[-1].temperature == 0.1


def test_requests_without_a_seed_get_one_from_job_seed_trajectory_and_turn(tmp_path):
    chat = ByteChat()
    seen: list[SamplingParams] = []

    class Recording(ScriptedSampler):
        async def generate(self, prompt_ids, params):
            seen.append(params)
            return await super().generate(prompt_ids, params)

    def serve(seed):
        return create_app(sampler=Recording(lambda _: chat.encode("ok") + [IM_END]), chat=chat,
                          store=TrajectoryStore(tmp_path / f"{seed}-{time.monotonic_ns()}.db", "job"),
                          model_name="stub", default_params=default_sampling_params(), seed=seed)

    def two_turns(app, trajectory_id, seed=None):
        with RuntimeServer(app) as server:
            client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x",
                                   default_headers={"X-Turnwise-Trajectory-Id": trajectory_id})
            extra = {} if seed is None else {"seed": seed}
            reply = client.chat.completions.create(model="stub", messages=HI, **extra).choices[0].message
            client.chat.completions.create(model="stub", messages=[*HI, reply.model_dump(exclude_none=True),
                                                                   {"role": "user", "content": "more"}], **extra)
        return [p.seed for p in seen[-2:]]

    assert two_turns(serve(7), "a") == [derive_seed(7, "a", 0), derive_seed(7, "a", 1)]
    assert two_turns(serve(7), "a") == [derive_seed(7, "a", 0), derive_seed(7, "a", 1)]  # a second run
    assert two_turns(serve(8), "a") != two_turns(serve(7), "b") != two_turns(serve(7), "a")
    assert two_turns(serve(7), "c", seed=5) == [5, 5]  # a request's own seed wins
    assert two_turns(serve(None), "a") == [None, None]  # seed=None: OS entropy, as before


@pytest.fixture(scope="module")
def tiny():
    from turnwise.policy.chat import ChatFormat
    from turnwise.policy.load import load_policy

    model, tokenizer = load_policy(ModelConfig())
    return model, tokenizer, ChatFormat(tokenizer)


def _tiny_rollouts(tiny, tmp_path, seed: int, concurrent: bool) -> list[tuple[int, ...]]:
    from turnwise.policy.sampler import SamplerEngine

    model, tokenizer, chat = tiny
    store = TrajectoryStore(tmp_path / f"r{seed}-{concurrent}-{time.monotonic_ns()}.db", "job")
    with SamplerEngine(model, tokenizer, max_batch_size=8) as engine:
        app = create_app(sampler=engine, chat=chat, store=store, model_name="tiny",
                         default_params=default_sampling_params(temperature=1.0, max_tokens=24), seed=seed)
        with RuntimeServer(app) as server:
            async def one(i: int) -> None:
                client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="x",
                                            default_headers={"X-Turnwise-Trajectory-Id": f"traj-{i}"})
                await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"order {i % 2}"}])
                await client.close()

            async def all_of_them() -> None:
                if concurrent:
                    await asyncio.gather(*(one(i) for i in range(8)))
                else:
                    for i in range(8):
                        await one(i)

            asyncio.run(all_of_them())
    return [store.get(f"traj-{i}").turns[0].completion_ids for i in range(8)]


def test_same_seed_same_rollouts_with_the_tiny_model(tiny, tmp_path):
    a = _tiny_rollouts(tiny, tmp_path, seed=3, concurrent=False)
    b = _tiny_rollouts(tiny, tmp_path, seed=3, concurrent=False)
    c = _tiny_rollouts(tiny, tmp_path, seed=4, concurrent=False)
    assert a == b  # sequential dispatch, same job seed and trajectory ids: the same tokens
    assert a != c and len(set(a)) > 1  # another seed differs; rollouts of one prompt differ from each other
