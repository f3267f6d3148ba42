"""Sampler throughput: turnwise's SamplerEngine vs Hugging Face `model.generate`, side by side in one run.

Workload: C concurrent two-turn conversations (C = 1, 16, 64). Turn 1 samples N tokens after a
chat-templated prompt (system text, tool schemas, a user question); turn 2 appends the turn-1
completion and a new user message and samples N more. Greedy, end-of-turn ignored, so both
sides produce exactly the same number of tokens from the same prompts.

- ours: every request of a turn submitted at once; the engine batches them (continuous
  batching) and turn 2 reuses turn 1's KV (`cache_key` = conversation id).
- generate, static batch: all C prompts of a turn left-padded into one `generate` call, the
  baseline a TRL user runs (it needs every request of a turn up front, which concurrent agents
  do not give, so it is the strongest baseline here). The headline ratio uses it.
- generate, per request: one `model.generate` call per conversation turn, as an agent loop that
  calls generate itself runs; shown for context.

It also measures this machine's fp32 matmul GFLOP/s and reports each side's useful model FLOP/s
as a fraction of it: useful tokens are the ones a perfect engine must run through the model
(turn-1 prompt, turn-2 new tokens, sampled tokens), FLOPs per token = 2 x weights used plus
attention over the mean context. `prefilled` counts the prompt tokens each side actually computed.
The last lines are `sampler_speedup_vs_static_64: <static-batch generate seconds / ours at C=64>`
for each model, the tiny one last.

Threads: 1 by default for both sides (`--threads` to change). On a 2-core machine shared with
other work, two OpenMP threads make every small op wait for a descheduled partner and timings
swing by 10x or more; one thread gives stable, comparable numbers.

`--backend vllm`: the local engine against vLLM servers (`sampler.backend: vllm`, `make vllm`)
instead, on the same conversations through the same `Sampler.generate` calls the runtime server
makes (async, all of a turn's requests at once; turn 2 with the conversation's `cache_key`):
seconds and generated tokens/s per side. End-of-turn tokens are not ignored there (vLLM stops at
the model's own EOS), so the ratio is of generated tokens/s: `vllm_vs_local_<C>: <vLLM tok/s /
local tok/s>` (above 1: vLLM is faster), last line C = 64 on the tiny model. `--qwen05b` adds a
Qwen2.5-0.5B-shaped random model with the real Qwen vocabulary (`../shared/models/`).

Usage: python bench/sampler.py [--tokens N] [--threads T] [--quick] [--backend vllm [--qwen05b]]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from turnwise.config import ModelConfig, TinyModelConfig, default_sampling_params
from turnwise.policy import ChatFormat, SamplerEngine, load_policy
from turnwise.types import Message

TOOLS = [{"type": "function", "function": {"name": n, "description": d, "parameters": {
    "type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}}}
    for n, d in [("get_order", "Look up an order."), ("refund_order", "Refund an order.")]]
# name -> (model shape, most conversations the per-request generate baseline runs for real; beyond it,
# its time is that subset's time scaled by C / subset: calls run one after another, so time is linear
# in C, and this keeps the whole bench under ~3 minutes)
MODELS = {
    "tiny (default)": (TinyModelConfig(), 64),
    "~20M qwen2": (TinyModelConfig(vocab_size=4096, hidden_size=384, num_hidden_layers=8, num_attention_heads=6,
                                   num_key_value_heads=2, intermediate_size=1536), 16),
}
Conversation = list[int]


def matmul_gflops(seconds: float = 0.5, n: int = 1024) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e9


def flops_per_token(model: PreTrainedModel, context: int) -> float:
    cfg = model.config
    weights = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    if cfg.tie_word_embeddings:
        weights += cfg.vocab_size * cfg.hidden_size
    return 2 * weights + 4 * cfg.num_hidden_layers * context * cfg.hidden_size


def prompts(chat: ChatFormat, count: int) -> list[tuple[list[int], list[int]]]:
    """(turn-1 prompt, turn-2 suffix after the completion) per conversation; lengths vary."""
    out = []
    for i in range(count):
        question = f"Hi, order ORD-{4000 + 71 * i} arrived damaged." + " It was a gift." * (i % 6)
        first = [Message("system", "You are a support agent."), Message("user", question)]
        reply = [*first, Message("assistant", "x")]
        delta = chat.delta_ids(reply, [Message("user", f"Also refund {i % 9 + 1} items?")], TOOLS)
        assert delta is not None
        out.append((chat.prompt_ids(first, TOOLS), delta))
    return out


def run_ours(model: PreTrainedModel, tok: PreTrainedTokenizerBase, convs: list[tuple[list[int], list[int]]],
             n_new: int) -> tuple[float, int]:
    params = default_sampling_params(temperature=0.0, max_tokens=n_new)
    with SamplerEngine(model, tok, stop_token_ids=(), max_batch_size=64) as engine:
        engine.submit(convs[0][0], default_sampling_params(temperature=0.0, max_tokens=2)).result()
        start = time.perf_counter()
        first = [engine.submit(p, params, cache_key=f"c{i}") for i, (p, _) in enumerate(convs)]
        firsts = [f.result() for f in first]
        second = [engine.submit(p + list(c.token_ids) + d, params, cache_key=f"c{i}")
                  for i, ((p, d), c) in enumerate(zip(convs, firsts, strict=True))]
        done = [f.result() for f in second]
        seconds = time.perf_counter() - start
    assert all(len(c.token_ids) == n_new for c in [*firsts, *done])
    return seconds, sum(c.prompt_tokens for c in [*firsts, *done])


def _generate(model: PreTrainedModel, batch: list[list[int]], n_new: int, pad: int) -> list[list[int]]:
    width = max(len(p) for p in batch)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                             do_sample=False, eos_token_id=None, pad_token_id=pad)
    return out[:, width:].tolist()


def run_generate(model: PreTrainedModel, tok: PreTrainedTokenizerBase, convs: list[tuple[list[int], list[int]]],
                 n_new: int, batched: bool, subset: int | None = None) -> tuple[float, int]:
    """Seconds for all conversations; with `subset`, per request on the first `subset`, scaled."""
    pad = int(tok.pad_token_id)
    _generate(model, [convs[0][0]], 2, pad)
    group = len(convs) if batched else 1
    scale = 1.0
    if subset is not None and not batched and len(convs) > subset:
        scale, convs = len(convs) / subset, convs[:subset]
    start = time.perf_counter()
    computed = 0
    for lo in range(0, len(convs), group):
        chunk = convs[lo: lo + group]
        firsts = _generate(model, [p for p, _ in chunk], n_new, pad)
        seconds_turn = [p + c + d for (p, d), c in zip(chunk, firsts, strict=True)]
        _generate(model, seconds_turn, n_new, pad)
        computed += sum(len(p) for p, _ in chunk) + sum(len(s) for s in seconds_turn)
    return (time.perf_counter() - start) * scale, round(computed * scale)


def bench_model(name: str, tiny: TinyModelConfig, subset: int, cache: str, n_new: int, levels: list[int],
                peak: float, say: Callable[[str], None]) -> dict[int, float]:
    model, tok = load_policy(ModelConfig(cache_dir=cache, tiny=tiny))
    chat = ChatFormat(tok)
    n_params = sum(p.numel() for p in model.parameters())
    say(f"\n## {name}: {n_params / 1e6:.1f}M parameters, {n_new} new tokens per turn, 2 turns")
    say(f"{'C':>3} {'engine':<32} {'seconds':>8} {'prefilled':>10} {'gen tok/s':>10} {'of matmul peak':>15} "
        f"{'ratio':>7}")
    ratios = {}
    for c in levels:
        convs = prompts(chat, c)
        context = sum(len(p) for p, _ in convs) // c + n_new
        per_tok = flops_per_token(model, context)
        gen_tokens = 2 * c * n_new
        useful = gen_tokens + sum(len(p) + len(d) for p, d in convs)
        label = "generate, per request" + (f" ({subset}, x{c // subset})" if c > subset else "")
        rows = [("ours", run_ours(model, tok, convs, n_new)),
                (label, run_generate(model, tok, convs, n_new, batched=False, subset=subset))]
        if c > 1:
            rows.append(("generate, static batch", run_generate(model, tok, convs, n_new, batched=True)))
        ours_s = rows[0][1][0]
        for engine_name, (seconds, prefilled) in rows:
            frac = useful * per_tok / seconds / (peak * 1e9)
            say(f"{c:>3} {engine_name:<32} {seconds:>8.2f} {prefilled:>10} {gen_tokens / seconds:>10.0f} "
                f"{frac:>14.1%} {seconds / ours_s:>6.2f}x")
        ratios[c] = rows[-1][1][0] / ours_s
    return ratios


QWEN_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "Qwen2.5-0.5B-Instruct"
VLLM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"


async def two_turns(engine: object, convs: list[tuple[list[int], list[int]]], n_new: int) -> tuple[float, int]:
    """Seconds and tokens generated for every conversation's two turns, each turn's requests at once."""
    params = default_sampling_params(temperature=0.0, max_tokens=n_new)
    start = time.perf_counter()
    firsts = await asyncio.gather(*(engine.generate(p, params, cache_key=f"c{i}")  # type: ignore[attr-defined]
                                    for i, (p, _) in enumerate(convs)))
    seconds = await asyncio.gather(*(engine.generate(p + list(c.token_ids) + d, params, cache_key=f"c{i}")  # type: ignore[attr-defined]
                                     for i, ((p, d), c) in enumerate(zip(convs, firsts, strict=True))))
    return time.perf_counter() - start, sum(len(c.token_ids) for c in [*firsts, *seconds])


def bench_vllm_model(name: str, model: PreTrainedModel, tok: PreTrainedTokenizerBase, n_new: int, levels: list[int],
                     say: Callable[[str], None]) -> dict[int, float]:
    from turnwise.config import VLLMConfig
    from turnwise.policy.vllm_engine import VLLMEngine

    chat = ChatFormat(tok)
    say(f"\n## {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"up to {n_new} new tokens per turn, 2 turns, greedy")
    say(f"{'C':>3} {'engine':<8} {'seconds':>8} {'tokens':>7} {'gen tok/s':>10}")
    ratios = {}
    with tempfile.TemporaryDirectory() as model_dir:
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        vllm_cfg = VLLMConfig(python=str(VLLM_PYTHON), args=["--kv-cache-memory-bytes", str(2 << 30)])
        t0 = time.perf_counter()
        with VLLMEngine(vllm_cfg, Path(model_dir), dtype="float32", stop_token_ids=chat.stop_token_ids) as vllm, \
                SamplerEngine(model, tok, stop_token_ids=chat.stop_token_ids, max_batch_size=64) as local:
            say(f"(vLLM server up in {time.perf_counter() - t0:.0f} s)")
            for c in levels:
                convs = prompts(chat, c)
                rates = {}
                for label, engine in (("local", local), ("vllm", vllm)):
                    asyncio.run(two_turns(engine, convs[:1], 2))  # warm-up
                    seconds, tokens = asyncio.run(two_turns(engine, convs, n_new))
                    rates[label] = tokens / seconds
                    say(f"{c:>3} {label:<8} {seconds:>8.2f} {tokens:>7} {rates[label]:>10.0f}")
                ratios[c] = rates["vllm"] / rates["local"]
    return ratios


def main_vllm(args: argparse.Namespace) -> None:
    if not VLLM_PYTHON.is_file():
        raise SystemExit("no .venv-vllm: run `make vllm` first")
    levels = [1, 16] if args.quick else [1, 16, 64]
    print(f"# sampler bench, local engine vs vLLM: torch {torch.__version__}, {torch.get_num_threads()} threads "
          "(local side; vLLM sets its own)")
    ratios: dict[str, dict[int, float]] = {}
    if args.qwen05b:
        from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

        cfg = Qwen2Config(vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                          num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                          tie_word_embeddings=True)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float().eval()
        ratios["~0.5B qwen2"] = bench_vllm_model("~0.5B qwen2 (real vocabulary)", model,
                                                 AutoTokenizer.from_pretrained(QWEN_DIR), args.tokens, levels, print)
    with tempfile.TemporaryDirectory() as cache:
        model, tok = load_policy(ModelConfig(cache_dir=cache))
        ratios["tiny (default)"] = bench_vllm_model("tiny (default)", model, tok, args.tokens, levels, print)
    top = max(levels)
    print(f"\nheadline: C={top}, vLLM generated tokens/s over the local engine's")
    for name, by_c in ratios.items():
        print(f"{name}: vllm_vs_local_{top}: {by_c[top]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per turn")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="tiny model only, C = 1 and 16")
    parser.add_argument("--backend", choices=["generate", "vllm"], default="generate",
                        help="what the local engine is compared with (vllm: servers from `make vllm`)")
    parser.add_argument("--qwen05b", action="store_true", help="--backend vllm: also a ~0.5B Qwen-shaped model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.backend == "vllm":
        main_vllm(args)
        return
    peak = matmul_gflops()
    print(f"# sampler bench: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"fp32 matmul {peak:.1f} GFLOP/s")
    print("ratio = seconds of that engine / seconds of ours (higher: ours is faster)")
    levels = [1, 16] if args.quick else [1, 16, 64]
    models = dict(list(MODELS.items())[:1]) if args.quick else MODELS
    ratios: dict[str, dict[int, float]] = {}
    with tempfile.TemporaryDirectory() as cache:
        for name, (tiny, subset) in models.items():
            ratios[name] = bench_model(name, tiny, subset, cache, args.tokens, levels, peak, print)
    top = max(levels)
    print(f"\nheadline: C={top}, ours vs one static-batch generate call per turn")
    for name in reversed(list(ratios)):
        print(f"{name}: sampler_speedup_vs_static_{top}: {ratios[name][top]:.2f}")


if __name__ == "__main__":
    main()
