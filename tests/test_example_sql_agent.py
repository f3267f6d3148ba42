"""The SQL-agent example (examples/sql_agent): its data is reproducible and verified in the sandbox,
bad tool calls become error messages, the reward is exact match, and the agent served over HTTP
answers push rollouts against a runtime with the tiny model's real chat format.

The tiny model is random before training, so the push test scripts the policy's tokens (the
runtime, chat template, tool-call parsing, agent server and sandbox are all real). The slow test
runs the one command (`python -m examples.sql_agent.run`) with a shrunken config (~25 s).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter

import httpx
import pytest
from examples.sql_agent import generate
from examples.sql_agent.agent import sql_agent
from examples.sql_agent.environment import MAX_ROWS, SCHEMA, TEMPLATES, TOOLS, call_tool, reward
from examples.sql_agent.run import agent_server, free_port

from turnwise.adapter import create_agent_app
from turnwise.config import ModelConfig, default_sampling_params, load_config
from turnwise.env import run_sql
from turnwise.rollout.push import PushDispatcher
from turnwise.runtime.app import create_app
from turnwise.runtime.server import RuntimeServer
from turnwise.runtime.store import TrajectoryStore
from turnwise.runtime.testing import ScriptedSampler
from turnwise.train.sft import completion_ids, load_demos
from turnwise.types import Task, TrajectoryStatus

SETUP = SCHEMA + """\
insert into customers values (1, 'Alice'), (2, 'Bob');
insert into orders values (1, 1, 'jacket', 'lost'), (2, 2, 'monitor', 'delivered'), (3, 1, 'jacket', 'lost');
"""
EXPECTED = {"orders": 3, "customers": 2, "lost": 2, "delivered": 1, "categories": 2}


def read_jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (generate.DATA / f"{name}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def chat():
    from turnwise.policy.chat import ChatFormat
    from turnwise.policy.load import load_policy

    return ChatFormat(load_policy(ModelConfig())[1])


def test_committed_data_is_what_the_seed_draws():
    splits, demo_sql = generate.draw(generate.SEED, generate.N_TRAIN, generate.N_VAL, generate.N_DEMOS)
    for split in ("train", "val"):
        assert [{k: v for k, v in row.items() if k != "answer"} for row in read_jsonl(split)] == splits[split]
    demos = read_jsonl("demos")
    assert [d["messages"][1]["content"] for d in demos] == [t["question"] for t in splits["demo"]]
    assert [json.loads(d["messages"][2]["tool_calls"][0]["function"]["arguments"])["query"] for d in demos] == demo_sql
    assert set(Counter(t["template"] for t in splits["train"])) == set(TEMPLATES)
    # the expert's documented mistake: asked about lost or delivered orders, it often counts every order
    filtered = [sql for t, sql in zip(splits["demo"], demo_sql, strict=True) if t["template"] in generate.FILTERED]
    assert 0.5 < filtered.count(TEMPLATES["orders"][1]) / len(filtered) < 0.7


def test_gold_queries_give_the_committed_answers_in_the_sandbox():
    tasks = {t["template"]: t for t in read_jsonl("val")}  # one task per template

    async def gold(task: dict) -> object:
        return (await run_sql(task["gold_sql"], setup=task["setup"])).result["rows"][0][0]

    async def all_gold() -> list:
        return await asyncio.gather(*(gold(t) for t in tasks.values()))

    assert set(tasks) == set(TEMPLATES)
    assert [{"answer": a} for a in asyncio.run(all_gold())] == [t["answer"] for t in tasks.values()]
    small = asyncio.run(generate.build(seed=7, n_train=3, n_val=1, n_demos=2))
    assert small == asyncio.run(generate.build(seed=7, n_train=3, n_val=1, n_demos=2))


def test_gold_queries_on_a_known_shop():
    async def answers() -> list:
        return await asyncio.gather(*(call_tool("run_sql", json.dumps({"query": sql}), SETUP)
                                      for _, sql in TEMPLATES.values()))

    contents = dict(zip(TEMPLATES, asyncio.run(answers()), strict=True))
    assert contents["lost"] == '[{"answer":2}]'  # rows as records: the final answer's own shape
    assert {name: json.loads(c)[0]["answer"] for name, c in contents.items()} == EXPECTED


def test_results_are_records_capped_at_max_rows():
    everything = asyncio.run(call_tool("run_sql", '{"query": "select * from orders"}', SETUP))
    assert json.loads(everything)[1] == {"id": 2, "customer_id": 2, "category": "monitor", "status": "delivered"}
    many = "with recursive k(i) as (select 1 union all select i + 1 from k where i < 15) select i from k"
    capped = asyncio.run(call_tool("run_sql", json.dumps({"query": many}), SETUP))
    assert capped.endswith(f" (first {MAX_ROWS} rows)")
    assert json.loads(capped.rsplit(" (", 1)[0]) == [{"i": i} for i in range(1, MAX_ROWS + 1)]


@pytest.mark.parametrize("name, arguments, error", [
    ("drop_database", "{}", "Error: unknown tool 'drop_database'"),
    ("run_sql", '{"query": "select 1"', "Error: arguments are not valid JSON"),
    ("run_sql", '["select 1"]', 'Error: run_sql needs {"query"'),
    ("run_sql", '{"sql": "select 1"}', 'Error: run_sql needs {"query"'),
    ("run_sql", '{"query": 7}', 'Error: run_sql needs {"query"'),
    ("run_sql", '{"query": "selec count(*) from orders"}', 'Error: OperationalError: near "selec"'),
    ("run_sql", '{"query": "select * from refunds"}', "Error: OperationalError: no such table: refunds"),
])
def test_bad_tool_calls_become_error_messages(name, arguments, error):
    assert asyncio.run(call_tool(name, arguments, SETUP)).startswith(error)


def test_reward_is_exact_match_of_the_answer():
    task = {"answer": {"answer": 2}}
    assert reward('<final_output>{"answer":2}</final_output>', task) == 1.0
    assert reward('The count is 2. <final_output>{"answer": 2}</final_output>', task) == 1.0
    for wrong in ('<final_output>{"answer":3}</final_output>', '<final_output>{"answer":"2"}</final_output>',
                  '{"answer": 2}', "<final_output>2</final_output>", ""):
        assert reward(wrong, task) == 0.0
    assert reward('<final_output>{"answer":"lost"}</final_output>', {"answer": {"answer": "lost"}}) == 1.0


def test_demos_fit_the_warm_start_and_the_sampling_budget(chat):
    cfg = load_config(generate.DATA.parent / "config.yaml")
    demos = load_demos(cfg.warm_start.demos_path)
    assert len(demos) == generate.N_DEMOS and all(tools == TOOLS for _, tools in demos)
    by_query = {msgs[2].tool_calls[0].arguments: (msgs, tools) for msgs, tools in demos}  # one per query
    longest = max(len(completion_ids(chat, msgs[:i], m, tools))
                  for msgs, tools in by_query.values() for i, m in enumerate(msgs) if m.role == "assistant")
    assert longest <= cfg.sampling_max_tokens  # every expert turn can be sampled within the budget


def scripted_policy(chat) -> ScriptedSampler:
    """A policy that first calls run_sql with a misspelled argument, then (after the error) with the
    gold query of the question's template, then answers the first cell of the tool's result."""
    eos = chat.tokenizer.convert_tokens_to_ids("<|im_end|>")

    def call(arguments: dict) -> list[int]:
        return chat.encode('<tool_call>\n' + json.dumps({"name": "run_sql", "arguments": arguments}) + '\n</tool_call>')

    def script(prompt_ids) -> list[int]:
        text = chat.decode(prompt_ids)
        sql = next(sql for questions, sql in TEMPLATES.values() if any(q in text for q in questions))
        responses = re.findall(r"<tool_response>\s*(.*?)\s*</tool_response>", text, re.DOTALL)
        if not responses:
            return call({"sql": sql}) + [eos]
        if responses[-1].startswith("Error"):
            return call({"query": sql}) + [eos]
        return chat.encode("<final_output>" + json.dumps(json.loads(responses[-1])[0]) + "</final_output>") + [eos]

    return ScriptedSampler(script)


def test_served_agent_answers_push_rollouts_against_the_runtime(tmp_path, chat):
    store = TrajectoryStore(tmp_path / "t.db", "job-sql")
    app = create_app(sampler=scripted_policy(chat), chat=chat, store=store, model_name="tiny",
                     default_params=default_sampling_params(max_tokens=64))
    tasks = [Task(t["id"], t) for t in read_jsonl("val")[:2]]
    wrong = Task("wrong", {**tasks[0].row, "id": "wrong", "answer": {"answer": "not this"}})
    with RuntimeServer(app) as runtime, RuntimeServer(create_agent_app(sql_agent)) as agent:
        dispatcher = PushDispatcher(agent.base_url, base_url=runtime.base_url, model="tiny", store=store,
                                    concurrency=8, timeout=30.0, max_retries=0)
        groups = asyncio.run(dispatcher.run_groups([*tasks, wrong], 2, {"temperature": 1.0, "max_tokens": 64}))
    rollouts = {g.task.id: [r.trajectory for r in g.rollouts_G] for g in groups}
    for t in (t for task in tasks for t in rollouts[task.id]):
        assert t.status == TrajectoryStatus.REWARDED and t.rewards == (1.0,) and len(t.turns) == 3
        error_reply = t.turns[1].request_messages[-1]
        assert error_reply.role == "tool" and error_reply.content.startswith('Error: run_sql needs {"query"')
    assert all(t.status == TrajectoryStatus.REWARDED and t.rewards == (0.0,) for t in rollouts["wrong"])


def test_run_starts_the_agent_server_and_stops_it():
    with agent_server(free_port()) as url:
        assert httpx.get(f"{url}/health").json() == {"status": "healthy"}
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=2.0)


@pytest.mark.slow
def test_the_one_command_trains_against_its_own_agent_server_and_stops_it(tmp_path, capsys):
    from examples.sql_agent.run import main

    overrides = [f"output_dir={tmp_path}", "tracking.mlflow=false", "tracking.progress=false",
                 "warm_start.epochs=1", "max_steps=1", "global_batch_size=4", "group_size=2", "data.val_path=null"]
    assert main([arg for o in overrides for arg in ("--set", o)]) == 0
    out = capsys.readouterr().out
    url = re.search(r"agent server: \S+ on (\S+);", out).group(1)
    run_dir = tmp_path / re.search(r"^run: .*/(\S+)$", out, re.MULTILINE).group(1)
    assert "after 1 RL steps" in out and (run_dir / "summary.json").is_file()
    rollouts = [json.loads(line) for line in (run_dir / "rollouts" / "step_00001.jsonl").read_text().splitlines()]
    assert len(rollouts) == 8 and all(r["status"] == "rewarded" for r in rollouts)  # pushed, run, reported
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=2.0)
