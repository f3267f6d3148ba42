"""The tau-bench-shaped retail example (examples/tau_retail): its data is what the seed draws, the
tools keep production's schemas, text and errors, the oracle scores 1 and nothing else does,
episodes end at the terminal transfer, and `turnwise verify` passes with a scripted policy.

The slow test trains it for two RL steps with a shrunken config."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest
from examples.tau_retail import generate
from examples.tau_retail.environment import PRODUCTION, SEED, TOOLBOX, TOOLS, open_episode
from examples.tau_retail.oracle import oracle

from turnwise import cli
from turnwise.config import load_config
from turnwise.env import oracle_rollout
from turnwise.eval import command_verify
from turnwise.runtime.testing import IM_END, ByteChat, ScriptedSampler

EXAMPLE = Path(generate.__file__).parent
CHAT = ByteChat()


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (EXAMPLE / "data" / f"{name}.jsonl").read_text().splitlines()]


def test_committed_data_is_what_the_seed_draws():
    db, splits, demo_actions = generate.draw()
    assert json.loads((EXAMPLE / "data" / "db.json").read_text()) == db
    assert rows("train") == splits["train"] and rows("val") == splits["val"]
    demos = rows("demos")
    assert [[json.loads(c["function"]["arguments"]) for m in d["messages"] for c in m.get("tool_calls", ())]
            for d in demos] == [[a["arguments"] for a in actions] for actions in demo_actions]
    kinds = Counter(t["kind"] for t in splits["train"])
    assert set(kinds) == {"cancel", "total", "address", "count"}
    assert 0 < sum(t["transfer"] for t in splits["train"]) < kinds["cancel"]  # both cancel branches occur


def test_the_expert_is_wrong_in_exactly_the_documented_way():
    _, splits, demo_actions = generate.draw()
    mistakes = [(t, a) for t, a in zip(splits["demo"], demo_actions, strict=True)
                if t.get("reason") == "ordered by mistake" and not t["transfer"]]
    wrong = sum(a != t["actions"] for t, a in mistakes) / len(mistakes)
    assert wrong == pytest.approx(generate.EXPERT_WRONG_REASON_RATE, abs=0.2)
    assert all(a == t["actions"] for t, a in zip(splits["demo"], demo_actions, strict=True)
               if t.get("reason") != "ordered by mistake")


def test_tools_are_the_production_tools_byte_for_byte():
    production = json.loads((EXAMPLE / "data" / "production_tools.json").read_text())
    assert json.dumps(TOOLS) == json.dumps(production)
    assert "additionalProperties" not in json.dumps(TOOLS)  # production has none; @tool alone would add it
    assert TOOLBOX["modify_user_address"].state_param == "ep"
    assert "state" in PRODUCTION["modify_user_address"]["function"]["parameters"]["required"]


def test_tool_text_and_errors_are_production_text():
    order_id = next(k for k, o in SEED.value["orders"].items() if o["status"] == "delivered")

    async def main():
        with open_episode({"id": "t"}) as ep:
            found = await TOOLBOX.call("get_order_details", {"order_id": order_id}, ep)
            missing = await TOOLBOX.call("get_order_details", {"order_id": "#W0"}, ep)
            refused = await TOOLBOX.call("cancel_pending_order", {"order_id": order_id, "reason": "no longer needed"}, ep)
            moved = await TOOLBOX.call("modify_user_address", {
                "user_id": SEED.value["orders"][order_id]["user_id"], "address1": "1 Elm Street", "address2": "",
                "city": "Austin", "state": "TX", "country": "USA", "zip": "78701"}, ep)
            return found, missing, refused, moved

    found, missing, refused, moved = asyncio.run(main())
    assert found.content == json.dumps(SEED.value["orders"][order_id])  # json.dumps defaults, as production
    assert (missing.content, refused.content) == ("Error: order not found", "Error: non-pending order cannot be cancelled")
    assert json.loads(moved.content)["address"]["state"] == "TX"


def test_the_oracle_scores_one_on_every_task_and_a_transfer_ends_the_episode():
    tasks = rows("val") + rows("train")[:64]

    async def main():
        return await asyncio.gather(*(oracle(t, None, None) for t in tasks))

    assert [r["reward"] for r in asyncio.run(main())] == [1.0] * len(tasks)
    transfer = next(t for t in tasks if t["transfer"])

    async def rollout():
        with open_episode(transfer) as ep:
            return await oracle_rollout(TOOLBOX, ep, [], transfer["actions"], reply="never sent")

    result = asyncio.run(rollout())
    assert result.stop_reason.value == "terminal_tool" and result.messages[-1].content == "Transfer successful"


_BLOCK = re.compile(r"<\|im_start\|>(user|tool)\n(.*?)<\|im_end\|>", re.DOTALL)
TASKS = {t["instruction"]: t for t in rows("train") + rows("val")}


def gold_policy(prompt_ids: Sequence[int]) -> list[int]:
    """A scripted 'model': finds its task from the instruction, takes the next gold action, then replies."""
    blocks = _BLOCK.findall(CHAT.decode(prompt_ids))
    task = TASKS[next(text for role, text in blocks if role == "user")]
    done = sum(role == "tool" for role, _ in blocks)
    if done < len(task["actions"]):
        action = task["actions"][done]
        reply = ('<tool_call>{"name": ' + json.dumps(action["name"]) + ', "arguments": '
                 + json.dumps(action["arguments"]) + "}</tool_call>")
    else:
        reply = task["reply"]
    return CHAT.encode(reply) + [IM_END]


def test_verify_passes_on_the_retail_desk_with_a_policy_that_calls_tools(monkeypatch: pytest.MonkeyPatch, capsys):
    @contextlib.contextmanager
    def policy(cfg):
        yield ScriptedSampler(gold_policy), CHAT

    monkeypatch.setattr(command_verify, "job_policy", policy)
    sampled = command_verify.sample_tasks(load_config(EXAMPLE / "config.yaml", ["verify.tasks=8"]))
    assert {t.row["kind"] for t in sampled} == {"cancel", "total", "address", "count"}
    assert any(t.row["transfer"] for t in sampled)  # an episode that ends at the terminal tool is verified too
    args = ["verify", str(EXAMPLE / "config.yaml"), "--set", "verify.tasks=8", "--set", "verify.concurrency=16",
            "--set", "sampling_max_tokens=400"]  # the scripted policy's tokens are bytes
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "PASS  reproducibility  8 tasks replayed: " in out and "8 final states identical" in out
    assert " 0 tool responses" not in out, out
    for line in ("PASS  isolation        16 concurrent rollouts match", "PASS  schema           6 tools match production",
                 "PASS  reward/oracle    oracle reaches 1 on all 8 tasks", "PASS  reward/null"):
        assert line in out, out
    assert out.rstrip().endswith("verify: OK")


@pytest.mark.slow
def test_it_trains_for_two_steps(tmp_path: Path):
    """The real job (tiny model, warm start, GRPO + PPO), shrunk to minutes: 8 demonstrations,
    2 validation tasks, 2 steps of 2 tasks x 2 rollouts."""
    (tmp_path / "demos.jsonl").write_text("".join((EXAMPLE / "data" / "demos.jsonl").read_text().splitlines(True)[:8]))
    (tmp_path / "val.jsonl").write_text("".join((EXAMPLE / "data" / "val.jsonl").read_text().splitlines(True)[:2]))
    args = ["train", str(EXAMPLE / "config.yaml"), "--set", "max_steps=2", "--set", "global_batch_size=2",
            "--set", "group_size=2", "--set", "sampling_max_tokens=32", "--set", f"output_dir={tmp_path / 'runs'}",
            "--set", f"warm_start.demos_path={tmp_path / 'demos.jsonl'}", "--set", f"data.val_path={tmp_path / 'val.jsonl'}",
            "--set", "tracking.mlflow=false", "--set", "tracking.progress=false"]
    assert cli.main(args) == 0
    run = next((tmp_path / "runs").glob("tau_retail-*"))
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "reward/mean" in m] == [1, 2]
