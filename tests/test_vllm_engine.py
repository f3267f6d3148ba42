"""vLLM as the sampling engine, on the CPU build (`make vllm`): two real `vllm serve` replicas of
the tiny model, shared by every test here (starting one takes minutes on a small machine).

In file order: token-exact sampling (trainer-recomputed logprobs equal vLLM's), weight sync
(outputs change, a request in flight survives it), two training steps of the demo's environment
attached to the servers, a replica killed mid-request (nothing lost, the retry counted, the
replica restarted), then LoRA adapter sync (each version served by name, a request in flight
finishes on its own version)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
if not VLLM_PYTHON.is_file():
    pytest.skip("no .venv-vllm: run `make vllm` to run the vLLM tests", allow_module_level=True)

from turnwise.config import VLLMConfig, load_config  # noqa: E402
from turnwise.policy.chat import stop_token_ids_for  # noqa: E402
from turnwise.policy.checkpoint import adapter_state_dict, apply_lora  # noqa: E402
from turnwise.policy.logprobs import token_logprobs  # noqa: E402
from turnwise.policy.vllm_engine import VLLMEngine  # noqa: E402
from turnwise.policy.vllm_model import save_untied, tied_names  # noqa: E402
from turnwise.types import FinishReason, SamplingParams  # noqa: E402

pytestmark = pytest.mark.slow
DEMO = REPO / "examples" / "support_desk" / "config.yaml"
TOLERANCE = 1e-3
"""|trainer - vLLM| logprob per token, float32 on both sides (observed: ~1e-6 on the fixture's
weights, ~1e-4 after the weight-sync test's large random update)."""


@pytest.fixture(scope="module")
def served(policy, tmp_path_factory: pytest.TempPathFactory):
    """(engine over two replicas, the policy it serves, tokenizer)."""
    model, tokenizer = policy
    model_dir = tmp_path_factory.mktemp("vllm-model")
    save_untied(model, tokenizer, model_dir, torch.float32)  # what `vllm_engine` serves for a tied model
    cfg = VLLMConfig(python=str(VLLM_PYTHON), replicas=2,
                     args=["--enforce-eager", "--kv-cache-memory-bytes", str(512 << 20), "--block-size", "32"])
    engine = VLLMEngine(cfg, model_dir, dtype="float32", stop_token_ids=stop_token_ids_for(tokenizer),
                        work_dir=tmp_path_factory.mktemp("vllm-work"), untied=tied_names(model), lora_rank=8)
    with engine:
        yield engine, model, tokenizer


def _prompts(tokenizer, n: int) -> list[list[int]]:
    return [tokenizer.encode(f"<|im_start|>user\ncustomer {i} asks about order {7 * i}<|im_end|>\n"
                             "<|im_start|>assistant\n") for i in range(n)]


def _recomputed(model, prompt: list[int], tokens: tuple[int, ...], temperature: float) -> torch.Tensor:
    ids = torch.tensor([[*prompt, *tokens]])
    with torch.no_grad():
        lp, _ = token_logprobs(model, ids, torch.ones_like(ids), temperature)
    return lp[0, len(prompt):]


async def _gather(engine: VLLMEngine, prompts: list[list[int]], params: SamplingParams, keys=None):
    keys = keys or [None] * len(prompts)
    return await asyncio.gather(*(engine.generate(p, params, cache_key=k) for p, k in zip(prompts, keys, strict=True)))


def test_token_in_token_out_matches_the_trainer(served):
    engine, model, tokenizer = served
    prompts = _prompts(tokenizer, 6)
    sampled = asyncio.run(_gather(engine, prompts, SamplingParams(1.0, 1.0, 24, seed=3), [f"t{i}" for i in range(6)]))
    greedy = asyncio.run(_gather(engine, prompts[:2], SamplingParams(0.0, 1.0, 24, top_logprobs=3)))
    diffs = []
    for prompt, c in zip(prompts, sampled, strict=True):
        assert c.token_ids and len(c.logprobs) == len(c.token_ids) and c.version == engine.version
        diffs.append((_recomputed(model, prompt, c.token_ids, 1.0) - torch.tensor(c.logprobs)).abs().max())
    for prompt, c in zip(prompts[:2], greedy, strict=True):
        diffs.append((_recomputed(model, prompt, c.token_ids, 1.0) - torch.tensor(c.logprobs)).abs().max())
        assert all(top[0][0] == tok for top, tok in zip(c.top_logprobs, c.token_ids, strict=True))
        assert len(c.top_logprobs) == len(c.token_ids) and all(len(top) == 3 for top in c.top_logprobs)
    assert max(diffs) < TOLERANCE, f"mismatch/logprob_abs_diff {max(diffs):.2e}"
    # the same seed samples the same tokens (alone both times: vLLM is not batch-invariant); the
    # second turn of a trajectory reuses its prefix
    once, again = (asyncio.run(_gather(engine, prompts[:1], SamplingParams(1.0, 1.0, 24, seed=3), ["t0"]))[0]
                   for _ in range(2))
    assert once.token_ids == again.token_ids
    turn2 = [*prompts[0], *sampled[0].token_ids, *tokenizer.encode("<|im_start|>user\nthanks<|im_end|>\n")]
    second = asyncio.run(_gather(engine, [turn2], SamplingParams(1.0, 1.0, 8, seed=1), ["t0"]))[0]
    assert second.prompt_tokens < len(turn2)  # cached prefix tokens are not computed again


def test_weight_sync_changes_outputs_and_keeps_requests_in_flight(served):
    engine, model, tokenizer = served
    prompts = _prompts(tokenizer, 2)
    greedy = SamplingParams(0.0, 1.0, 16)
    before = asyncio.run(_gather(engine, prompts, greedy))
    v0 = engine.version
    # named_parameters lists a tied embedding once, as training's state dicts hold it
    new = {k: (v + 0.3 * torch.randn_like(v) if v.dim() == 2 else v).detach().clone()
           for k, v in model.named_parameters()}

    async def long_request_across_an_update():
        task = asyncio.ensure_future(engine.generate(prompts[0], SamplingParams(1.0, 1.0, 400, seed=5)))
        await asyncio.sleep(1.0)
        assert not task.done()
        await asyncio.to_thread(engine.update_weights, new)
        return await task

    spanning = asyncio.run(long_request_across_an_update())
    assert engine.version == v0 + 1
    assert spanning.version == v0  # the oldest weights that sampled it
    assert spanning.finish_reason is FinishReason.STOP or len(spanning.token_ids) == 400
    assert engine.last_sync_s > 0 and engine.last_sync_bytes > 0
    after = asyncio.run(_gather(engine, prompts, greedy))
    assert [c.token_ids for c in after] != [c.token_ids for c in before]
    assert all(c.version == v0 + 1 for c in after)
    model.load_state_dict(new, strict=False)  # the trainer's side now holds the same weights
    diff = (_recomputed(model, prompts[1], after[1].token_ids, 1.0) - torch.tensor(after[1].logprobs)).abs().max()
    assert diff < TOLERANCE, f"mismatch/logprob_abs_diff after the update {diff:.2e}"


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_two_training_steps_sample_on_vllm(served, tmp_path: Path, monkeypatch, lora: bool):
    from turnwise.train.job import run_train

    engine, _, _ = served
    monkeypatch.chdir(REPO)
    monkeypatch.syspath_prepend(str(REPO / "tests"))
    rows = (DEMO.parent / "data" / "train.jsonl").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(rows[:4]) + "\n")
    (tmp_path / "val.jsonl").write_text("\n".join(rows[4:6]) + "\n")
    demos = (DEMO.parent / "data" / "demos.jsonl").read_text().splitlines()[:8]
    (tmp_path / "demos.jsonl").write_text("\n".join(demos) + "\n")
    urls = json.dumps([r.url for r in engine.replicas])
    cfg = load_config(DEMO, [
        f"output_dir={tmp_path / 'runs'}", f"data.train_path={tmp_path / 'train.jsonl'}",
        f"data.val_path={tmp_path / 'val.jsonl'}", f"warm_start.demos_path={tmp_path / 'demos.jsonl'}",
        "warm_start.epochs=1", "warm_start.batch_size=4", "global_batch_size=2", "group_size=2", "max_steps=2",
        "val_every=1", "sampling_max_tokens=16", "tracking.progress=false", "agent.function=e2e_agent:agent",
        "sampler.backend=vllm", f"sampler.vllm.urls={urls}", *(["lora_rank=8", "learning_rate=1e-2"] if lora else []),
    ])
    result, _ = run_train(cfg)

    assert result.steps == 2
    metrics = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "train/policy_version" in m]
    assert [m["train/policy_version"] for m in steps] == [2.0, 3.0]  # 1: the warm start's weights
    assert all(m["weights/bytes_sent"] > 0 and m["speed/weight_sync_s"] > 0 for m in steps)
    # LoRA: the adapters only (rank 8 on the tiny model's 7 linear layers x 4: 0.5 MB), not 13.6 MB of weights
    assert all((m["weights/bytes_sent"] < 1e6) == lora for m in steps)
    assert all(m["sampler/retries"] == 0 for m in steps)
    mismatch = max(m["train/logprob_mismatch_max"] for m in steps)
    assert mismatch < TOLERANCE, f"mismatch/logprob_abs_diff {mismatch:.2e}"
    rollouts = [json.loads(line) for line in (result.run_dir / "rollouts" / "step_00002.jsonl").read_text().splitlines()]
    assert len(rollouts) == 4 and any(r["status"] == "rewarded" for r in rollouts)


