"""A scripted 5-turn tool conversation through the runtime, with the real `openai` client, for every family.

The sampler is scripted (random weights never write a tool call): on each turn it returns the
token ids the family's model writes for the next assistant message (its template's rendering;
for Qwen3, compact JSON in the calls, unlike the template's spacing). The agent is a plain tool
loop on `AsyncOpenAI`: it sends back each reply as the SDK parsed it (optionally without its
reasoning) and the tool results under the ids it was given. Across two user queries (where
Qwen3's template strips earlier reasoning and drops its empty `<think>` decoration) the
trajectory stays one segment, every turn after the first reuses all stored tokens, and the
trained tokens are the sampled ones.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from family_fixtures import SPECS, TOOLS, completion_text, renderer_for
from turnwise.adapter.context import RolloutContext
from turnwise.config import default_sampling_params
from turnwise.runtime.app import create_app
from turnwise.runtime.capture import build_segments
from turnwise.runtime.server import RuntimeServer
from turnwise.runtime.store import TrajectoryStore
from turnwise.runtime.testing import ScriptedSampler
from turnwise.types import Message

SEGMENTS: dict[str, int] = {}  # every family, harmony too (its <|return|> read as <|end|>), stays 1 segment


def _compact_calls(text: str) -> str:
    """Hermes calls as the model may write them: compact JSON (the template spaces them)."""
    out = []
    for part in text.split("<tool_call>\n"):
        body, sep, rest = part.partition("\n</tool_call>")
        out.append(json.dumps(json.loads(body), separators=(",", ":")) + sep + rest if sep else part)
    return "<tool_call>\n".join(out)


async def _agent(ctx: RolloutContext, script: list[Message], keep_reasoning: bool) -> list[dict]:
    """Replays the scripted user/tool messages around the model's replies; returns the replies."""
    client = ctx.async_openai()
    sent: list[dict] = []
    ids: dict[str, str] = {}  # scripted tool-call id -> the id the runtime returned
    replies = []
    for m in script:
        if m.role != "assistant":
            d = m.to_openai()
            if m.tool_call_id is not None:
                d["tool_call_id"] = ids[m.tool_call_id]
            sent.append(d)
            continue
        r = await client.chat.completions.create(model=ctx.model, messages=sent, tools=TOOLS)
        reply = r.choices[0].message
        assert [c.function.name for c in reply.tool_calls or ()] == [c.name for c in m.tool_calls]
        ids.update({want.id: got.id for want, got in zip(m.tool_calls, reply.tool_calls or (), strict=True)})
        d = reply.model_dump(exclude_none=True)
        if not keep_reasoning:
            d.pop("reasoning_content", None)
        replies.append({"message": d, "cached": r.usage.prompt_tokens_details.cached_tokens,
                        "prompt": r.usage.prompt_tokens, "plan": r.choices[0].finish_reason})
        sent.append(d)
    await client.close()
    return replies


@pytest.mark.parametrize("keep_reasoning", [True, False], ids=["echo-reasoning", "drop-reasoning"])
@pytest.mark.parametrize("template", sorted(SPECS))
def test_five_turns_stay_one_segment(tmp_path, template: str, keep_reasoning: bool) -> None:
    r, msgs = renderer_for(template)
    turns = [i for i, m in enumerate(msgs) if m.role == "assistant"]
    texts = [completion_text(r, msgs, i) for i in turns]
    if r.format == "qwen3":
        texts = [_compact_calls(t) for t in texts]
    completions = [r.encode(t) for t in texts]
    sampler = ScriptedSampler(completions)
    store = TrajectoryStore(tmp_path / "t.db", "job")
    app = create_app(sampler=sampler, chat=r, store=store, model_name="m", default_params=default_sampling_params())
    with RuntimeServer(app) as server:
        replies = asyncio.run(_agent(RolloutContext("t", server.base_url, "m", {}), msgs, keep_reasoning))
    assert len(replies) == len(turns) >= 5
    for reply, i in zip(replies, turns, strict=True):
        want = msgs[i]
        assert reply["message"].get("content") in (want.content or None, want.content)
        if keep_reasoning and want.reasoning_content in texts[turns.index(i)]:
            assert reply["message"].get("reasoning_content", "") == want.reasoning_content
    t = store.get("t")
    reused = [turn.reused_prompt_tokens for turn in t.turns]
    print(f"\n{template}: prompt tokens per turn {[len(x.prompt_ids) for x in t.turns]}, reused {reused}")
    plans = [turn.prompt_plan for turn in t.turns]
    assert plans[0] == "first" and plans.count("extends") == len(plans) - SEGMENTS.get(r.format, 1)
    segments = build_segments(t)
    assert len(segments) == SEGMENTS.get(r.format, 1)
    assert all(n > 0 for n in reused[1:]) or r.format in SEGMENTS
    for turn in t.turns:  # trained tokens are the sampled ones, behind every reused prefix
        assert turn.completion_ids == tuple(completions[turn.index])
    if len(segments) == 1:
        mask = segments[0].loss_mask_T
        assert [tok for tok, m in zip(segments[0].tokens_T, mask, strict=True) if m] == \
            [tok for c in completions for tok in c]


def test_reasoning_is_streamed_apart_from_content(tmp_path) -> None:
    r, msgs = renderer_for("Qwen-Qwen3-0.6B.jinja")
    final = next(i for i, m in enumerate(msgs) if m.role == "assistant" and not m.tool_calls)
    sampler = ScriptedSampler([r.encode(completion_text(r, msgs, final))])
    store = TrajectoryStore(tmp_path / "t.db", "job")
    app = create_app(sampler=sampler, chat=r, store=store, model_name="m", default_params=default_sampling_params())

    async def stream() -> tuple[str, str]:
        client = RolloutContext("s", server.base_url, "m", {}).async_openai()
        reasoning, content = "", ""
        async for chunk in await client.chat.completions.create(
                model="m", messages=[m.to_openai() for m in msgs[:final]], tools=TOOLS, stream=True):
            if chunk.choices:
                delta = chunk.choices[0].delta
                reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
                content += delta.content or ""
        await client.close()
        return reasoning, content

    with RuntimeServer(app) as server:
        reasoning, content = asyncio.run(stream())
    assert (reasoning, content) == (msgs[final].reasoning_content, msgs[final].content)
    assert "<think>" not in content
