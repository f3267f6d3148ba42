#!/usr/bin/env bash
# GPU check (not run in CI: needs CUDA). On a CUDA machine with torch, transformers and peft:
#   1. one RL step of the demo environment (examples/support_desk, its agent, 16 tasks x 8 rollouts)
#      on a Qwen-shaped random ~0.5B model (Qwen2.5-0.5B's shape, our tiny tokenizer) in bfloat16,
#      local sampler + learner on cuda:0, full fine-tuning and LoRA; prints tokens/s, step time and
#      peak GPU memory for each;
#   2. with 2 or more GPUs, the 2-rank FSDP2 equivalence tests on nccl (tests/test_distributed.py).
# Usage, from the repository root:  bash bench/gpu_check.sh   [PYTHON=.venv/bin/python]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
WORK="$(mktemp -d -t turnwise-gpu-XXXX)"
trap 'rm -rf "$WORK"' EXIT

"$PYTHON" - "$WORK" <<'PY'
import json, sys, time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

from turnwise.config import ModelConfig, load_config
from turnwise.policy.tiny import tiny_model_dir
from turnwise.track import JsonlLogger
from turnwise.train.loop import train

assert torch.cuda.is_available(), "no CUDA device: this check needs a GPU"
work = Path(sys.argv[1])
print(f"device: {torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}; torch {torch.__version__}")
tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir(ModelConfig()))
shape = Qwen2Config(vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                    num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                    tie_word_embeddings=True, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                    pad_token_id=tokenizer.pad_token_id)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(shape, dtype=torch.bfloat16)
model_dir = work / "qwen-0.5b-random"
model.save_pretrained(model_dir)
tokenizer.save_pretrained(model_dir)
params = sum(p.numel() for p in model.parameters())
del model
for mode, extra in (("full", []), ("lora", ["lora=true"])):
    overrides = [f"model.path={model_dir}", "model.device=cuda", "model.dtype=bfloat16", "max_steps=1",
                 "warm_start.demos_path=null", "data.val_path=null", "tracking.mlflow=false",
                 "tracking.progress=false", "micro_batch_size=16", *extra]
    cfg = load_config("examples/support_desk/config.yaml", overrides)
    run_dir = work / f"run-{mode}"
    run_dir.mkdir()
    logger = JsonlLogger(run_dir / "metrics.jsonl")
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        train(cfg, None, run_dir, logger)
    finally:
        logger.close()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in rows if "speed/step_s" in r)
    print(f"{mode}: {params / 1e6:.0f}M parameters bf16; step_seconds: {step['speed/step_s']:.2f}; "
          f"tokens_per_s: {step['speed/tokens_per_s']:.0f} (sampled {step.get('rollout/sample_tokens', 0):.0f} + "
          f"trained {step.get('train/tokens', 0):.0f}); sample_seconds: {step.get('speed/sample_s', 0):.2f}; "
          f"train_seconds: {step.get('speed/train_s', 0):.2f}; weights_bytes_sent: {step.get('weights/bytes_sent', 0):.0f}; "
          f"peak_gpu_gb: {torch.cuda.max_memory_allocated() / 2**30:.2f}; wall {time.perf_counter() - started:.0f} s")
PY

GPUS="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')"
if [ "$GPUS" -ge 2 ]; then
  TURNWISE_TEST_DEVICE=cuda "$PYTHON" -m pytest tests/test_distributed.py -q -p no:cacheprovider
else
  echo "nccl equivalence: skipped (needs 2 GPUs, found $GPUS)"
fi
