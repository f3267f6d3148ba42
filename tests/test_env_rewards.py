"""Graders over `<final_output>` JSON: strict, SOP-Bench lenient, dense field accuracy, custom."""

from __future__ import annotations

import asyncio

import pytest

from turnwise.env import Episode, ToolBox, gold_state_match, outputs_in_messages, tool
from turnwise.env.rewards import (
    Reward,
    exact_match,
    extract_final_output,
    field_accuracy,
    lenient_match,
    score,
    state_match,
    with_success,
)
from turnwise.types import Message

GT = {"order_id": "ord_1", "refund_amount": 12.5, "status": "Refunded", "items": ["a", "b"], "escalate": False}


def out(body: str) -> str:
    return f"Thinking...\n<final_output>{body}</final_output>"


def test_extract_takes_last_block_and_tolerates_fences():
    text = '<final_output>{"a": 1}</final_output> later <FINAL_OUTPUT>\n```json\n{"a": 2}\n```\n</FINAL_OUTPUT>'
    assert extract_final_output(text) == {"a": 2}
    assert extract_final_output("no block") is None
    assert extract_final_output('<final_output>{"a": 1}</final_output><final_output>{oops</final_output>') is None
    msgs = [Message("user", "q"), Message("assistant", out('{"a": 3}')), Message("tool", "x")]
    assert extract_final_output(msgs) == {"a": 3}


@pytest.mark.parametrize("body,expected", [
    ('{"order_id":"ord_1","refund_amount":12.5,"status":"Refunded","items":["a","b"],"escalate":false}', 1.0),
    # key case and surrounding whitespace, string whitespace, int/float, extra fields: all fine
    ('{" ORDER_ID ": "ord_1", "Refund_Amount": 12.50, "status": "  Refunded ", "items": ["a", "b"],'
     ' "escalate": false, "note": "extra"}', 1.0),
    ('{"order_id":"ord_1","refund_amount":"12.5","status":"Refunded","items":["a","b"],"escalate":false}', 0.0),
    ('{"order_id":"ord_1","refund_amount":12.5,"status":"refunded","items":["a","b"],"escalate":false}', 0.0),
    ('{"order_id":"ord_1","refund_amount":12.5,"status":"Refunded","items":["b","a"],"escalate":false}', 0.0),
    ('{"order_id":"ord_1","refund_amount":12.5,"status":"Refunded","items":["a","b"],"escalate":0}', 0.0),
    ('{"order_id":"ord_1","refund_amount":12.5,"status":"Refunded","items":["a","b"]}', 0.0),
    ('["not", "an", "object"]', 0.0),
])
def test_exact_match(body, expected):
    r = exact_match(out(body), GT)
    assert r.value == expected
    assert r.metrics["exact_match"] == expected


def test_exact_match_nested_and_null():
    gt = {"customer": {"Name": "Ada Lovelace", "tier": None}}
    assert exact_match(out('{"customer": {"name": "Ada  Lovelace", "TIER": null, "x": 1}}'), gt).value == 1.0
    assert exact_match(out('{"customer": {"name": "Ada Lovelace", "tier": "null"}}'), gt).value == 0.0
    assert exact_match(out('{"customer": {"name": "Ada Lovelace"}}'), '{"customer": {"Name": "Ada Lovelace"}}').value == 1


@pytest.mark.parametrize("pred,gt,expected", [
    ('{"Decision": "APPROVED"}', {"decision": "approved"}, 1.0),
    ('{"decision": "not approved"}', {"decision": "approved"}, 1.0),  # SOP-Bench's containment rule
    ('{"decision": "needs_review"}', {"decision": "needs-review"}, 1.0),
    ('{"decision": "N/A"}', {"decision": None}, 1.0),
    ('{"decision": null}', {"decision": "unknown"}, 1.0),
    ('{"decision": null}', {"decision": "rejected"}, 0.0),
    ('{"flag": true, "score": 3}', {"flag": "True", "score": "3"}, 1.0),
    ('{"decision": "rejected"}', {"decision": "approved"}, 0.0),
    ('{"a": "x"}', {"a": "x", "b": "y"}, 0.0),
])
def test_lenient_match_follows_sop_bench(pred, gt, expected):
    assert lenient_match(out(pred), gt).value == expected


def test_lenient_extraction_matches_sop_bench_regex():
    # SOP-Bench only considers blocks holding a {...}; the last such block wins
    text = '<final_output>{"d": "no"}</final_output> <final_output>prose</final_output>'
    assert lenient_match(text, {"d": "no"}).value == 1.0
    assert exact_match(text, {"d": "no"}).value == 0.0  # strict: the last block is not JSON


