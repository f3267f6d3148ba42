"""Per-token logprobs (and entropy) of a batch of sequences under a model: the trainer's side of the sampler.

For tokens t_0..t_{T-1}: logprob[t] = log softmax(logits(t_<t) / T)[t_t] with T the sampling
temperature, logprob[0] = 0 (nothing predicts the first token). T = 0 means greedy sampling,
whose logprobs the sampler reports from the raw logits, so T = 0 uses the raw logits here too.
This is exactly the sampler's convention, so the importance ratio exp(logp_trainer - logp_sampler)
is 1 when weights match (to ~1e-5 in fp32). Sequences are right padded; padded positions
(attention mask 0) get 0. Gradients flow unless the caller disables them.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel


def token_logprobs(model: PreTrainedModel, tokens_B_T: torch.LongTensor, attention_mask_B_T: torch.Tensor,
                   temperature: float = 1.0, *, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`[B, T]` logprob of each token given the ones before it, and `[B, T]` entropy when asked."""
    logits_B_T_V = model(input_ids=tokens_B_T, attention_mask=attention_mask_B_T, use_cache=False).logits
    logits = logits_B_T_V[:, :-1].float()
    if temperature > 0:
        logits = logits / temperature
    log_norm = logits.logsumexp(dim=-1)
    picked = logits.gather(-1, tokens_B_T[:, 1:, None]).squeeze(-1) - log_norm
    valid = attention_mask_B_T.to(picked.dtype)
    zeros = picked.new_zeros((picked.shape[0], 1))
    logprobs = torch.cat([zeros, picked], dim=1) * valid
    entropy = None
    if with_entropy:
        logp = logits - log_norm[..., None]
        ent = -(logp.exp() * logp).sum(dim=-1)
        entropy = torch.cat([zeros, ent], dim=1) * valid
    return logprobs, entropy
