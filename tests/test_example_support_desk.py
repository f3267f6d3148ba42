"""The support-desk environment: ground truth, tools, rewards, the expert's documented flaws, and
`turnwise verify` on it with a scripted SOP-following policy (no model needed)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest
from examples.support_desk import generate
from examples.support_desk.environment import TOOLBOX, db_state, dense_reward, open_episode, reward
from examples.support_desk.oracle import oracle

from turnwise import cli
from turnwise.env import format_final_output
from turnwise.eval import command_verify
from turnwise.runtime.testing import IM_END, ByteChat, ScriptedSampler

ROOT = Path(__file__).parent.parent
EXAMPLE = ROOT / "examples" / "support_desk"
CHAT = ByteChat()


def _tasks(split: str) -> list[dict]:
    return [json.loads(line) for line in (EXAMPLE / "data" / f"{split}.jsonl").read_text().splitlines()]


def test_every_split_mixes_the_three_tool_patterns_and_every_sop_branch() -> None:
    tasks = [t for split in ("train", "val", "test") for t in _tasks(split)]
    assert Counter(t["kind"] for t in tasks).keys() == {"order", "policy", "report"}
    actions = Counter(t["answer"]["action"] for t in tasks)
    assert actions.keys() == {"close", "wait", "refund", "replace", "escalate", "answer", "report"}
    reasons = Counter(a["arguments"]["reason"] for t in tasks for a in t["gold_actions"] if a["name"] == "escalate")
    assert reasons.keys() == {"fraud", "amount_limit"}
    assert len({t["id"] for t in tasks}) == len(tasks)


@pytest.mark.parametrize("split", ["val", "test"])
def test_the_oracle_reaches_every_answer_and_expected_state(split: str) -> None:
    async def run() -> list[dict]:
        return await asyncio.gather(*(oracle(t, None, None) for t in _tasks(split)))

    assert [r["reward"] for r in asyncio.run(run())] == [1.0] * len(_tasks(split))


def test_strict_reward_needs_the_right_answer_and_the_right_database() -> None:
    task = next(t for t in _tasks("val") if t["answer"] == {"action": "refund"})
    with open_episode(task) as ep:
        assert reward(format_final_output(task["answer"]), ep, task) == 0.0  # said refund, did nothing
        assert dense_reward(format_final_output(task["answer"]), ep, task) == pytest.approx(0.5)
        assert asyncio.run(TOOLBOX.call("issue_refund", "{}", ep)).content == '{"status":"refunded"}'
        assert reward(format_final_output(task["answer"]), ep, task) == 1.0
        assert reward(format_final_output({"action": "replace"}), ep, task) == 0.0
        assert dense_reward("no final output", ep, task) == pytest.approx(0.5)
        # the reply must be the final output and nothing else
        right = format_final_output(task["answer"])
        assert reward(f"  {right}\n", ep, task) == 1.0
        assert reward(right + '{"action":"refund"}</final_output>{"action":"', ep, task) == 0.0
        assert reward("Done. " + right, ep, task) == 0.0
        assert dense_reward(right + " thanks", ep, task) == pytest.approx(0.5)


def test_lookup_order_shows_a_warning_only_for_fraud_flagged_orders() -> None:
    for task in _tasks("val"):
        if task["kind"] != "order":
            continue
        with open_episode(task) as ep:
            shown = json.loads(asyncio.run(TOOLBOX.call("lookup_order", "{}", ep)).content)
        latest = task["orders"][-1]
        assert shown.pop("warning", None) == ("fraud" if latest["fraud_flag"] else None)
        assert shown == {"status": latest["status"], "amount": latest["amount"],
                         "tier": task["customer"]["tier"], "order_id": latest["order_id"]}


def test_tools_reject_bad_calls_with_messages_and_leave_the_state_alone() -> None:
    task = next(t for t in _tasks("val") if t["answer"] == {"action": "close"})
    with open_episode(task) as ep:
        before = db_state(ep)
        calls = [("issue_refund", "{}", "only damaged or lost orders can be settled"),
                 ("escalate", '{"reason": "angry"}', "reason"),
                 ("escalate", "{not json", "not valid JSON"),
                 ("lookup_order", '{"order_id": "A1"}', "unexpected argument"),
                 ("delete_account", "{}", "unknown tool"),
                 ("run_report", '{"sql": "SELEC nonsense"}', "syntax error"),
                 ("search_policy", '{"topic": "pets"}', "topic")]
        for name, args, expected in calls:
            result = asyncio.run(TOOLBOX.call(name, args, ep))
            assert result.is_error and expected in result.content, (name, result.content)
        # a report query runs on a private copy in the sandbox: writes there change nothing here
        asyncio.run(TOOLBOX.call("run_report", '{"sql": "DELETE FROM orders"}', ep))
        assert db_state(ep) == before
        count = asyncio.run(TOOLBOX.call("run_report", '{"sql": "SELECT COUNT(*) FROM orders"}', ep))
        assert count.content == f"[[{len(task['orders'])}]]"


def test_the_expert_is_wrong_in_exactly_the_documented_ways() -> None:
    rng = random.Random(1)
    outcomes: Counter[str] = Counter()
    for i in range(3000):
        task = generate.make_task(rng, i, "x")
        gold = generate.solution(task)
        expert = generate.solution(task, expert_rng=rng)
        latest = task["orders"][-1]
        if task["kind"] != "order" or latest["status"] not in ("damaged", "lost"):
            assert expert == gold
        elif latest["fraud_flag"]:
            outcomes["flag", expert == gold] += 1
        elif latest["status"] == "lost":
            outcomes["lost", expert == gold] += 1
        else:
            assert expert == gold
    for kind, rate in (("flag", generate.EXPERT_MISSES_FLAG_RATE), ("lost", generate.EXPERT_OUTDATED_RATE)):
        wrong = outcomes[kind, False] / (outcomes[kind, False] + outcomes[kind, True])
        assert wrong == pytest.approx(rate, abs=0.05), kind


_BLOCK = re.compile(r"<\|im_start\|>(user|tool)\n(.*?)<\|im_end\|>", re.DOTALL)
_QUESTION_TOPIC = {q: t for t, qs in generate.POLICY_QUESTIONS.items() for q in qs}
_QUESTION_TABLE = {q: t for t, qs in generate.REPORT_QUESTIONS.items() for q in qs}


def _call(name: str, arguments: dict | None = None) -> str:
    return '<tool_call>{"name": ' + json.dumps(name) + ', "arguments": ' + json.dumps(arguments or {}) + "}</tool_call>"


def _sop_policy(prompt_ids: Sequence[int]) -> list[int]:
    """A rule-following 'model': reads the question and the tool responses, applies the SOP."""
    blocks = _BLOCK.findall(CHAT.decode(prompt_ids))
    question = next(text for role, text in blocks if role == "user")
    responses = [json.loads(text) if text[:1] in "[{" else text for role, text in blocks if role == "tool"]
    if question in _QUESTION_TOPIC:
        topic = _QUESTION_TOPIC[question]
        reply = format_final_output({"action": "answer", "days": int(re.search(r"\d+", responses[0]).group())}) \
            if responses else _call("search_policy", {"topic": topic})
    elif question in _QUESTION_TABLE:
        table = _QUESTION_TABLE[question]
        count = responses[0][0][0] if responses else None
        field, yes = generate.REPORT_FIELDS[table], count == 1 if table == "orders" else bool(count)
        reply = format_final_output({"action": "report", field: yes}) if responses \
            else _call("run_report", {"sql": f"SELECT COUNT(*) FROM {table}"})
    elif not responses:
        reply = _call("lookup_order")
    else:
        order = {**responses[0], "fraud_flag": responses[0].get("warning") == "fraud"}
        calls, action = generate.decide(order, order["tier"])
        pending = calls[len(responses) - 1:]
        reply = _call(pending[0]["name"], pending[0].get("arguments")) if pending else \
            format_final_output({"action": action})
    return CHAT.encode(reply) + [IM_END]


def test_verify_passes_on_the_support_desk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    @contextlib.contextmanager
    def policy(cfg):
        yield ScriptedSampler(_sop_policy), CHAT

    monkeypatch.setattr(command_verify, "job_policy", policy)
    args = ["verify", str(EXAMPLE / "config.yaml"), "--set", "verify.tasks=12", "--set", "verify.concurrency=24",
            "--set", "sampling_max_tokens=200"]  # the scripted policy's tokens are bytes
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "PASS  reproducibility  12 tasks replayed: " in out and "12 final states identical" in out
    assert " 0 tool responses" not in out, out
    for line in ("PASS  isolation", "PASS  schema           6 tools match production",
                 "PASS  reward/oracle    oracle reaches 1 on all 12 tasks", "PASS  reward/null"):
        assert line in out, out
    assert out.rstrip().endswith("verify: OK")
