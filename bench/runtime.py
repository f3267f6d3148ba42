"""Runtime server benchmark with a stub policy that answers instantly.

(a) Latency the runtime adds to one chat completion over calling the sampler directly: HTTP on
    loopback, request parsing, prompt planning (stored tokens + delta), sampling, parsing,
    durable recording in SQLite, response. Sequential 3-turn conversations on a keep-alive
    connection; p50 and p99 of (HTTP round trip - direct sampler call).
(b) 1,024 concurrent rollouts of 3 turns each through the OpenAI SDK (a client per rollout, as
    the trainer's dispatcher does), each then reporting complete-rollout and update-reward: all must be recorded
    and rewarded, with one token-exact segment each; rollouts per second.
(c) First-token latency with the built-in tiny model's sampler engine (a real sampler):
    sequential streamed requests through the OpenAI SDK (time to the first content chunk) side
    by side with the same requests unstreamed (time to the whole completion, which is also
    what streaming cost before it was real); `--first-token 0` skips it.

    .venv/bin/python bench/runtime.py [--requests 3000] [--rollouts 1024] [--first-token 40]

The server runs in a background thread of this process (the embedded default), so the client
and the server share the interpreter; the last line is `runtime_overhead_p50_ms: <value>`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from turnwise.adapter import FeedbackClient, RolloutContext
from turnwise.config import default_sampling_params
from turnwise.runtime.capture import build_segments
from turnwise.runtime.server import RuntimeServer
from turnwise.runtime.store import TrajectoryStore
from turnwise.runtime.testing import IM_END, ByteChat, ScriptedSampler, stub_app
from turnwise.types import Message, TrajectoryStatus


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def direct_sampler_ms(n: int) -> list[float]:
    chat = ByteChat()
    ids = chat.encode("ok") + [IM_END]
    sampler = ScriptedSampler(lambda _: ids)
    prompt = chat.prompt_ids([Message(role="user", content="question 0")], None)
    params = default_sampling_params()

    async def run() -> list[float]:
        out = []
        for _ in range(n):
            start = time.perf_counter()
            await sampler.generate(prompt, params)
            out.append((time.perf_counter() - start) * 1e3)
        return out

    return asyncio.run(run())


def overhead(base_url: str, n_requests: int) -> tuple[list[float], list[float]]:
    direct = direct_sampler_ms(n_requests)
    http_ms: list[float] = []
    with httpx.Client(base_url=base_url, timeout=30) as client:
        for i in range(n_requests // 3 + 1):
            headers = {"X-Amzn-SageMaker-Trajectory-Id": f"lat-{i}"}
            messages: list[dict] = [{"role": "user", "content": f"question {i}"}]
            for turn in range(3):
                start = time.perf_counter()
                r = client.post("/v1/chat/completions", headers=headers, json={"model": "stub", "messages": messages})
                http_ms.append((time.perf_counter() - start) * 1e3)
                assert r.status_code == 200, r.text
                messages += [r.json()["choices"][0]["message"], {"role": "user", "content": f"follow-up {turn}"}]
    warm = http_ms[30:]  # skip connection setup and first-call imports
    return warm, direct


async def many_rollouts(base_url: str, n: int) -> float:
    """Each rollout has its own AsyncOpenAI client, as the trainer's dispatcher gives them (one
    shared httpx pool with 1,024 requests in flight spends its time scanning its connections)."""
    feedback = FeedbackClient(base_url)

    async def one(i: int) -> None:
        ctx = RolloutContext(f"roll-{i}", base_url, "stub", {})
        client = ctx.async_openai(max_retries=5)
        messages = [{"role": "user", "content": f"task {i}"}]
        for turn in range(3):
            r = await client.chat.completions.create(model="stub", messages=messages)
            messages += [r.choices[0].message.model_dump(exclude_none=True),
                         {"role": "user", "content": f"result {turn}"}]
        await client.close()
        await feedback.complete_rollout(ctx.trajectory_id, "ready")
        await feedback.update_reward(ctx.trajectory_id, [0.0, 0.0, 1.0])

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    seconds = time.perf_counter() - start
    await feedback.aclose()
    return seconds


def first_token_ms(n: int, max_tokens: int) -> tuple[list[float], list[float], list[int]]:
    """(streamed: ms to the first content chunk, unstreamed: ms to the whole reply, tokens per reply)."""
    import openai

    from turnwise.config import ModelConfig
    from turnwise.policy.chat import ChatFormat
    from turnwise.policy.load import load_policy
    from turnwise.policy.sampler import SamplerEngine
    from turnwise.runtime.app import create_app

    model, tokenizer = load_policy(ModelConfig())
    first, whole, lengths = [], [], []
    with tempfile.TemporaryDirectory() as tmp, SamplerEngine(model, tokenizer, max_batch_size=8) as engine:
        app = create_app(sampler=engine, chat=ChatFormat(tokenizer), store=TrajectoryStore(Path(tmp) / "t.db", "ft"),
                         model_name="tiny", default_params=default_sampling_params(temperature=1.0, max_tokens=max_tokens))
        with RuntimeServer(app) as server:
            client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x")
            for i in range(2 * n):
                headers = {"X-Turnwise-Trajectory-Id": f"ft-{i}"}
                messages = [{"role": "user", "content": f"Where is my order {i // 2}?"}]
                start = time.perf_counter()
                if i % 2 == 0:
                    got = None
                    for chunk in client.chat.completions.create(model="tiny", messages=messages, stream=True,
                                                                extra_headers=headers):
                        if got is None and chunk.choices and chunk.choices[0].delta.content:
                            got = (time.perf_counter() - start) * 1e3
                    first.append(got if got is not None else (time.perf_counter() - start) * 1e3)
                else:
                    r = client.chat.completions.create(model="tiny", messages=messages, extra_headers=headers)
                    whole.append((time.perf_counter() - start) * 1e3)
                    lengths.append(r.usage.completion_tokens)
    return first, whole, lengths


@contextmanager
def runtime_server(db: Path, mode: str) -> Iterator[str]:
    """The stub-policy runtime: in a thread of this process (embedded) or in its own process."""
    if mode == "thread":
        with RuntimeServer(stub_app(TrajectoryStore(db, "bench"), reply="ok")) as server:
            yield server.base_url
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "turnwise.runtime.testing", "--db", str(db), "--job", "bench",
                             "--port", str(port), "--reply", "ok"])
    base_url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(base_url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        yield base_url
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rollouts", type=int, default=1024)
    parser.add_argument("--first-token", type=int, default=40, help="streamed/unstreamed request pairs for (c)")
    parser.add_argument("--max-tokens", type=int, default=64, help="completion length in (c)")
    parser.add_argument("--server", choices=("thread", "process"), default="thread",
                        help="thread: embedded in this process (shares the GIL with the agents); "
                             "process: standalone, as `turnwise serve`")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bench.db"
        with runtime_server(db, args.server) as base_url:
            http_ms, direct_ms = overhead(base_url, args.requests)
            seconds = asyncio.run(many_rollouts(base_url, args.rollouts))
        store = TrajectoryStore(db, "bench")
        rolled = [t for t in store.list() if t.id.startswith("roll-")]
        rewarded = [t for t in rolled if t.status == TrajectoryStatus.REWARDED and len(t.turns) == 3
                    and t.rewards == (0.0, 0.0, 1.0)]
        one_segment = sum(len(build_segments(t)) == 1 for t in rewarded)
        lost = args.rollouts - len(rewarded)

    d50 = statistics.median(direct_ms)
    over = [h - d50 for h in http_ms]
    p50, p99 = statistics.median(over), percentile(over, 0.99)
    print(f"server: {args.server}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"(a) per chat completion, {len(http_ms)} sequential requests (3-turn conversations), loopback HTTP")
    print(f"    direct sampler call      p50 {d50 * 1e3:8.1f} us   p99 {percentile(direct_ms, 0.99) * 1e3:8.1f} us")
    print(f"    through the runtime      p50 {statistics.median(http_ms):8.3f} ms   p99 {percentile(http_ms, 0.99):8.3f} ms")
    print(f"    runtime overhead         p50 {p50:8.3f} ms   p99 {p99:8.3f} ms   (target p50 <= 2 ms: "
          f"{'met' if p50 <= 2.0 else 'MISSED'})")
    print(f"(b) {args.rollouts} concurrent rollouts x 3 turns via the OpenAI SDK + complete + reward")
    print(f"    rewarded with 3 turns    {len(rewarded)}/{args.rollouts}   lost {lost}   one segment each "
          f"{one_segment}/{len(rewarded)}")
    print(f"    wall                     {seconds:8.2f} s   rollouts/s {args.rollouts / seconds:8.1f}   "
          f"chat completions/s {3 * args.rollouts / seconds:8.1f}")
    if args.first_token > 0:
        first, whole, lengths = first_token_ms(args.first_token, args.max_tokens)
        print(f"(c) tiny model, {args.first_token} streamed and {args.first_token} unstreamed requests, "
              f"max_tokens {args.max_tokens} (replies of {statistics.median(lengths):.0f} tokens, median)")
        print(f"    first content chunk      p50 {statistics.median(first):8.1f} ms   p99 {percentile(first, 0.99):8.1f} ms")
        print(f"    whole reply (unstreamed) p50 {statistics.median(whole):8.1f} ms   p99 {percentile(whole, 0.99):8.1f} ms")
        print(f"first_token_latency_p50_ms: {statistics.median(first):.1f} "
              f"(whole reply {statistics.median(whole):.1f}; {statistics.median(whole) / statistics.median(first):.2f}x)")
    print(f"runtime_overhead_p50_ms: {p50:.3f}")


if __name__ == "__main__":
    main()
