"""SamplerEngine on the tiny model: determinism, limits, batching, threads, live weight updates, prefix reuse."""

from __future__ import annotations

import asyncio
import threading
import time
from os.path import commonprefix
from pathlib import Path

import pytest
import torch

from turnwise.config import ModelConfig, TinyModelConfig, default_sampling_params
from turnwise.policy.load import load_policy
from turnwise.policy.logprobs import token_logprobs
from turnwise.policy.sampler import EngineClosedError, PromptTooLongError, SamplerEngine
from turnwise.types import FinishReason

GREEDY = default_sampling_params(temperature=0.0, max_tokens=24)




@pytest.fixture()
def engine(policy):
    model, tokenizer = policy
    with SamplerEngine(model, tokenizer, stop_token_ids=()) as eng:
        yield eng


def _prompts(tokenizer, n: int) -> list[list[int]]:
    return [tokenizer.encode(f"<|im_start|>user\nWhere is order {1000 + 37 * i}?" + " please" * (i % 5)
                             + "<|im_end|>\n<|im_start|>assistant\n") for i in range(n)]


def _ref_logprobs(model, prompt: list[int], completion, temperature: float) -> torch.Tensor:
    seq = torch.tensor([prompt + list(completion.token_ids)])
    with torch.no_grad():
        lp, _ = token_logprobs(model, seq, torch.ones_like(seq), temperature)
    return lp[0, len(prompt):]


def test_greedy_and_seeded_sampling_are_deterministic(engine, policy) -> None:
    prompt = _prompts(policy[1], 1)[0]
    a, b = (engine.submit(prompt, GREEDY).result() for _ in range(2))
    assert a.token_ids == b.token_ids and len(a.token_ids) == 24
    assert a.finish_reason is FinishReason.LENGTH and a.prompt_tokens == len(prompt)
    hot = default_sampling_params(temperature=1.0, max_tokens=24, seed=7)
    x, y = (engine.submit(prompt, hot).result() for _ in range(2))
    z = engine.submit(prompt, default_sampling_params(temperature=1.0, max_tokens=24, seed=8)).result()
    assert x.token_ids == y.token_ids and x.logprobs == y.logprobs
    assert z.token_ids != x.token_ids


def test_stop_token_and_stop_string(policy) -> None:
    model, tokenizer = policy
    prompt = _prompts(tokenizer, 1)[0]
    seeded = default_sampling_params(temperature=1.0, max_tokens=24, seed=11)
    with SamplerEngine(model, tokenizer, stop_token_ids=()) as eng:
        free = eng.submit(prompt, seeded).result()
        text = tokenizer.decode(free.token_ids)
        cut = len(tokenizer.decode(free.token_ids[:8]))
        stop = text[cut - 3: cut]
        by_string = eng.submit(prompt, default_sampling_params(temperature=1.0, max_tokens=24, seed=11, stop=(stop,))).result()
    stop_id = free.token_ids[5]
    with SamplerEngine(model, tokenizer, stop_token_ids={stop_id}) as eng:
        stopped = eng.submit(prompt, seeded).result()
    first = free.token_ids.index(stop_id)
    assert stopped.token_ids == free.token_ids[: first + 1] and stopped.finish_reason is FinishReason.STOP
    n = len(by_string.token_ids)
    assert by_string.finish_reason is FinishReason.STOP and by_string.token_ids == free.token_ids[:n]
    assert stop in tokenizer.decode(by_string.token_ids) and stop not in tokenizer.decode(by_string.token_ids[:-1])


def test_batched_equals_one_at_a_time(engine, policy) -> None:
    prompts = _prompts(policy[1], 12)
    futures = [engine.submit(p, GREEDY) for p in prompts]
    batched = [f.result() for f in futures]
    for prompt, got in zip(prompts, batched, strict=True):
        alone = engine.submit(prompt, GREEDY).result()
        assert got.token_ids == alone.token_ids
        assert max(abs(a - b) for a, b in zip(got.logprobs, alone.logprobs, strict=True)) < 1e-4


