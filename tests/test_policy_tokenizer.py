"""The tiny tokenizer and model directory: deterministic, digit-per-token, cached atomically."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from turnwise.config import ModelConfig, TinyModelConfig
from turnwise.policy.load import ModelLoadError, load_policy
from turnwise.policy.tiny import tiny_model_dir
from turnwise.policy.tokenizer import SPECIAL_TOKENS, build_tiny_tokenizer

_VOCAB_DIGEST = (
    "import hashlib, json; from turnwise.policy.tokenizer import build_tiny_tokenizer; "
    "t = build_tiny_tokenizer(512); "
    "print(hashlib.sha256(t.backend_tokenizer.to_str().encode()).hexdigest())"
)


def test_same_vocabulary_in_separate_processes() -> None:
    digests = {subprocess.run([sys.executable, "-c", _VOCAB_DIGEST], check=True, capture_output=True,
                              text=True).stdout.strip() for _ in range(2)}
    assert len(digests) == 1


def test_vocab_size_and_special_tokens() -> None:
    tok = build_tiny_tokenizer(1024)
    assert len(tok) == 1024
    for special in SPECIAL_TOKENS:
        assert len(tok.encode(special, add_special_tokens=False)) == 1
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_digits_are_one_token_each() -> None:
    tok = build_tiny_tokenizer(1024)
    pieces = tok.tokenize("order 12345 costs 99.07")
    assert [p for p in pieces if p.strip("Ġ").isdigit()] == list("1234599") + ["0", "7"]
    assert all(len(p.strip("Ġ")) <= 1 for p in pieces if any(c.isdigit() for c in p))


def test_tiny_dir_is_built_once_and_reloads_identically(tmp_path: Path) -> None:
    cfg = ModelConfig(cache_dir=str(tmp_path), tiny=TinyModelConfig(vocab_size=512, hidden_size=32,
                                                                     intermediate_size=64))
    path = tiny_model_dir(cfg)
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert tiny_model_dir(cfg) == path and (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    config = json.loads((path / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["vocab_size"] == 512
    text = "<|im_start|>user\nRefund ORD-4821 for 19.99<|im_end|>\n"
    assert AutoTokenizer.from_pretrained(path).encode(text) == build_tiny_tokenizer(512).encode(text)
    model, tokenizer = load_policy(cfg)
    assert not model.training and tokenizer.chat_template
    other = tiny_model_dir(cfg.model_copy(update={"tiny": cfg.tiny.model_copy(update={"seed": 1})}))
    assert other != path


def test_missing_model_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_policy(ModelConfig(path=str(tmp_path / "nope")))
    with pytest.raises(ModelLoadError, match="config.json"):
        load_policy(ModelConfig(path=str(tmp_path)))
