"""The support-desk environment: SOP, tools of all three kinds, per-rollout state, rewards.

Tools (built with `turnwise.env`):
- `search_policy(topic)`: the knowledge base, read-only, replayed from a cassette
  (`data/kb_cassette.jsonl`); no live service is called during training.
- `lookup_order`, `issue_refund`, `create_replacement`, `escalate(reason)`: stateful order tools
  over the rollout's private SQLite database (an `Episode` filled from the task row), always
  about the signed-in customer's latest order.
- `run_report(sql)`: a read-only SQL report over the customer's data, run in the sandbox on a
  private copy of the rollout's database.

The SOP (`sop.md`) decides the action from the order's status, amount, the customer's tier and
the fraud flag. The task row carries the ground truth: the final JSON (`answer`) and the final
database state (`expected_state`, as `db_state` returns it). The strict reward is 1 only when
both match; `dense_reward` gives partial credit (field accuracy with a format coefficient,
averaged with the state match). Both grade only a clean reply: the final message must be the
`<final_output>` block and nothing else (text after it counts as a format failure, so RL
cannot learn to ramble past the answer).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from turnwise.env import Cassette, Episode, ToolBox, ToolError, exact_match, field_accuracy, run_sql, tool

HERE = Path(__file__).parent
SOP_TEXT = (HERE / "sop.md").read_text()
SYSTEM_PROMPT = "Support agent for the signed-in customer. Follow the SOP."
REFUND_LIMIT = 100
"""Standard-tier refunds above this amount need a human (SOP 3); gold tier has no limit."""
CLAIMS = ("damaged", "lost")
ACTION_TABLES = ("refunds", "replacements", "escalations")

SCHEMA = """
CREATE TABLE customer (customer_id TEXT PRIMARY KEY, tier TEXT NOT NULL);
CREATE TABLE orders (order_id TEXT PRIMARY KEY, amount INTEGER NOT NULL, status TEXT NOT NULL,
                     fraud_flag INTEGER NOT NULL);
CREATE TABLE refunds (order_id TEXT NOT NULL, amount INTEGER NOT NULL);
CREATE TABLE replacements (order_id TEXT NOT NULL);
CREATE TABLE escalations (order_id TEXT NOT NULL, reason TEXT NOT NULL);
"""


def open_episode(task: Mapping[str, Any]) -> Episode:
    """A rollout's private state: a database holding only this task's customer."""
    ep = Episode(seed=str(task["id"]))
    db = ep.db
    db.executescript(SCHEMA)
    customer = task["customer"]
    db.execute("INSERT INTO customer VALUES (?, ?)", (customer["customer_id"], customer["tier"]))
    db.executemany("INSERT INTO orders VALUES (?, ?, ?, ?)",
                   [(o["order_id"], o["amount"], o["status"], int(o["fraud_flag"])) for o in task["orders"]])
    db.executemany("INSERT INTO refunds VALUES (?, ?)", [tuple(r) for r in task.get("past_refunds", [])])
    return ep


def db_state(ep: Episode) -> dict[str, list[list[Any]]]:
    """What the graders compare: every order's status and the rows of the action tables, sorted."""
    db = ep.db
    state = {"orders": sorted(list(r) for r in db.execute("SELECT order_id, status FROM orders"))}
    for table in ACTION_TABLES:
        state[table] = sorted(list(r) for r in db.execute(f"SELECT * FROM {table}"))
    return state


def _latest(db: sqlite3.Connection) -> tuple[str, int, str, bool, str]:
    row = db.execute("SELECT order_id, amount, status, fraud_flag FROM orders ORDER BY rowid DESC LIMIT 1").fetchone()
    if row is None:
        raise ToolError("the customer has no orders")
    tier = db.execute("SELECT tier FROM customer").fetchone()[0]
    return row[0], row[1], row[2], bool(row[3]), tier


