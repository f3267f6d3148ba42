"""FSDP2 data parallel (`train/distributed.py`) on 2 `gloo` ranks equals one process.

One optimizer step of `DistributedBackend` over 2 ranks and of `LocalBackend` in this process,
from the same weights on the same datums, must give the same weights: max |w_2 - w_1| <= 1e-6
(float32; the two sum gradients in different orders, ~1e-8 relative, and Adam's first step moves
each weight by at most lr = 1e-3). One group of ranks serves every case of this module.
`TURNWISE_TEST_DEVICE=cuda` runs the same cases on 2 GPUs with `nccl` (`bench/gpu_check.sh`).
"""

from __future__ import annotations

import copy
import os
import random

import pytest
import torch

from turnwise.config import ModelConfig, TinyModelConfig, default_loss_options
from turnwise.policy.checkpoint import apply_lora
from turnwise.policy.load import load_policy
from turnwise.train.backend import LocalBackend
from turnwise.train.distributed import DistributedBackend, LearnerSpec, RankGroup, split_by_tokens
from turnwise.types import AdamParams, Datum, Segment

DEVICE = os.environ.get("TURNWISE_TEST_DEVICE", "cpu")
TOL = 1e-6
ADAM = AdamParams(learning_rate=1e-3, max_grad_norm=1e9)


@pytest.fixture(scope="module")
def group() -> RankGroup:
    with RankGroup(2, device_type=DEVICE) as g:
        yield g


@pytest.fixture(scope="module")
def model_cfg(tmp_path_factory: pytest.TempPathFactory) -> ModelConfig:
    tiny = TinyModelConfig(vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=64)
    return ModelConfig(tiny=tiny, cache_dir=str(tmp_path_factory.mktemp("models")), device=DEVICE,
                       dtype="float32")


def datums(n: int, seed: int = 0) -> list[Datum]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(6, 20)
        half = length // 2
        mask = [0] * half + [1] * (length - half)
        seg = Segment(trajectory_id=f"t{i}", tokens_T=tuple(rng.randrange(320) for _ in range(length)),
                      loss_mask_T=tuple(mask), logprobs_T=tuple(-rng.random() * 6 * m for m in mask),
                      turn_T=tuple(m - 1 for m in mask), versions_T=tuple(m - 1 for m in mask))
        adv = rng.choice([-1.0, 0.5, 1.0])
        out.append(Datum(segment=seg, advantages_T=tuple(adv * m for m in mask)))
    return out


def test_split_balances_tokens() -> None:
    lengths = [3, 10, 1, 9, 1, 8, 1, 7]
    shards = split_by_tokens(lengths, 2)
    assert sorted(i for s in shards for i in s) == list(range(8)) and all(s == sorted(s) for s in shards)
    assert sorted(sum(lengths[i] for i in s) for s in shards) == [20, 20]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("loss_fn,agg", [("ppo", "token-mean"), ("cispo", "token-mean"),
                                         ("cross_entropy", "token-mean"), ("ppo", "seq-mean-token-mean")])
def test_one_step_equals_one_process(group: RankGroup, model_cfg: ModelConfig, loss_fn: str, agg: str,
                                     lora: bool) -> None:
    torch.manual_seed(0)
    model, _ = load_policy(model_cfg)
    if lora:
        model = apply_lora(model, 4, 8)
        with torch.no_grad():  # B = 0 at init would leave A without a gradient
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
    one = copy.deepcopy(model)
    options = default_loss_options(loss_agg_mode=agg, kl_coef=0.0 if lora else 0.05)
    local = LocalBackend(one, None, tokenizer=None, micro_batch_size=2, kl_reference=not lora)
    spec = LearnerSpec(model=model_cfg, lora=(4, 8) if lora else None, compute_dtype="float32", micro_batch_size=2,
                       kl_reference=not lora)
    backend = DistributedBackend(group, model, None, tokenizer=None, spec=spec)
    try:
        batch = datums(7)
        m1 = local.forward_backward(batch, loss_fn, options) | local.optim_step(ADAM)
        m2 = backend.forward_backward(batch, loss_fn, options) | backend.optim_step(ADAM)
        assert m2["loss/value"] == pytest.approx(m1["loss/value"], rel=1e-5, abs=1e-6)
        assert m2["loss/grad_norm"] == pytest.approx(m1["loss/grad_norm"], rel=1e-5)
        after = group.call("sampler_weights", shared=False)[0]
        before = {k: v.cpu() for k, v in one.state_dict().items()}
        trained = {n for n, p in one.named_parameters() if p.requires_grad}
        assert trained <= set(after)
        moved = max(float((after[n] - p.detach()).abs().max()) for n, p in model_state(before, trained).items())
        assert moved < TOL, f"max |w_2ranks - w_1process| = {moved:.3g}"
        two, one_lp = backend.forward(batch), local.forward(batch)
        assert [len(x) for x in two] == [len(d.segment.tokens_T) for d in batch]
        assert max(abs(a - b) for x, y in zip(two, one_lp, strict=True) for a, b in zip(x, y, strict=True)) < 1e-5
    finally:
        backend.close()


def model_state(state: dict[str, torch.Tensor], names: set[str]) -> dict[str, torch.Tensor]:
    return {n: state[n] for n in names}
