"""Trainer checkpoints for exact resume, and the SIGINT/SIGTERM guard that writes one before exit.

`RUN_DIR/checkpoints/step_NNNNN/` holds what the training backend's `save_state` writes
(`LocalBackend`: `model/`, the policy in Hugging Face format, a full model or a LoRA adapter
naming its base, and `backend_state.pt`, optimizer and policy version), plus
`trainer_state.pt`: Python/NumPy/torch RNG states, the step, the next data position (the batch
order is a pure function of seed and step, see `rollout.tasks.batches`) and the validation
reward before RL. The learning-rate schedule is a function of the step, so it needs no state.
`checkpoints/latest` names the newest complete one; it is written last, so an interrupted save
leaves the previous checkpoint in charge.
"""

from __future__ import annotations

import os
import random
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from turnwise.backends import TrainingBackend
from turnwise.policy.checkpoint import is_lora


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_trainer_checkpoint(run_dir: Path, step: int, backend: TrainingBackend,
                            trainer_state: dict[str, Any]) -> Path:
    """Write `checkpoints/step_{step}` and point `checkpoints/latest` at it."""
    root = run_dir / "checkpoints"
    path = root / f"step_{step:05d}"
    path.mkdir(parents=True, exist_ok=True)
    backend.save_state(path)
    tmp = path / "trainer_state.pt.tmp"
    torch.save({**trainer_state, "step": step, "rng": rng_state()}, tmp)
    os.replace(tmp, path / "trainer_state.pt")
    (root / "latest.tmp").write_text(path.name)
    os.replace(root / "latest.tmp", root / "latest")
    return path


def latest_checkpoint(run_dir: Path) -> Path | None:
    marker = run_dir / "checkpoints" / "latest"
    return run_dir / "checkpoints" / marker.read_text().strip() if marker.is_file() else None


def load_trainer_state(path: Path) -> dict[str, Any]:
    return torch.load(path / "trainer_state.pt", weights_only=False)


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load `path/model` (full or LoRA adapter) into `model` in place."""
    model_dir = path / "model"
    if is_lora(model):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(model_dir / "adapter_model.safetensors"))
        return
    missing, unexpected = model.load_state_dict(load_file(model_dir / "model.safetensors"), strict=False)
    tied = {k for k in missing if "lm_head" in k}
    if unexpected or set(missing) - tied:
        raise ValueError(f"checkpoint {model_dir} does not match the model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")


class StopSignals:
    """While active, SIGINT/SIGTERM only set `.received`; the loop checkpoints and returns.

    A second signal falls through to the default behavior (KeyboardInterrupt / termination).
    Outside the main thread (where handlers cannot be installed) it does nothing.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.received = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
