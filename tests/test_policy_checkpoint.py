"""LoRA through peft, weight export to the sampler, and HF-format checkpoints of full and LoRA policies."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from turnwise.config import ModelConfig, default_sampling_params
from turnwise.policy.checkpoint import (
    apply_lora,
    export_state_dict,
    load_checkpoint,
    merged_copy,
    save_checkpoint,
)
from turnwise.policy.load import ModelLoadError, load_policy
from turnwise.policy.sampler import SamplerEngine

TOKENS = torch.tensor([[3, 50, 70, 90, 110, 130]])


@pytest.fixture()
def policy(tmp_path_factory: pytest.TempPathFactory):
    return load_policy(ModelConfig(cache_dir=str(tmp_path_factory.getbasetemp() / "models")))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def _perturb_lora(model) -> None:
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))


def test_lora_trains_only_adapters_and_starts_at_the_base(policy) -> None:
    model, _ = policy
    base_logits = _logits(model)
    lora = apply_lora(model, rank=4, alpha=8)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("q_proj" in n for n in trainable) and not any("lm_head" in n for n in trainable)
    assert torch.allclose(_logits(lora), base_logits, atol=1e-6)


def test_export_equals_merge_and_feeds_the_sampler(policy) -> None:
    model, tokenizer = policy
    engine = SamplerEngine(model, tokenizer)
    base_logits = _logits(model)
    lora = apply_lora(model, rank=4, alpha=8)
    _perturb_lora(lora)
    exported = export_state_dict(lora)
    merged = merged_copy(lora)
    assert set(exported) == set(merged.state_dict())
    assert all(torch.allclose(exported[k], v, atol=1e-6) for k, v in merged.state_dict().items())
    assert not torch.allclose(_logits(merged), base_logits, atol=1e-3)
    with engine:
        assert engine.update_weights(exported) == 1
        prompt = [3, 50, 70, 90]
        got = engine.submit(prompt, default_sampling_params(temperature=0, max_tokens=1)).result()
    expected = _logits(merged)[0, 3].log_softmax(-1).max().item()
    assert abs(got.logprobs[0] - expected) < 1e-4


def test_full_checkpoint_round_trip(policy, tmp_path: Path) -> None:
    model, tokenizer = policy
    with torch.no_grad():
        model.lm_head.weight.add_(0.01)
    path = save_checkpoint(model, tokenizer, tmp_path / "step-1")
    save_checkpoint(model, tokenizer, tmp_path / "step-1")
    loaded, loaded_tok = load_checkpoint(path)
    assert torch.equal(_logits(loaded), _logits(model))
    assert loaded_tok.chat_template == tokenizer.chat_template
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1"]


def test_lora_checkpoint_round_trip_and_merged_export(policy, tmp_path: Path) -> None:
    model, tokenizer = policy
    lora = apply_lora(model, rank=4, alpha=8)
    _perturb_lora(lora)
    expected = _logits(lora)
    adapter_dir = save_checkpoint(lora, tokenizer, tmp_path / "lora")
    assert (adapter_dir / "adapter_config.json").is_file() and not (adapter_dir / "model.safetensors").exists()
    reloaded, _ = load_checkpoint(adapter_dir, trainable=True)
    assert torch.allclose(_logits(reloaded), expected, atol=1e-5)
    assert any(p.requires_grad for p in reloaded.parameters())
    merged_dir = save_checkpoint(lora, tokenizer, tmp_path / "merged", merged=True)
    full, _ = load_checkpoint(merged_dir)
    assert torch.allclose(_logits(full), expected, atol=1e-5)
    with pytest.raises(ModelLoadError):
        load_checkpoint(tmp_path / "missing")