def test_concurrent_submits_from_threads(engine, policy) -> None:
    prompts = _prompts(policy[1], 16)
    expected = [engine.submit(p, GREEDY).result().token_ids for p in prompts]
    results: dict[int, tuple[int, ...]] = {}

    def worker(start: int) -> None:
        for i in range(start, 16, 4):
            results[i] = engine.submit(prompts[i], GREEDY).result().token_ids

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(16)] == expected


def test_newcomers_join_a_running_batch(engine, policy) -> None:
    prompts = _prompts(policy[1], 4)
    solo = [engine.submit(p, GREEDY).result() for p in prompts[1:]]
    long = engine.submit(prompts[0], default_sampling_params(temperature=0, max_tokens=300))
    time.sleep(0.05)
    short = [engine.submit(p, GREEDY) for p in prompts[1:]]
    got = [f.result() for f in short]
    assert not long.done()
    assert [g.token_ids for g in got] == [s.token_ids for s in solo]
    assert len(long.result().token_ids) == 300


def test_update_weights_while_requests_are_in_flight(policy) -> None:
    model, tokenizer = policy
    prompt = _prompts(tokenizer, 1)[0]
    new_state = {k: v + 0.01 * torch.randn_like(v) for k, v in model.state_dict().items() if v.is_floating_point()}
    with SamplerEngine(model, tokenizer, stop_token_ids=()) as eng:
        before = eng.submit(prompt, GREEDY).result()
        in_flight = eng.submit(prompt, default_sampling_params(temperature=0, max_tokens=400))
        time.sleep(0.05)
        assert eng.update_weights(new_state) == 1
        done = in_flight.result()
        after = eng.submit(prompt, GREEDY).result()
        with pytest.raises(KeyError):
            eng.update_weights({"no.such.weight": torch.zeros(1)})
        with pytest.raises(ValueError, match="no weight was changed"):
            eng.update_weights({"lm_head.weight": torch.zeros(3, 3)})
        assert eng.version == 1
    assert len(done.token_ids) == 400 and done.version == 0
    assert after.version == 1 and before.version == 0
    updated = type(model)(model.config)
    updated.load_state_dict({**model.state_dict(), **new_state})
    updated.eval()
    assert torch.allclose(_ref_logprobs(updated, prompt, after, 0.0), torch.tensor(after.logprobs), atol=1e-4)
    assert not torch.allclose(_ref_logprobs(model, prompt, after, 0.0), torch.tensor(after.logprobs), atol=1e-4)


def test_prefix_reuse_matches_full_prefill(engine, policy) -> None:
    model, tokenizer = policy
    first = _prompts(tokenizer, 1)[0]
    turn1 = engine.submit(first, GREEDY, cache_key="traj-1").result()
    delta = tokenizer.encode("<|im_end|>\n<|im_start|>user\nAnd order 77?<|im_end|>\n<|im_start|>assistant\n")
    second = first + list(turn1.token_ids) + delta
    params = default_sampling_params(temperature=0.8, max_tokens=24, seed=3)
    reused = engine.submit(second, params, cache_key="traj-1").result()
    full = engine.submit(second, params).result()
    assert reused.prompt_tokens == len(delta) + 1 and full.prompt_tokens == len(second)
    assert reused.token_ids == full.token_ids
    assert max(abs(a - b) for a, b in zip(reused.logprobs, full.logprobs, strict=True)) < 1e-4
    assert torch.allclose(_ref_logprobs(model, second, reused, 0.8), torch.tensor(reused.logprobs), atol=1e-4)


def test_context_limit(tmp_path: Path) -> None:
    cfg = ModelConfig(cache_dir=str(tmp_path), tiny=TinyModelConfig(max_position_embeddings=64, hidden_size=32,
                                                                     intermediate_size=64))
    model, tokenizer = load_policy(cfg)
    with SamplerEngine(model, tokenizer, stop_token_ids=()) as eng:
        got = eng.submit(list(range(10, 70)), default_sampling_params(temperature=0, max_tokens=50)).result()
        with pytest.raises(PromptTooLongError):
            eng.submit(list(range(10, 74)), GREEDY).result()
    assert len(got.token_ids) == 4 and got.finish_reason is FinishReason.LENGTH


