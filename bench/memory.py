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

`--ratios`: the same RL step on a Qwen-shaped random model of ~0.5B parameters (Qwen2.5-0.5B's
shape: 24 layers, hidden 896, 151,936-token tied vocabulary; 494M parameters), full fine-tuning
and LoRA (rank 32, alpha 64), each in a fresh process, as the learner runs them: fp32,
activation checkpointing, micro-batch 2. Each prints peak resident bytes over the bytes of one
fp32 copy of the weights:

    python bench/memory.py --ratios              # lora_peak_over_weights: X / full_peak_over_weights: X

The learner fixes glibc's mmap threshold at 1 MiB (`train.backend.return_freed_blocks`), so
the tensors a step frees go back to the OS and the peak is the live memory; `--default-malloc`
runs the same step with glibc's adaptive threshold left alone (about 1 GiB more for LoRA).

- full: weights, gradients and AdamW's two moments (4.0 by themselves) plus activations; the
  sampler's own copy is not in this process's count (the runtime holds it; bf16 on CUDA).
- lora: the frozen base, fp32 adapters with their gradients and moments, AND the sampler as a
  LoRA run holds it: an adapter twin sharing the base (`policy.checkpoint.adapter_twin`), to
  which the step's weight sync sends the adapters only (`bytes_sent` printed).
"""

from __future__ import annotations

import argparse
import re
import resource
import subprocess
import sys
import time
from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from turnwise.config import JobConfig
from turnwise.policy.checkpoint import adapter_twin, apply_lora
from turnwise.policy.sampler import SamplerEngine
from turnwise.train import backend as backend_module
from turnwise.train.backend import LocalBackend
from turnwise.types import AdamParams, Datum, Segment

QWEN_VOCAB = 151_936


def tiny_qwen_vocab_model() -> torch.nn.Module:
    cfg = Qwen2Config(vocab_size=QWEN_VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float()


def qwen_05b_model() -> torch.nn.Module:
    """Qwen2.5-0.5B's shape, random weights."""
    cfg = Qwen2Config(vocab_size=QWEN_VOCAB, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float()


def ratio_step(mode: str, sequences: int, seq_len: int, micro_batch: int, default_malloc: bool) -> None:
    """One RL step on the 0.5B model in this process; prints `peak_over_weights: X`."""
    model = qwen_05b_model()
    weight_bytes = sum(p.numel() for p in model.parameters()) * 4
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    sampler = None
    if mode == "lora":
        model = apply_lora(model, 32, 64)
        sampler = SamplerEngine(adapter_twin(model), SimpleNamespace(pad_token_id=0), copy_model=False,
                                stop_token_ids={0})
    batch = datums(sequences, seq_len, torch.Generator().manual_seed(0))
    cfg = JobConfig(micro_batch_size=micro_batch, loss_fn="ppo")
    if default_malloc:  # glibc's threshold stays adaptive: the learner's setting is skipped
        backend_module.return_freed_blocks = lambda *_: False
    backend = LocalBackend(model, sampler, tokenizer=None, micro_batch_size=micro_batch,
                           adapter_sync=sampler is not None)
    start = time.perf_counter()
    metrics = backend.forward_backward(batch, "ppo", cfg.loss_options())
    metrics |= backend.optim_step(AdamParams(learning_rate=cfg.learning_rate))
    backend.save_weights_for_sampler()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"{mode}: {weight_bytes / 4e6:.0f}M parameters ({weight_bytes / 2**30:.2f} GiB fp32); step: {sequences} "
          f"sequences x {seq_len} tokens, micro-batch {micro_batch}, activation checkpointing; "
          f"{time.perf_counter() - start:.0f} s; loss {metrics['loss/value']:.4f}; sampler sync "
          f"{backend.sync_bytes / 2**20:.1f} MiB; peak rss {peak / 2**30:.2f} GiB")
    print(f"peak_over_weights: {peak / weight_bytes:.2f}")


def ratios(args: argparse.Namespace) -> None:
    """Each mode in a fresh process, so one's peak is not the other's."""
    for mode in ("lora", "full"):
        command = [sys.executable, __file__, "--ratio-mode", mode, "--sequences", str(args.sequences),
                   "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch)]
        out = subprocess.run(command + (["--default-malloc"] if args.default_malloc else []),
                             capture_output=True, text=True, check=True).stdout
        print(out.splitlines()[0])
        value = re.search(r"peak_over_weights: ([0-9.]+)", out)
        suffix = "_default_malloc" if args.default_malloc else ""
        print(f"{mode}_peak_over_weights{suffix}: {value.group(1) if value else 'missing'}", flush=True)


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
    parser.add_argument("--sequences", type=int, help="sequences per step (default: the demo's 16 x 8; --ratios: 4)")
    parser.add_argument("--micro-batch", type=int, help="sequences per forward/backward (default: the demo's 32; "
                        "--ratios: 2)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default 512; --ratios: 256)")
    parser.add_argument("--ratios", action="store_true",
                        help="0.5B model, full and LoRA: *_peak_over_weights (defaults 4 x 256, micro-batch 2)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="--ratios with glibc's adaptive mmap threshold (the learner's 1 MiB undone)")
    parser.add_argument("--ratio-mode", choices=["full", "lora"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.manual_seed(0)
    small = args.ratios or args.ratio_mode
    args.sequences = args.sequences or (4 if small else 128)
    args.seq_len = args.seq_len or (256 if small else 512)
    args.micro_batch = args.micro_batch or (2 if small else 32)
    if small:
        if args.ratio_mode:
            ratio_step(args.ratio_mode, args.sequences, args.seq_len, args.micro_batch, args.default_malloc)
        else:
            ratios(args)
        return
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