def test_a_killed_replica_loses_no_request(served):
    engine, model, tokenizer = served
    # back to the random policy: the training test left a trained one, whose replies end in a few tokens
    engine.update_weights({k: p.detach() for k, p in model.named_parameters()})
    prompts = _prompts(tokenizer, 8)
    keys = [f"kill-{i}" for i in range(8)]
    params = SamplingParams(1.0, 1.0, 300, seed=11)
    engine.step_metrics()
    victim = engine.replicas[0]
    killed = threading.Event()

    async def run_and_kill():
        tasks = [asyncio.ensure_future(engine.generate(p, params, cache_key=k)) for p, k in zip(prompts, keys, strict=True)]
        await asyncio.sleep(0.5)
        assert engine.router.load[0] > 0  # some are in flight on the victim (others may have stopped early)
        victim.server.kill()
        killed.set()
        return await asyncio.gather(*tasks)

    done = asyncio.run(run_and_kill())
    assert killed.is_set() and len(done) == 8
    assert all(c.token_ids and len(c.logprobs) == len(c.token_ids) for c in done)
    assert engine.step_metrics()["sampler/retries"] >= 1
    # the victim is out of routing and being started again
    assert not engine.router.up[0]
    deadline = time.monotonic() + 30
    while not victim.server.alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert victim.server.alive()


