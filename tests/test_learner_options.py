"""Learner options: `model.device` / `model.dtype` / `trainer.*` config checks, the managed
service's LoRA defaults, activation checkpointing (same step, less memory), and LoRA weight sync
that sends the adapters only to a sampler whose adapter twin shares the policy's base tensors."""

from __future__ import annotations

import copy

import pytest
import torch

from turnwise.config import ConfigError, JobConfig, ModelConfig, TinyModelConfig, load_config
from turnwise.policy.checkpoint import adapter_twin, apply_lora
from turnwise.policy.load import ModelLoadError, load_policy, resolve_device, resolve_dtype
from turnwise.policy.logprobs import token_logprobs
from turnwise.policy.sampler import SamplerEngine
from turnwise.train.backend import LocalBackend
from turnwise.types import AdamParams, Datum, Segment

OPTS = JobConfig().loss_options()
ADAM = AdamParams(learning_rate=1e-2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    tiny = TinyModelConfig(vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=64)
    return load_policy(ModelConfig(tiny=tiny, cache_dir=str(tmp_path_factory.mktemp("m")), device="cpu"))


def datum(tokens: list[int], advantage: float) -> Datum:
    n = len(tokens)
    mask = [0] * (n // 2) + [1] * (n - n // 2)
    seg = Segment(trajectory_id="d", tokens_T=tuple(tokens), loss_mask_T=tuple(mask), logprobs_T=(-1.0,) * n,
                  turn_T=tuple(0 if m else -1 for m in mask), versions_T=(0,) * n)
    return Datum(segment=seg, advantages_T=tuple(advantage * m for m in mask))


BATCH = [datum([5, 6, 7, 8, 9, 10], 1.0), datum([11, 12, 13, 14], -1.0), datum([20, 21, 22, 23, 24, 25, 26], 0.5)]


def test_device_dtype_and_trainer_keys() -> None:
    cfg = load_config(None, ["model.device=cpu", "model.dtype=bfloat16", "trainer.nproc=2",
                             "trainer.activation_checkpointing=true"])
    assert resolve_device(cfg.model) == torch.device("cpu") and resolve_dtype(cfg.model) == torch.bfloat16
    assert cfg.trainer.nproc == 2 and cfg.trainer.activation_checkpointing
    auto = JobConfig().model
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(auto).type == expected
    assert resolve_dtype(auto) == (torch.bfloat16 if expected == "cuda" else torch.float32)
    for bad, key in (("model.device=tpu", "model.device"), ("trainer.nproc=0", "trainer.nproc"),
                     ("model.dtype=fp8", "model.dtype"), ("trainer.nprocs=2", "trainer.nprocs")):
        with pytest.raises(ConfigError, match=key) as e:
            load_config(None, [bad])
        assert "\n" not in str(e.value)
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no CUDA device"):
            resolve_device(ModelConfig(device="cuda"))


def test_lora_defaults_are_the_managed_services() -> None:
    assert JobConfig().lora_sizes() is None
    assert JobConfig(lora=True).lora_sizes() == (32, 64)
    assert JobConfig(lora_rank=8).lora_sizes() == (8, 16)
    assert JobConfig(lora=True, lora_alpha=16).lora_sizes() == (32, 16)


def test_activation_checkpointing_gives_the_same_step(tiny) -> None:
    model, _ = tiny
    plain, checkpointed = copy.deepcopy(model), copy.deepcopy(model)
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    for m in (plain, checkpointed):
        backend = LocalBackend(m, None, tokenizer=None, micro_batch_size=2)
        backend.forward_backward(BATCH, "ppo", OPTS)
        backend.optim_step(ADAM)
    a, b = plain.state_dict(), checkpointed.state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    assert any(not torch.equal(a[k], model.state_dict()[k]) for k in a)  # it trained


def test_lora_sync_sends_adapters_to_a_twin_sharing_the_base(tiny) -> None:
    model, tokenizer = tiny
    policy = apply_lora(copy.deepcopy(model), 4, 8)
    twin = adapter_twin(policy)
    base = {n: p for n, p in policy.named_parameters() if not p.requires_grad}
    assert all(p is base[n] for n, p in twin.named_parameters() if n in base)  # shared, not copied
    sampler = SamplerEngine(twin, tokenizer, copy_model=False)
    backend = LocalBackend(policy, sampler, tokenizer=tokenizer, micro_batch_size=2, adapter_sync=True)
    backend.save_weights_for_sampler()
    for _ in range(2):
        backend.forward_backward(BATCH, "ppo", OPTS)
        backend.optim_step(ADAM)
    assert backend.save_weights_for_sampler() == 2
    adapters = sum(p.numel() * p.element_size() for p in policy.parameters() if p.requires_grad)
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    assert backend.sync_bytes == adapters and adapters < full / 4
    tokens = torch.tensor([[5, 6, 7, 8, 9, 10]])
    attention = torch.ones_like(tokens)
    with torch.no_grad():
        trained = token_logprobs(policy, tokens, attention)[0]
        sampled = token_logprobs(twin, tokens, attention)[0]
        with policy.disable_adapter():
            untrained = token_logprobs(policy, tokens, attention)[0]
    assert torch.allclose(trained, sampled, atol=1e-6)  # the sampler runs the trained adapters
    assert not torch.allclose(trained, untrained, atol=1e-4)  # and they moved the policy
