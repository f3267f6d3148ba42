"""The two things the runtime needs from a policy: a `Sampler` (defined with the other engine
seam in `turnwise.backends`) and a `Chat` format.

`turnwise.policy.sampler.SamplerEngine` and `turnwise.policy.chat.ChatFormat` satisfy them; so do
the stubs in `turnwise.runtime.testing` (tests, benchmarks) and any other engine (vLLM, ...).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from turnwise.backends import Sampler
from turnwise.types import Message

Tools = Sequence[Mapping[str, Any]] | None


@runtime_checkable
class Chat(Protocol):
    """Renders conversations to tokens and parses completions back to messages."""

    @property
    def stop_token_ids(self) -> Collection[int]:
        """End-of-turn tokens: a completion ending with one can be extended by `delta_ids`."""
        ...

    def prompt_ids(self, messages: Sequence[Message], tools: Tools) -> list[int]:
        """The full prompt for `messages`, with the generation prompt appended."""
        ...

    def delta_ids(self, prev: Sequence[Message], new: Sequence[Message], tools: Tools,
                  stop_id: int | None = None) -> list[int] | None:
        """Tokens to append after a stream ending with `stop_id`, the end-of-turn token the model
        sampled for prev's last (assistant) message, so that it becomes the prompt for `prev + new`
        (`new`: only the messages after prev); None when that cannot be done exactly."""
        ...

    def parse_assistant(self, completion_ids: Sequence[int],
                        tool_names: Collection[str] | Mapping[str, Any]) -> tuple[Message, bool]:
        """The assistant message in a completion, and whether a tool call failed to parse
        (`tool_names`: offered tool names, or name -> parameters schema)."""
        ...

    def decode(self, ids: Sequence[int]) -> str: ...


__all__ = ["Chat", "Sampler", "Tools"]