def test_async_generate_and_close(policy) -> None:
    model, tokenizer = policy
    prompts = _prompts(tokenizer, 3)
    eng = SamplerEngine(model, tokenizer).start()

    async def run() -> list:
        return await asyncio.gather(*(eng.generate(p, GREEDY) for p in prompts))

    assert len(asyncio.run(run())) == 3
    pending = eng.submit(prompts[0], default_sampling_params(temperature=0, max_tokens=100_000))
    eng.close()
    eng.close()
    with pytest.raises(EngineClosedError):
        pending.result(timeout=5)
    with pytest.raises(EngineClosedError):
        eng.submit(prompts[0], GREEDY).result()


def test_mixed_prefix_batch_and_lru_bound(policy) -> None:
    """Rows with different reused prefixes (and none) prefilled together match a fresh full prefill."""
    model, tokenizer = policy
    firsts = _prompts(tokenizer, 3)
    params = default_sampling_params(temperature=0.9, max_tokens=12, seed=5)
    with SamplerEngine(model, tokenizer, prefix_cache_size=2) as eng:
        turn1 = [eng.submit(p, GREEDY, cache_key=f"t{i}").result() for i, p in enumerate(firsts)]
        tails = [tokenizer.encode(f"<|im_end|>\n<|im_start|>user\n{'more ' * (3 * i)}ok?<|im_end|>\n") for i in range(3)]
        seconds = [p + list(c.token_ids) + tail for p, c, tail in zip(firsts, turn1, tails, strict=True)]
        futures = [eng.submit(s, params, cache_key=f"t{i}") for i, s in enumerate(seconds)]
        futures.append(eng.submit(firsts[0] + [5, 6, 7], params))
        got = [f.result() for f in futures]
    # t0 was evicted (the cache holds the 2 most recent keys); it shares the prefill of its first
    # prompt with the last request, which has no key
    shared = len(commonprefix([seconds[0], firsts[0] + [5, 6, 7]]))
    assert got[0].prompt_tokens == len(seconds[0]) - shared and got[3].prompt_tokens == 3 + len(firsts[0]) - shared
    assert [g.prompt_tokens for g in got[1:3]] == [len(t) + 1 for t in tails[1:]]
    for prompt, completion in zip([*seconds, firsts[0] + [5, 6, 7]], got, strict=True):
        assert torch.allclose(_ref_logprobs(model, prompt, completion, 0.9), torch.tensor(completion.logprobs),
                              atol=1e-4)


def test_prompts_that_begin_alike_share_one_prefill(policy) -> None:
    """Rollouts of one step share the system prompt: it is prefilled once, results unchanged."""
    model, tokenizer = policy
    system = tokenizer.encode("<|im_start|>system\nYou are a support agent. Follow the SOP for every "
                              "request and look up the order first.<|im_end|>\n")
    prompts = [system + tokenizer.encode(f"<|im_start|>user\nWhere is order {1000 + 7 * i}?<|im_end|>\n")
               for i in range(4)]
    shared = len(system) + len(tokenizer.encode("<|im_start|>user\nWhere is order "))
    params = default_sampling_params(temperature=0.9, max_tokens=12, seed=5)
    with SamplerEngine(model, tokenizer, prefix_cache_size=0) as plain:
        want = [plain.submit(p, params).result() for p in prompts]
    eng = SamplerEngine(model, tokenizer)
    futures = [eng.submit(p, params) for p in prompts]  # queued before start: admitted together
    with eng.start():
        got = [f.result() for f in futures]
        later = eng.submit(prompts[1], params).result()  # a lone request reuses the shared entry
        eng.update_weights({})
        after_update = eng.submit(prompts[1], params).result()
    assert all(g.prompt_tokens <= len(p) - shared for g, p in zip(got, prompts, strict=True))
    assert later.prompt_tokens <= len(prompts[1]) - shared
    assert after_update.prompt_tokens == len(prompts[1])  # new weights: nothing shared survives
    for g, w, prompt in zip([*got, later], [*want, want[1]], [*prompts, prompts[1]], strict=True):
        assert g.token_ids == w.token_ids
        assert torch.allclose(_ref_logprobs(model, prompt, g, 0.9), torch.tensor(g.logprobs), atol=1e-4)
