"""Peak resident memory of one RL step on a tiny model with Qwen's 152k vocabulary.

The model is a Qwen2 causal LM of the demo's shape but with Qwen's real vocabulary (151,936
rows, hidden 64, 2 layers: 9.8M parameters, nearly all in the tied embedding), random weights.
One step is what the trainer does per RL step: `LocalBackend.forward_backward` + `optim_step` (PPO) on the demo's batch,
16 tasks x 8 rollouts = 128 sequences in micro-batches of 32, each `--seq-len` tokens with the
second half sampled. Memory that scales with vocabulary x tokens is the output layer's logits:
B x T x V fp32 is 10 GB at micro-batch 32 x 512 tokens.

    python bench/memory.py                      # the demo shape
    python bench/memory.py --sequences 32       # one micro-batch: the same peak (gradients accumulate), 4x faster
    python bench/memory.py --sequences 4 --micro-batch 4   # small enough for code that materialises logits

Prints `peak_rss_gb: X` (ru_maxrss of this process, so it includes the model and torch).
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from turnwise.config import JobConfig
from turnwise.train.backend import LocalBackend
from turnwise.types import AdamParams, Datum, Segment

QWEN_VOCAB = 151_936


def tiny_qwen_vocab_model() -> torch.nn.Module:
    cfg = Qwen2Config(vocab_size=QWEN_VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float()


def datums(n: int, seq_len: int, generator: torch.Generator) -> list[Datum]:
    out = []
    for i in range(n):
        tokens = torch.randint(0, QWEN_VOCAB, (seq_len,), generator=generator).tolist()
        half = seq_len // 2
        mask = [0] * half + [1] * (seq_len - half)
        logprobs = [0.0] * half + (-torch.rand(seq_len - half, generator=generator) * 12).tolist()
        adv = 1.0 if i % 2 else -1.0
        seg = Segment(trajectory_id=f"t{i}", tokens_T=tuple(tokens), loss_mask_T=tuple(mask),
                      logprobs_T=tuple(logprobs), turn_T=tuple(-1 if m == 0 else 0 for m in mask),
                      versions_T=tuple(-1 if m == 0 else 0 for m in mask))
        out.append(Datum(segment=seg, advantages_T=tuple(adv * m for m in mask)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=128, help="sequences per step (demo: 16 x 8)")
    parser.add_argument("--micro-batch", type=int, default=32, help="sequences per forward/backward (demo: 32)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = tiny_qwen_vocab_model()
    params = sum(p.numel() for p in model.parameters())
    batch = datums(args.sequences, args.seq_len, torch.Generator().manual_seed(0))
    cfg = JobConfig(micro_batch_size=args.micro_batch, loss_fn="ppo")
    backend = LocalBackend(model, None, tokenizer=None, micro_batch_size=cfg.micro_batch_size)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    start = time.perf_counter()
    metrics = backend.forward_backward(batch, "ppo", cfg.loss_options())
    metrics |= backend.optim_step(AdamParams(learning_rate=cfg.learning_rate))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"model: {params / 1e6:.1f}M parameters, vocabulary {QWEN_VOCAB}; step: {args.sequences} sequences x "
          f"{args.seq_len} tokens, micro-batch {args.micro_batch}; {seconds:.1f} s; "
          f"loss {metrics['loss/value']:.4f}; rss before the step {before:.2f} GB")
    print(f"peak_rss_gb: {peak:.2f}")


if __name__ == "__main__":
    main()