def _open_claim(db: sqlite3.Connection) -> tuple[str, int]:
    order_id, amount, status, _, _ = _latest(db)
    if status not in CLAIMS:
        raise ToolError(f"order {order_id} is {status}; only damaged or lost orders can be settled")
    return order_id, amount


@tool
def lookup_order(state: Episode) -> dict[str, Any]:
    """The latest order."""  # with "warning": "fraud" only when the order carries the fraud flag
    order_id, amount, status, fraud_flag, tier = _latest(state.db)
    order = {"status": status, "amount": amount, "tier": tier, "order_id": order_id}
    return order | {"warning": "fraud"} if fraud_flag else order


@tool
def issue_refund(state: Episode) -> dict[str, Any]:
    """Refund the latest order."""
    order_id, amount = _open_claim(state.db)
    state.db.execute("INSERT INTO refunds VALUES (?, ?)", (order_id, amount))
    state.db.execute("UPDATE orders SET status = 'refunded' WHERE order_id = ?", (order_id,))
    return {"status": "refunded"}


@tool
def create_replacement(state: Episode) -> dict[str, Any]:
    """Replace the latest order."""
    order_id, _ = _open_claim(state.db)
    state.db.execute("INSERT INTO replacements VALUES (?)", (order_id,))
    state.db.execute("UPDATE orders SET status = 'replaced' WHERE order_id = ?", (order_id,))
    return {"status": "replaced"}


@tool
def escalate(reason: Literal["fraud", "amount_limit"], state: Episode) -> dict[str, Any]:
    """Escalate the latest order to a human."""
    order_id, _ = _open_claim(state.db)
    state.db.execute("INSERT INTO escalations VALUES (?, ?)", (order_id, reason))
    state.db.execute("UPDATE orders SET status = 'escalated' WHERE order_id = ?", (order_id,))
    return {"status": "escalated"}


@tool
async def run_report(sql: str, state: Episode) -> dict[str, Any]:
    """Read-only SQL over tables orders and refunds."""
    dump = "\n".join(state.db.iterdump())
    result = await run_sql(sql, setup=dump, max_rows=20, root=state.dir)  # its files go with the episode
    if not result.ok:
        raise ToolError(result.error or f"query failed ({result.status.value})")
    return result.result["rows"]


def search_policy(topic: Literal["returns", "shipping", "warranty", "refunds"]) -> str:
    """Policy knowledge base."""
    raise ToolError("the knowledge base is only replayed here; generate.py records it")


KB_CASSETTE_PATH = HERE / "data" / "kb_cassette.jsonl"


def make_toolbox(kb: Cassette, live_kb: Callable[..., str] | None = None) -> ToolBox:
    """The agent's tools; `live_kb` (with a recording cassette) records the knowledge base."""
    return ToolBox([kb.tool(search_policy, live_kb), lookup_order, issue_refund, create_replacement,
                    escalate, run_report])


TOOLBOX = make_toolbox(Cassette(KB_CASSETTE_PATH))
TOOLS = TOOLBOX.schemas()


def clean_reply(final_text: str) -> str:
    """The reply if it is exactly one `<final_output>` block (whitespace aside), else ""."""
    text = final_text.strip()
    one_block = text.startswith("<final_output>") and text.endswith("</final_output>") \
        and text.count("</final_output>") == 1
    return text if one_block else ""


def reward(final_text: str, ep: Episode, task: Mapping[str, Any]) -> float:
    """Strict: the final JSON equals the answer and the database equals the expected state."""
    return exact_match(clean_reply(final_text), task["answer"]).value * float(db_state(ep) == task["expected_state"])


def dense_reward(final_text: str, ep: Episode, task: Mapping[str, Any], format_coef: float = 0.1) -> float:
    """Dense: half field accuracy of the final JSON (with a format coefficient), half state match."""
    fields = field_accuracy(clean_reply(final_text), task["answer"], format_coef=format_coef).value
    return 0.5 * fields + 0.5 * float(db_state(ep) == task["expected_state"])
