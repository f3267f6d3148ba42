"""A scripted policy for verify tests: add the user's note, list the notes, answer the count."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from turnwise.runtime.testing import IM_END, ByteChat, ScriptedSampler

CHAT = ByteChat()
_USER = re.compile(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", re.DOTALL)


def _script(prompt_ids: Sequence[int]) -> list[int]:
    text = CHAT.decode(prompt_ids)
    turn = text.count("<|im_start|>assistant\n") - 1
    if turn == 0:
        note = _USER.findall(text)[-1]
        reply = '<tool_call>{"name": "add_note", "arguments": ' + json.dumps({"text": note}) + "}</tool_call>"
    elif turn == 1:
        reply = '<tool_call>{"name": "list_notes", "arguments": {}}</tool_call>'
    else:
        reply = '<final_output>{"count": 1}</final_output>'
    return CHAT.encode(reply) + [IM_END]


def scripted_policy() -> ScriptedSampler:
    return ScriptedSampler(_script)
