"""Chat rendering per model family: the chat template renders, the family parses and bridges turns.

`Renderer(tokenizer, chat_format="auto")` is the one interface (the runtime's `Chat` protocol);
`families.FAMILIES` lists the families and `detect_family` recognises one from a template.
"""

from turnwise.policy.renderers.base import (
           Renderer,
           resolve_family,
           stop_token_ids_for,
           template_text,
           tool_specs,
)
from turnwise.policy.renderers.families import FAMILIES, HARMONY_DATE, Family, detect_family, family_named

__all__ = ["FAMILIES", "HARMONY_DATE", "Family", "Renderer", "detect_family", "family_named", "resolve_family",
           "stop_token_ids_for", "template_text", "tool_specs"]
