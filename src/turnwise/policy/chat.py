"""The chat layer's public names: `ChatFormat` is the family renderer (`policy.renderers`).

Kept as the import path the runtime, trainer and tests use; see `turnwise.policy.renderers` for
rendering, bridging and parsing per model family.
"""

from __future__ import annotations

from turnwise.policy.renderers import FAMILIES, Renderer, detect_family, stop_token_ids_for, template_text

ChatFormat = Renderer
CHAT_FORMATS = ("auto", *FAMILIES)

__all__ = ["CHAT_FORMATS", "ChatFormat", "detect_family", "stop_token_ids_for", "template_text"]
