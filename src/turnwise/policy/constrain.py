"""The sampler's per-request hooks: constrained decoding (llguidance) and top logprobs.

Constrained decoding. A request whose `SamplingParams.grammar` is set (an llguidance grammar,
built by `policy.grammars` from the family's format and the request's tools or response format)
gets a `Guide`: an `llguidance.LLMatcher` over the engine's tokenizer. Before each token of that
row is sampled (the prefill's first one too), every token the grammar does not allow next gets
logit -inf; the sampled token then advances the matcher. The sampler's recorded logprob of a
constrained token is therefore log softmax(masked logits / T)[token]: the distribution the token
was actually drawn from, i.e. the behaviour policy mu of importance sampling.

Departure, on purpose: `policy.logprobs.token_logprobs` recomputes the *unmasked* model
log pi(token) for training, which is <= the recorded masked logprob (the mask renormalises over
fewer tokens). The trainer's loss uses its own recomputed logprobs for pi_theta and the recorded
ones as mu, so on constrained turns the ratio pi_theta / mu is Z <= 1, Z the probability mass the
grammar allowed: the off-policy correction for a token drawn from the masked distribution when
the policy trained is the unconstrained model. (Training the constrained policy would need the
masks stored per token, which is not done.) A matcher that errors (it never should:
the grammar is validated when built) allows only the end-of-turn tokens, so the turn ends and
its parse is flagged.

Top logprobs (`SamplingParams.top_logprobs`, 1..20): the k most likely tokens of the same
distribution the sampled logprob comes from (masked, temperature-scaled; raw logits when greedy).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import llguidance
import llguidance.hf
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from turnwise.types import SamplingParams

TopLogprobs = tuple[tuple[int, float], ...]
"""(token id, logprob) pairs, most likely first."""


class Guide:
    """One request's grammar matcher: masks a row of logits and advances on each sampled token."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, fallback_ids: Collection[int]) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.fallback_ids = sorted(fallback_ids)

    def allowed(self) -> torch.Tensor:
        """`[V]` bool: the tokens the grammar allows next (only the end-of-turn tokens after an error)."""
        if not self.matcher.is_error():
            bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
            allowed = torch.from_numpy(bits[:self.vocab_size].astype(bool))
            if allowed.shape[0] < self.vocab_size:
                allowed = torch.cat([allowed, torch.zeros(self.vocab_size - allowed.shape[0], dtype=torch.bool)])
            if bool(allowed.any()):
                return allowed
        allowed = torch.zeros(self.vocab_size, dtype=torch.bool)
        allowed[self.fallback_ids] = True
        return allowed

    def advance(self, token: int) -> None:
        self.matcher.consume_token(token)  # False leaves it in its error state; allowed() handles that


class GuideCompiler:
    """Compiles grammars over one tokenizer (its llguidance form is built once, on first use)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, stop_token_ids: Collection[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = tuple(stop_token_ids)
        self._ll: llguidance.LLTokenizer | None = None

    def compile(self, grammar: str) -> Guide:
        """A fresh `Guide` for `grammar`; ValueError naming the problem when it does not compile."""
        if self._ll is None:
            self._ll = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size,
                                                    eos_token=list(self.stop_token_ids) or None)
        error = llguidance.LLMatcher.validate_grammar(grammar, self._ll)
        if error and not error.startswith("WARNING"):
            raise ValueError(f"the grammar does not compile: {error.strip()}")
        matcher = llguidance.LLMatcher(self._ll, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"the grammar does not compile: {matcher.get_error()}")
        return Guide(matcher, self.vocab_size, self.stop_token_ids)


def mask_rows(logits_B_V: torch.Tensor, guides: Sequence[Guide | None]) -> torch.Tensor:
    """The logits with every token a row's grammar forbids at -inf (the same tensor when no row has one)."""
    if all(g is None for g in guides):
        return logits_B_V
    masked = logits_B_V.clone()
    for row, guide in enumerate(guides):
        if guide is not None:
            allowed = guide.allowed().to(masked.device)
            width = min(masked.shape[1], allowed.shape[0])
            masked[row, :width].masked_fill_(~allowed[:width], float("-inf"))
            masked[row, width:] = float("-inf")
    return masked


def top_logprobs(logits_B_V: torch.Tensor, params: Sequence[SamplingParams]) -> list[TopLogprobs | None]:
    """Per row, the `top_logprobs` most likely tokens and their logprobs; None for rows that did not ask."""
    out: list[TopLogprobs | None] = [None] * len(params)
    for row, p in enumerate(params):
        if p.top_logprobs > 0:
            logits = logits_B_V[row].float()
            logp = torch.log_softmax(logits / p.temperature if p.temperature > 0 else logits, dim=-1)
            values, ids = logp.topk(min(p.top_logprobs, logp.shape[0]))
            out[row] = tuple((int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)
                             if v > float("-inf"))
    return out
