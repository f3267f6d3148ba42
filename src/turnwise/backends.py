"""The two engine seams: a `Sampler` (tokens in, tokens out) and a Tinker-shaped `TrainingBackend`.

Everything above them (the runtime server, the training loops, eval, verify) talks only to these
Protocols, so a new engine is one class:

- `Sampler`: `turnwise.policy.sampler.SamplerEngine` (local PyTorch) today; vLLM servers
  (token-in/token-out over HTTP, weight sync by their RL weight-transfer API) and a Tinker
  sampling client are the next implementations.
- `TrainingBackend`: `turnwise.train.backend.LocalBackend` (in-process PyTorch) today; FSDP2
  ranks under torch.distributed and remote Tinker-API servers (Tinker, SkyRL's Tinker server,
  Fireworks, SageMaker training sessions) implement the same five calls.

The shape is Tinker's: `forward_backward` accumulates gradients of a named loss over datums,
`optim_step` applies them with the caller's Adam parameters (the learning-rate schedule is
the caller's), `save_weights_for_sampler` publishes the weights as a new policy version.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from turnwise.types import AdamParams, Completion, Datum, LossOptions, SamplingParams


@runtime_checkable
class Sampler(Protocol):
    """Samples completions for token prompts with the current policy weights.

    `generate` may accept optional keywords beyond the two below; the runtime checks its signature
    once (`turnwise.runtime.app.create_app`) and passes only those it names, so a minimal engine
    stays minimal:

    - `cache_key: str`: `"<job>/<trajectory>"`, the same for every turn of a rollout, so the engine
      can keep that prefix's KV cache for the next turn;
    - `on_token: Callable[[int, float], None]`: called with each token id and logprob as it is
      sampled (from the engine's thread), for real streaming;
    - `context: turnwise.types.SampleContext`: trajectory id, task id and turn index of the prompt,
      so a scripted or task-aware policy (`turnwise.runtime.testing.ScriptedSampler`) need not
      read them from the prompt.

    An engine that honours `SamplingParams.grammar` (constrained decoding: forced tool use,
    structured output) sets the attribute `supports_grammar = True`, and one that fills
    `Completion.top_logprobs` sets `supports_top_logprobs = True`; the runtime refuses such
    requests with a 400 to engines without them, so they are never silently ignored.
    """

    @property
    def version(self) -> int:
        """Policy version of the current weights (every completion records the one that sampled it)."""
        ...

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Completion:
        """One completion of `prompt_ids`: sampled ids, their logprobs, finish reason, version."""
        ...


@runtime_checkable
class WeightSyncSampler(Sampler, Protocol):
    """A sampler the trainer can update in place (the local engine; vLLM's weight transfer)."""

    def update_weights(self, state_dict: Mapping[str, Any], version: int | None = None) -> int:
        """Swap in new weights between decode steps; returns the new version (`version`, or current + 1)."""
        ...


@runtime_checkable
class TrainingBackend(Protocol):
    """Owns the trained weights and optimizer state; Tinker's training-client contract."""

    @property
    def version(self) -> int:
        """Policy version of the weights last published to the sampler."""
        ...

    def forward(self, datums_D: Sequence[Datum]) -> list[tuple[float, ...]]:
        """The trainer's logprob of every token of each datum, no gradient (Tinker's `forward`)."""
        ...

    def forward_backward(self, datums_D: Sequence[Datum], loss_fn: str,
                         loss_options: LossOptions) -> dict[str, float]:
        """Loss `loss_fn` (a name in `turnwise.algo.losses`) over `datums_D`, gradients accumulated;
        returns the loss metrics. Several calls before one `optim_step` add up."""
        ...

    def optim_step(self, adam: AdamParams) -> dict[str, float]:
        """Clip, apply and clear the accumulated gradients with `adam`; returns grad norm and lr."""
        ...

    def save_weights_for_sampler(self) -> int:
        """Publish the current weights to the sampler; returns their policy version (bumped only
        when an `optim_step` changed them since the last publish)."""
        ...

    @property
    def sync_bytes(self) -> int:
        """Bytes the last `save_weights_for_sampler` sent (LoRA: the adapters only; 0: nothing)."""
        ...

    def save_state(self, path: Path) -> None:
        """Weights, optimizer state and policy version under `path`, for an exact resume."""
        ...

    def load_state(self, path: Path) -> None:
        """Restore what `save_state` wrote, policy version included."""
        ...

    def export(self, path: Path) -> None:
        """The current weights as a Hugging Face model directory (LoRA merged), for eval and serving."""
        ...
