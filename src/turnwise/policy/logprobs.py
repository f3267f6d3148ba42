"""Per-token logprobs (and entropy) of a batch of sequences under a model: the trainer's side of the sampler.

For tokens t_0..t_{T-1}: logprob[t] = log softmax(logits(t_<t) / T)[t_t] with T the sampling
temperature, logprob[0] = 0 (nothing predicts the first token). T = 0 means greedy sampling,
whose logprobs the sampler reports from the raw logits, so T = 0 uses the raw logits here too.
This is exactly the sampler's convention, so the importance ratio exp(logp_trainer - logp_sampler)
is 1 when weights match (to ~1e-5 in fp32). Sequences are right padded; padded positions
(attention mask 0) get 0. Gradients flow unless the caller disables them.

Memory: full-vocabulary logits are never materialised for the whole batch. The decoder gives
hidden states `[B, T, H]`; only the real (unpadded) positions go through the output layer, in
chunks of `chunk_tokens(V)` positions (about `CHUNK_FLOATS` fp32 logits each). Under autograd each
chunk is checkpointed: its `[N, V]` logits are recomputed in the backward pass instead of kept,
so peak memory is one chunk's logits, not `B x T x V`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

CHUNK_FLOATS = 1 << 24
"""fp32 logits per chunk (64 MiB): with Qwen's 152k vocabulary, 110 positions at a time."""


def chunk_tokens(vocab_size: int) -> int:
    """Positions per output-layer chunk for a vocabulary of `vocab_size`."""
    return max(1, CHUNK_FLOATS // max(1, vocab_size))


def _chunk(hidden_N_H: torch.Tensor, targets_N: torch.Tensor, weight_V_H: torch.Tensor,
           bias_V: torch.Tensor | None, temperature: float, with_entropy: bool) -> torch.Tensor:
    """`[2, N]`: logprob of each target and the entropy (0 when not asked) at N positions."""
    logits = F.linear(hidden_N_H, weight_V_H, bias_V).float()
    if temperature > 0:
        logits = logits / temperature
    log_norm = logits.logsumexp(dim=-1)
    picked = logits.gather(-1, targets_N[:, None]).squeeze(-1) - log_norm
    if with_entropy:
        entropy = log_norm - (logits.softmax(dim=-1) * logits).sum(dim=-1)
    else:
        entropy = torch.zeros_like(picked)
    return torch.stack([picked, entropy])


def token_logprobs(model: PreTrainedModel, tokens_B_T: torch.LongTensor, attention_mask_B_T: torch.Tensor,
                   temperature: float = 1.0, *, with_entropy: bool = False,
                   positions_B_T: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`[B, T]` logprob of each token given the ones before it, and `[B, T]` entropy when asked.

    `positions_B_T` (optional, nonzero where wanted, e.g. the loss mask) limits the output layer to
    those tokens; the others get 0. In multi-turn RL most tokens are prompt, so this is most of the cost.
    """
    head = model.get_output_embeddings()
    hidden_B_T_H = model.get_decoder()(input_ids=tokens_B_T, attention_mask=attention_mask_B_T,
                                       use_cache=False).last_hidden_state
    B, T = tokens_B_T.shape
    # position t predicts token t+1; keep the positions whose target is a real token
    predicts_B_T = torch.zeros_like(attention_mask_B_T, dtype=torch.bool)
    wanted_B_T = attention_mask_B_T.bool() if positions_B_T is None else attention_mask_B_T.bool() & positions_B_T.bool()
    predicts_B_T[:, :-1] = wanted_B_T[:, 1:]
    rows, cols = predicts_B_T.nonzero(as_tuple=True)
    hidden_N_H = hidden_B_T_H[rows, cols]
    targets_N = tokens_B_T[rows, cols + 1]
    step = chunk_tokens(head.weight.shape[0])
    grad = torch.is_grad_enabled()
    parts = []
    for i in range(0, len(targets_N), step):
        args = (hidden_N_H[i:i + step], targets_N[i:i + step], head.weight, head.bias, temperature, with_entropy)
        parts.append(checkpoint(_chunk, *args, use_reentrant=False) if grad else _chunk(*args))
    out_2_N = torch.cat(parts, dim=1) if parts else hidden_N_H.new_zeros((2, 0), dtype=torch.float32)
    logprobs = torch.zeros(B, T, dtype=torch.float32, device=hidden_N_H.device)
    logprobs = logprobs.index_put((rows, cols + 1), out_2_N[0])
    entropy = None
    if with_entropy:
        entropy = torch.zeros(B, T, dtype=torch.float32, device=hidden_N_H.device)
        entropy = entropy.index_put((rows, cols + 1), out_2_N[1])
    return logprobs, entropy


class TokenLogprobs(torch.nn.Module):
    """`token_logprobs` of `model` as a module's forward. FSDP2 gathers a sharded module's
    parameters around its `forward` only, so the data-parallel learner shards this wrapper (the
    output layer is read inside it); the one-process learner calls it the same way."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens_B_T: torch.LongTensor, attention_mask_B_T: torch.Tensor, temperature: float = 1.0,
                with_entropy: bool = False,
                positions_B_T: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return token_logprobs(self.model, tokens_B_T, attention_mask_B_T, temperature, with_entropy=with_entropy,
                              positions_B_T=positions_B_T)