def test_lora_adapters_are_served_by_version(served):
    engine, model, tokenizer = served
    deadline = time.monotonic() + 600  # the previous test's victim: back in routing with these weights
    while not all(engine.router.up) and time.monotonic() < deadline:
        time.sleep(1.0)
    assert all(engine.router.up)
    import copy

    policy = apply_lora(copy.deepcopy(model), 8, 16)
    gen = torch.Generator().manual_seed(4)

    def new_adapters() -> dict[str, torch.Tensor]:
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.3 * torch.randn(p.shape, generator=gen))
        return adapter_state_dict(policy)

    v0 = engine.version
    assert engine.serve_adapters(policy.peft_config["default"], {k: p.detach() for k, p in model.named_parameters()},
                                 adapter_state_dict(policy))
    assert engine.version == v0 and engine._loaded == [f"policy-{engine._adapter_tag}-v{v0}"]
    prompts = _prompts(tokenizer, 2)
    greedy = SamplingParams(0.0, 1.0, 16)
    v1 = engine.update_weights(new_adapters())
    assert engine.last_sync_bytes == sum(t.numel() * 4 for t in adapter_state_dict(policy).values())
    first = asyncio.run(_gather(engine, prompts, greedy))
    diffs = [(_recomputed(policy, p, c.token_ids, 1.0) - torch.tensor(c.logprobs)).abs().max()
             for p, c in zip(prompts, first, strict=True)]
    assert all(c.version == v1 for c in first) and max(diffs) < TOLERANCE, f"adapter logprobs {max(diffs):.2e}"
    with torch.no_grad(), policy.disable_adapter():  # the adapters change what the base would say
        base = _recomputed(policy, prompts[0], first[0].token_ids, 1.0)
    assert (base - torch.tensor(first[0].logprobs)).abs().max() > 10 * TOLERANCE

    v1_policy = copy.deepcopy(policy)

    async def long_request_across_an_update():
        task = asyncio.ensure_future(engine.generate(prompts[0], SamplingParams(1.0, 1.0, 300, seed=5)))
        await asyncio.sleep(1.0)
        assert not task.done()
        await asyncio.to_thread(engine.update_weights, new_adapters())
        return await task

    spanning = asyncio.run(long_request_across_an_update())
    v2 = engine.version
    assert v2 == v1 + 1 and spanning.version == v1
    # finish-then-swap: every token of the spanning request came from version 1's adapters
    diff = (_recomputed(v1_policy, prompts[0], spanning.token_ids, 1.0) - torch.tensor(spanning.logprobs)).abs().max()
    assert diff < TOLERANCE, f"spanning request vs its version's adapters {diff:.2e}"
    after = asyncio.run(_gather(engine, prompts, greedy))
    diff = (_recomputed(policy, prompts[1], after[1].token_ids, 1.0) - torch.tensor(after[1].logprobs)).abs().max()
    assert all(c.version == v2 for c in after) and diff < TOLERANCE
    engine.update_weights(new_adapters())  # version 1 has no request left: unloaded, its files gone
    assert engine._loaded == [f"policy-{engine._adapter_tag}-v{v2 + 1}"]
    assert [p.name for p in (engine.weights_dir / "adapters").iterdir()] == engine._loaded
