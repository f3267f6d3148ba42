"""token_logprobs reproduces the sampler's logprobs (the importance ratio is 1 at equal weights)."""

from __future__ import annotations

import pytest
import torch

from turnwise.config import default_sampling_params
from turnwise.policy.logprobs import token_logprobs
from turnwise.policy.sampler import SamplerEngine
from turnwise.types import SamplingParams


@pytest.mark.parametrize("params", [
    default_sampling_params(temperature=0.0, max_tokens=20),
    default_sampling_params(temperature=1.0, max_tokens=20, seed=1),
    default_sampling_params(temperature=0.7, top_p=0.9, max_tokens=20, seed=2),
])
def test_parity_with_sampler_on_a_right_padded_batch(policy, params: SamplingParams) -> None:
    model, tokenizer = policy
    prompts = [tokenizer.encode("<|im_start|>user\nRefund order " + "9" * (3 + 5 * i) + "<|im_end|>\n")
               for i in range(4)]
    with SamplerEngine(model, tokenizer) as engine:
        completions = [f.result() for f in [engine.submit(p, params) for p in prompts]]
    seqs = [p + list(c.token_ids) for p, c in zip(prompts, completions, strict=True)]
    width = max(len(s) for s in seqs)
    tokens = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    with torch.no_grad():
        logprobs, entropy = token_logprobs(model, tokens, mask, params.temperature, with_entropy=True)
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        got = logprobs[row, len(prompt): len(prompt) + len(completion.token_ids)]
        assert torch.allclose(got, torch.tensor(completion.logprobs), atol=1e-4)
    assert torch.all(logprobs[mask == 0] == 0) and torch.all(logprobs[:, 0] == 0)
    assert entropy is not None and torch.all(entropy[:, 1:][mask[:, 1:] == 1] > 0)


def test_gradients_flow(policy) -> None:
    model, _ = policy
    tokens = torch.tensor([[5, 6, 7, 8]])
    logprobs, entropy = token_logprobs(model, tokens, torch.ones_like(tokens))
    assert entropy is None
    logprobs.sum().backward()
    assert model.lm_head.weight.grad is not None
    model.zero_grad(set_to_none=True)
