"""Chunked logprobs equal the full-vocabulary computation, values and gradients, on Qwen2 and Qwen3 shapes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3Config

from turnwise.policy import logprobs as lp


def _reference(model, tokens, mask, temperature):
    logits = model(input_ids=tokens, attention_mask=mask, use_cache=False).logits[:, :-1].float()
    if temperature > 0:
        logits = logits / temperature
    logp = logits.log_softmax(-1)
    picked = logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    zeros = picked.new_zeros((len(tokens), 1))
    valid = mask.float()
    return torch.cat([zeros, picked], 1) * valid, torch.cat([zeros, ent], 1) * valid


@pytest.mark.parametrize("config_cls", [Qwen2Config, Qwen3Config])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_chunked_equals_full_logits(monkeypatch, config_cls, temperature: float) -> None:
    torch.manual_seed(0)
    cfg = config_cls(vocab_size=997, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float()
    tokens = torch.randint(0, 997, (3, 29))
    mask = torch.ones_like(tokens)
    mask[1, 20:] = 0
    mask[2, 5:] = 0
    tokens = tokens * mask
    monkeypatch.setattr(lp, "CHUNK_FLOATS", 997 * 7)  # 7 positions per chunk: several chunks per row
    assert lp.chunk_tokens(997) == 7
    weights = torch.randn(3, 29)

    got, got_ent = lp.token_logprobs(model, tokens, mask, temperature, with_entropy=True)
    ((got * weights).sum() + got_ent.sum()).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    want, want_ent = _reference(model, tokens, mask, temperature)
    ((want * weights).sum() + want_ent.sum()).backward()

    assert torch.allclose(got, want, atol=1e-5) and torch.allclose(got_ent, want_ent, atol=1e-5)
    for g, p in zip(grads, model.parameters(), strict=True):
        assert torch.allclose(g, p.grad, atol=1e-5)


def test_positions_limit_the_output_layer() -> None:
    torch.manual_seed(1)
    cfg = Qwen3Config(vocab_size=301, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float()
    tokens = torch.randint(0, 301, (2, 12))
    mask = torch.ones_like(tokens)
    wanted = torch.zeros_like(tokens)
    wanted[:, 7:] = 1
    with torch.no_grad():
        every, _ = lp.token_logprobs(model, tokens, mask)
        some, ent = lp.token_logprobs(model, tokens, mask, positions_B_T=wanted, with_entropy=True)
    assert torch.equal(some[:, 7:], every[:, 7:]) and torch.all(some[:, :7] == 0) and torch.all(ent[:, :7] == 0)