def test_field_accuracy_is_dense_with_format_coefficient():
    gt = {"a": 1, "b": 2, "c": 3, "d": 4}
    r = field_accuracy(out('{"a": 1, "b": 2, "c": 0}'), gt, format_coef=0.2)
    assert r.value == pytest.approx(0.2 + 0.8 * 0.5)
    assert r.metrics == {"field_accuracy": 0.5, "format_ok": 1.0, "fields_correct": 2.0, "fields_total": 4.0}
    assert field_accuracy("no answer", gt).value == 0.0
    assert field_accuracy(out("{}"), gt, format_coef=0.1).value == pytest.approx(0.1)
    assert field_accuracy(out('{"a": "1"}'), {"a": 1}, lenient=True).value == 1.0


def test_success_threshold_and_state_match():
    assert with_success(Reward(0.8), threshold=0.75).metrics["success"] == 1.0
    assert with_success(Reward(0.7, {"x": 1.0}), threshold=0.75).metrics == {"x": 1.0, "success": 0.0}
    assert state_match("abc", "abc").value == 1.0 and state_match("abc", "abd").value == 0.0


def test_custom_rewards_sync_async_and_tuples():
    def length_penalty(text: str) -> float:
        return 1.0 - len(text) / 100

    async def judge(text: str) -> tuple[float, dict]:
        await asyncio.sleep(0)
        return 0.5, {"judge_calls": 1.0}

    async def main():
        assert await score(length_penalty, "x" * 10) == Reward(0.9)
        assert await score(judge, "x") == Reward(0.5, {"judge_calls": 1.0})
        assert await score(lambda t: exact_match(t, {"a": 1}), out('{"a": 1}')) == exact_match(out('{"a": 1}'), {"a": 1})
        with pytest.raises(TypeError, match="expected Reward"):
            await score(lambda: "good")

    asyncio.run(main())


def test_gold_state_match_replays_once_per_task_and_compares_hashes():
    @tool
    def cancel(order_id: str, ep: Episode) -> str:
        """Cancel."""
        ep.data["orders"][order_id] = "cancelled"
        return "ok"

    box = ToolBox([cancel])
    seed = {"orders": {"a": "pending", "b": "pending"}}
    replays: list[str] = []

    async def replay_gold(task: dict) -> Episode:
        replays.append(task["id"])
        ep = Episode(data=seed)
        await box.replay(task["actions"], ep)
        return ep

    task = {"id": "t1", "actions": [{"name": "cancel", "arguments": {"order_id": "a"}}]}

    async def rollout(order_id: str | None) -> float:
        with Episode(data=seed) as ep:
            if order_id:
                await box.call("cancel", {"order_id": order_id}, ep)
            return (await gold_state_match(task, replay_gold, ep)).value

    async def main() -> list[float]:
        return await asyncio.gather(*(rollout(o) for o in ["a", "b", None, "a"] * 4))

    assert asyncio.run(main()) == [1.0, 0.0, 0.0, 1.0] * 4
    assert replays == ["t1"]  # sixteen rollouts, one gold replay
    asyncio.run(main())
    assert replays == ["t1"]  # cached across event loops too

    async def bad(task: dict) -> int:
        return 3

    with pytest.raises(TypeError, match="expected an Episode or its state hash"):
        asyncio.run(gold_state_match({"id": "t2"}, bad, "h"))


def test_outputs_in_messages_is_tau_benchs_rule():
    messages = [{"role": "user", "content": "what did I pay? 1,234.50?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                Message(role="tool", content="1234.50", tool_call_id="c"),
                {"role": "assistant", "content": "You paid $1,234.50 for the Office Chair."}]
    r = outputs_in_messages(["1234.50", "office chair"], messages)
    assert r.value == 1.0 and r.metrics["outputs_found"] == 2.0
    missing = outputs_in_messages(["1234.50", "refund"], messages)  # tool and user text do not count
    assert missing.value == 0.0 and missing.metrics == {"outputs_match": 0.0, "outputs_found": 1.0,
                                                        "outputs_total": 2.0}
    assert outputs_in_messages(["1,234.50"], messages).value == 0.0  # as in tau-bench: only the message loses commas
    assert outputs_in_messages([], messages).value == 1.0
    with pytest.raises(TypeError, match="not one string"):
        outputs_in_messages("1234.50", messages)  # type: ignore[arg-type]
