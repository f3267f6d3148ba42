"""`turnwise verify` through the real chat format and sampler engine of the built-in tiny model.

The tokenizer's chat format gives every parsed tool call a fresh random id, so a replay's tool
messages differ from the first run's in `tool_call_id`: verify must compare them by content.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

from turnwise import cli
from turnwise.config import JobConfig, ModelConfig
from turnwise.eval.verify import CheckStatus, verify_environment
from turnwise.policy.chat import ChatFormat
from turnwise.policy.tiny import tiny_model_dir
from turnwise.runtime.testing import ScriptedSampler
from turnwise.types import Task
from verify_envs import notes

pytestmark = pytest.mark.slow


def _scripted_tool_caller(chat: ChatFormat) -> ScriptedSampler:
    stop = min(chat.stop_token_ids)

    def script(prompt_ids):
        text = chat.decode(prompt_ids)
        turn = len(re.findall(r"<tool_call>", text.split("<|im_start|>user", 1)[-1]))
        note = re.findall(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", text, re.DOTALL)[-1]
        replies = ['<tool_call>\n{"name": "add_note", "arguments": ' + json.dumps({"text": note}) + "}\n</tool_call>",
                   '<tool_call>\n{"name": "list_notes", "arguments": {}}\n</tool_call>',
                   '<final_output>{"count": 1}</final_output>']
        return chat.encode(replies[min(turn, 2)]) + [stop]

    return ScriptedSampler(script)


def test_replays_through_the_tiny_models_chat_format_ignore_random_tool_call_ids():
    chat = ChatFormat(AutoTokenizer.from_pretrained(tiny_model_dir(ModelConfig())))
    assert chat.format == "hermes"
    tasks = [Task(id=r["id"], row=r) for r in notes.TASKS[:2]]

    def verify(agent):
        return asyncio.run(verify_environment(agent, tasks, policy=_scripted_tool_caller(chat), chat=chat,
                                              cfg=JobConfig(sampling_max_tokens=64), concurrency=4,
                                              oracle_agent=notes.oracle))

    clean = verify(notes.agent)
    assert clean.ok, clean.render()
    assert clean.checks[0].summary == "2 tasks replayed: 4 tool responses, 2 final states identical"
    noisy = verify(notes.agent_nondeterministic)
    assert noisy.checks[0].status == CheckStatus.FAIL
    assert {f.tool for f in noisy.checks[0].findings} >= {"add_note", "list_notes"}


def test_cli_with_the_tiny_model(tmp_path: Path, capsys):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in notes.TASKS))
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({
        "data": {"train_path": "train.jsonl"}, "agent": {"function": "verify_envs.notes:agent"},
        "sampling_max_tokens": 16, "verify": {"tasks": 2, "concurrency": 4}}))
    assert cli.main(["verify", str(tmp_path / "job.yaml")]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "PASS  reproducibility  2 tasks replayed" in out and out.rstrip().endswith("verify: OK")
