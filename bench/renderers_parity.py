"""Ours against Prime Intellect's `renderers` on the same conversations and the same real templates.

For every template in `tests/fixtures/templates/` that `renderers` has a hand-written renderer for,
both render the prompt of every assistant turn of the test conversation (system prompt, tools,
reasoning, parallel calls, tool results, two user queries), and both bridge each turn from the
stored tokens. Counted: prompts whose tokens equal `apply_chat_template` on that template, and
bridges that equal the template's rendering of the new messages. `renderers` is not a dependency:

    pip install --target /tmp/rdeps --no-deps renderers==0.1.12 prime-pydantic-config==0.4.3 \\
        openai-harmony==0.0.8 tiktoken==0.14.0
    PYTHONPATH=src:tests:/tmp/rdeps python bench/renderers_parity.py
"""

from __future__ import annotations

import json
from typing import Any

from renderers import create_renderer
from renderers.configs import config_from_name

from family_fixtures import SPECS, TOOLS, completion_text, renderer_for
from turnwise.policy.renderers import Renderer
from turnwise.types import Message

THEIRS = {"Qwen-Qwen3-0.6B.jinja": "qwen3", "Qwen3.5-4B.jinja": "qwen3.5", "openai-gpt-oss-120b.jinja": "gpt-oss",
          "google-gemma-4-31B-it.jinja": "gemma4", "meta-llama-Llama-3.3-70B-Instruct.jinja": "llama-3",
          "meta-llama-Llama-3.2-3B-Instruct.jinja": "llama-3", "deepseek-ai-DeepSeek-V3.2.jinja": "deepseek-v3",
          "moonshotai-Kimi-K2.jinja": "kimi-k2", "GLM-4.7-Flash.jinja": "glm-4.5"}


def _openai(r: Renderer, m: Message) -> dict[str, Any]:
    d = r.template_message(m)
    d.pop("thinking", None)
    if m.reasoning_content:
        d["reasoning_content"] = m.reasoning_content
    for c in d.get("tool_calls", ()):
        c["function"]["arguments"] = json.dumps(c["function"]["arguments"])
    return d


def compare(template: str, name: str) -> tuple[list[str], list[str]]:
    ours, msgs = renderer_for(template)
    kwargs = {k: v for k, v in ours.render_kwargs.items() if k != "chat_template"}
    hf = lambda ms: list(ours.tokenizer.apply_chat_template(  # noqa: E731
        [ours.template_message(m) for m in ms], tools=TOOLS, tokenize=True, add_generation_prompt=True,
        return_dict=False, **ours.render_kwargs))
    theirs_error = ""
    try:
        theirs = create_renderer(ours.tokenizer, config_from_name(name),
                                 chat_template_kwargs=kwargs or None)
    except Exception as e:  # noqa: BLE001 - report what the library says
        theirs, theirs_error = None, f"cannot build: {type(e).__name__}: {str(e)[:90]}"
    turns = [i for i, m in enumerate(msgs) if m.role == "assistant"]
    ours_res, theirs_res = [], []
    for n, i in enumerate(turns):
        want = hf(msgs[:i])
        ours_res.append("=" if ours.prompt_ids(msgs[:i], TOOLS) == want else "x")
        if theirs is None:
            theirs_res = [theirs_error]
        else:
            try:
                got = theirs.render_ids([_openai(ours, m) for m in msgs[:i]], tools=TOOLS, add_generation_prompt=True)
                theirs_res.append("=" if list(got) == want else "x")
            except Exception as e:  # noqa: BLE001
                theirs_res.append(f"!{type(e).__name__}")
        if n == 0:
            continue
        prev = turns[n - 1]
        prompt = ours.prompt_ids(msgs[:prev], TOOLS)
        completion = ours.encode(completion_text(ours, msgs, prev))
        new = msgs[prev + 1:i]
        full_text = ours.render_text(msgs[:i], TOOLS, add_generation_prompt=True)
        d = ours.delta_ids(msgs[:prev + 1], new, TOOLS, completion[-1])
        ours_res[-1] += "b" if d is not None and full_text.endswith(ours.decode(d)) else "-"
        if theirs is None:
            continue
        try:
            b = theirs.bridge_to_next_turn(prompt, completion, [_openai(ours, m) for m in new], tools=TOOLS)
            ids = None if b is None else list(getattr(b, "token_ids", b))
            ok = ids is not None and ids[:len(prompt) + len(completion)] == prompt + completion and \
                full_text.endswith(ours.decode(ids[len(prompt) + len(completion):]))
            theirs_res[-1] += "b" if ok else "-"
        except Exception as e:  # noqa: BLE001
            theirs_res[-1] += f"!{type(e).__name__}"
    return ours_res, theirs_res


def main() -> None:
    print("per assistant turn: '=' prompt tokens equal apply_chat_template, 'b' bridge equals the template's\n"
          "rendering of the new messages after the stored tokens, 'x' / '-' not, '!' raised")
    for template in sorted(SPECS):
        name = THEIRS.get(template)
        if name is None:
            continue
        ours, theirs = compare(template, name)
        print(f"{template:45s} ours {' '.join(ours)}\n{'renderers ' + name:45s}      {' '.join(theirs)}")


if __name__ == "__main__":
    main()
