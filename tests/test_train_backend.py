"""`LocalBackend` is a `TrainingBackend` (Tinker's five calls): gradients accumulate over
`forward_backward` calls, `optim_step` applies the caller's Adam settings, versions bump only
when the weights changed, and `save_state` / `load_state` restore weights, optimizer and version."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from turnwise.backends import TrainingBackend
from turnwise.config import JobConfig
from turnwise.policy.sampler import SamplerEngine
from turnwise.rollout.runtime import load_engine
from turnwise.train.backend import LocalBackend
from turnwise.types import AdamParams, Datum, Segment

OPTS = JobConfig().loss_options()


def datum(tokens: list[int], advantage: float = 1.0) -> Datum:
    n = len(tokens)
    mask = [0] * (n // 2) + [1] * (n - n // 2)
    seg = Segment(trajectory_id="d", tokens_T=tuple(tokens), loss_mask_T=tuple(mask), logprobs_T=(-1.0,) * n,
                  turn_T=tuple(0 if m else -1 for m in mask), versions_T=(0,) * n)
    return Datum(segment=seg, advantages_T=tuple(advantage * m for m in mask))


@pytest.fixture(scope="module")
def policy():
    model, tokenizer, _, engine = load_engine(JobConfig())
    return model, tokenizer, engine


def test_local_backend_is_a_training_backend_and_publishes_versions(policy, tmp_path):
    model, tokenizer, engine = policy
    with SamplerEngine(model, tokenizer) as sampler:
        backend = LocalBackend(model, sampler, tokenizer=tokenizer, micro_batch_size=2)
        assert isinstance(backend, TrainingBackend)
        assert backend.save_weights_for_sampler() == 1  # the sampler may hold other weights: publish once
        assert backend.save_weights_for_sampler() == 1 and sampler.version == 1  # nothing changed
        before = {k: v.clone() for k, v in model.state_dict().items()}
        data = [datum([5, 6, 7, 8, 9, 10]), datum([11, 12, 13, 14]), datum([20, 21, 22, 23, 24])]
        metrics = backend.forward_backward(data, "ppo", OPTS)
        assert {"loss/value", "loss/clip_frac", "train/logprob_mismatch"} <= set(metrics)
        step = backend.optim_step(AdamParams(learning_rate=1e-3))
        assert step["train/learning_rate"] == 1e-3 and step["loss/grad_norm"] > 0
        assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert backend.save_weights_for_sampler() == 2 and sampler.version == 2
        backend.save_state(tmp_path / "ckpt")
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        backend.forward_backward(data, "ppo", OPTS)
        backend.optim_step(AdamParams(learning_rate=1e-3))
        assert backend.save_weights_for_sampler() == 3
    with SamplerEngine(model, tokenizer) as fresh:  # a resumed run: a new sampler at version 0
        restored = LocalBackend(model, fresh, tokenizer=tokenizer, micro_batch_size=2)
        restored.load_state(tmp_path / "ckpt")
        assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
        assert restored.save_weights_for_sampler() == 2 and fresh.version == 2  # its own version, restored
        assert restored.optimizer.state_dict()["state"]  # Adam moments came back


def test_gradients_accumulate_over_forward_backward_calls_as_one_batch(policy):
    model, tokenizer, _ = policy
    data = [datum([5, 6, 7, 8]), datum([9, 10, 11, 12])]
    backend = LocalBackend(model, None, tokenizer=tokenizer, micro_batch_size=1)
    backend.forward_backward(data, "cross_entropy", OPTS)
    whole = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    backend.optimizer.zero_grad(set_to_none=True)
    for d in data:  # Tinker's contract: two calls before one optim_step add up (each its own mean)
        backend.forward_backward([d], "cross_entropy", OPTS)
    summed = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    backend.optimizer.zero_grad(set_to_none=True)
    assert all(torch.allclose(summed[n], 2 * whole[n], atol=1e-6) for n in whole)


@pytest.mark.parametrize("loss_fn", ["ppo", "cross_entropy"])
def test_micro_batches_of_sorted_lengths_give_the_whole_batch_gradient(policy, loss_fn):
    model, tokenizer, _ = policy
    data = [datum(list(range(5, 5 + n)), advantage=a) for n, a in [(3, 1.0), (9, -0.5), (5, 0.7), (12, 0.2)]]
    grads = []
    for size in (4, 2, 1):
        backend = LocalBackend(model, None, tokenizer=tokenizer, micro_batch_size=size)
        backend.forward_backward(data, loss_fn, OPTS)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        backend.optimizer.zero_grad(set_to_none=True)
    for other in grads[1:]:
        assert all(torch.allclose(other[n], grads[0][n], atol=1e-6) for n in grads[0])


_FREED_RSS = """
import sys, torch
from turnwise.train.backend import return_freed_blocks
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
if sys.argv[1] == "fixed":
    assert return_freed_blocks()
before = rss()
for _ in range(3):  # glibc raises its threshold on the first free: the next block comes from the heap
    block = torch.ones(2 << 20)  # 8 MiB
    del block
print((rss() - before) / 2**20)
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux's /proc")
def test_cpu_backend_returns_freed_blocks_to_the_os():
    """With glibc's adaptive threshold an 8 MiB tensor freed twice stays resident; with the
    backend's fixed 1 MiB threshold it goes back to the OS."""
    def retained(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", _FREED_RSS, mode], capture_output=True, text=True, check=True)
        return float(out.stdout.strip().splitlines()[-1])

    if retained("adaptive") < 6:
        pytest.skip("this C library returns freed blocks by itself (not glibc)")
    assert retained("fixed") < 4
