"""`trainer.nproc=2`: a 2-step run on 2 `gloo` ranks completes and checkpoints, and a run with one
process resumes from that checkpoint (weights and Adam's state, keyed by parameter name). With
LoRA the sampler gets the adapters only (`weights/bytes_sent`), and the adapter checkpoint opens
as `model.path` (merged onto its base), as `turnwise eval --checkpoint` opens it."""

import json
from pathlib import Path

import pytest
import torch

from test_train_resume import run, seeded_agent, small_config
from turnwise.policy.load import load_policy
from turnwise.train.checkpoint import latest_checkpoint


def metrics(run_dir: Path, name: str) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[name] for r in rows if name in r]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_two_ranks_train_checkpoint_and_resume_with_one(tmp_path: Path, lora: bool) -> None:
    extra = {"lora": "true"} if lora else {}
    run_dir = tmp_path / "run"
    two = run(small_config(tmp_path, **{"trainer.nproc": 2, **extra}), seeded_agent(), run_dir)
    assert two.steps == 2 and not two.interrupted
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None and ckpt.name == "step_00002"
    sent = metrics(run_dir, "weights/bytes_sent")
    model, _ = load_policy(small_config(tmp_path).model)
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if lora:  # rank 32 adapters on the tiny model: a fraction of its bytes
        assert len(sent) == 2 and all(0 < b < model_bytes / 2 for b in sent)
        merged, _ = load_policy(small_config(tmp_path, **{"model.path": str(ckpt / "model")}).model)
        final, _ = load_policy(small_config(tmp_path, **{"model.path": str(run_dir / "checkpoints" / "final")}).model)
        ids = torch.tensor([[5, 17, 40, 99, 7]])
        with torch.no_grad():
            assert torch.allclose(merged(ids).logits, final(ids).logits, atol=1e-5)
    else:
        assert len(sent) == 2 and all(b >= model_bytes for b in sent)

    one = run(small_config(tmp_path, **{"trainer.nproc": 1, "max_steps": 3, "max_epochs": 2, **extra}), seeded_agent(), run_dir)
    assert one.start_step == 2 and one.steps == 3
    state = torch.load(run_dir / "checkpoints" / "step_00003" / "backend_state.pt", weights_only=False)
    steps = {float(s["step"]) for s in state["optimizer"]["state"].values()}
    assert steps == {3.0}, "Adam's state did not carry over from the 2-rank checkpoint"
