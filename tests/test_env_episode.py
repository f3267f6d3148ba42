"""Per-rollout episode state: private DB copies, deterministic ids, cleanup, state hashes."""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
import time
from pathlib import Path

import pytest

from turnwise.env.episode import Episode, IdGenerator, fast_copy
from turnwise.env.tools import ToolBox, ToolError, tool


@pytest.fixture
def seed_db(tmp_path: Path) -> Path:
    path = tmp_path / "seed.sqlite3"
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE orders (id TEXT PRIMARY KEY, total REAL, status TEXT);
        CREATE TABLE refunds (id TEXT PRIMARY KEY, order_id TEXT REFERENCES orders(id), amount REAL);
    """)
    conn.executemany("INSERT INTO orders VALUES (?, ?, ?)",
                     [(f"ord_{i}", 10.0 + i, "shipped") for i in range(1024)])
    conn.commit()
    conn.close()
    return path


@tool
def refund(order_id: str, amount: float, state: Episode) -> dict:
    """Refund an order.

    Args:
        order_id: Order to refund.
        amount: Dollars.
    """
    row = state.db.execute("SELECT total FROM orders WHERE id = ?", (order_id,)).fetchone()
    if row is None:
        raise ToolError(f"order {order_id} not found")
    refund_id = state.ids.new("rf")
    state.db.execute("INSERT INTO refunds VALUES (?, ?, ?)", (refund_id, order_id, amount))
    state.db.execute("UPDATE orders SET status = 'refunded' WHERE id = ?", (order_id,))
    return {"refund_id": refund_id, "created_at": state.now().isoformat()}


TOOLS = ToolBox([refund])
GOLD = [{"name": "refund", "arguments": {"order_id": "ord_3", "amount": 13.0}}]


def test_ids_are_deterministic_per_seed_and_prefix():
    a, b, c = IdGenerator("task-1:0"), IdGenerator("task-1:0"), IdGenerator("task-1:1")
    seq_a = [a.new("ord"), a.new("rf"), a.new("ord")]
    assert seq_a == [b.new("ord"), b.new("rf"), b.new("ord")]
    assert seq_a[0] != c.new("ord")
    assert re.fullmatch(r"ord_[0-9a-f]{12}", seq_a[0])
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}", a.uuid())


def test_private_copy_and_cleanup(seed_db: Path):
    async def main():
        async with Episode("s", seed_db=seed_db) as ep1, Episode("s", seed_db=seed_db) as ep2:
            assert ep1.dir != ep2.dir and ep1.dir.is_dir()
            r = await TOOLS.call("refund", '{"order_id": "ord_1", "amount": 5}', ep1)
            assert not r.is_error
            assert ep1.db.execute("SELECT status FROM orders WHERE id='ord_1'").fetchone() == ("refunded",)
            assert ep2.db.execute("SELECT status FROM orders WHERE id='ord_1'").fetchone() == ("shipped",)
            return ep1.dir, ep2.dir

    dirs = asyncio.run(main())
    assert not any(d.exists() for d in dirs)
    seed = sqlite3.connect(seed_db)
    assert seed.execute("SELECT count(*) FROM refunds").fetchone() == (0,)  # the seed is untouched


def test_cleanup_on_failure(seed_db: Path):
    ep = Episode(seed_db=seed_db)
    with pytest.raises(RuntimeError), ep:
        raise RuntimeError("agent crashed")
    assert ep.closed and not ep.dir.exists()
    ep.close()  # idempotent


def test_gold_replay_hash_matches_agent_path(seed_db: Path):
    async def agent_path(ep: Episode) -> str:  # a detour through a failed call, then the right action
        await TOOLS.call("refund", '{"order_id": "ord_nope", "amount": 13}', ep)
        await TOOLS.call("refund", '{"amount": 13.0, "order_id": "ord_3"}', ep)
        return ep.state_hash()

    async def main():
        with Episode("t1:0", seed_db=seed_db) as gold, Episode("t1:0", seed_db=seed_db) as agent, \
                Episode("t1:0", seed_db=seed_db) as wrong, Episode("t1:0", seed_db=seed_db) as fresh:
            await TOOLS.replay(GOLD, gold)
            assert await agent_path(agent) == gold.state_hash()
            await TOOLS.replay([{"name": "refund", "arguments": {"order_id": "ord_4", "amount": 13.0}}], wrong)
            assert wrong.state_hash() != gold.state_hash()
            diff = wrong.diff(gold)
            assert any(d.startswith("refunds: only in self") and "ord_4" in d for d in diff)
            assert any(d.startswith("orders: only in other") and "ord_3" in d for d in diff)
            assert fresh.state_hash() != gold.state_hash()

    asyncio.run(main())


def test_hash_ignores_insertion_order_but_sees_values_data_and_files():
    def build(order: list[int], value: int = 1) -> Episode:
        ep = Episode()
        ep.db.execute("CREATE TABLE t (k INTEGER, v INTEGER)")
        for k in order:
            ep.db.execute("INSERT INTO t VALUES (?, ?)", (k, value))
        return ep

    with build([1, 2, 3]) as a, build([3, 1, 2]) as b, build([1, 2, 3], value=2) as c:
        assert a.state_hash() == b.state_hash() != c.state_hash()
        a.data["cart"] = ["sku_1"]
        assert a.state_hash() != b.state_hash()
        b.data["cart"] = ["sku_1"]
        assert a.state_hash() == b.state_hash()
        (a.dir / "note.txt").write_text("hi")
        assert a.state_hash() != b.state_hash()


def test_clock_is_deterministic():
    with Episode() as a, Episode() as b:
        assert [a.now(), a.now()] == [b.now(), b.now()]
        assert (a.now() - b.now()).total_seconds() == 0


def test_in_memory_mode(seed_db: Path):
    with Episode(seed_db=seed_db, in_memory=True) as ep:
        assert ep.db.execute("SELECT count(*) FROM orders").fetchone() == (1024,)
        assert list(ep.dir.iterdir()) == []


def test_fast_copy(tmp_path: Path):
    src = tmp_path / "a.bin"
    src.write_bytes(os.urandom(300_000))
    how = fast_copy(src, tmp_path / "b.bin")
    assert how in {"reflink", "copy_file_range", "copy"}
    assert (tmp_path / "b.bin").read_bytes() == src.read_bytes()


def test_1024_concurrent_episodes_fit(seed_db: Path):
    """A full step's worth of rollouts (128 tasks x 8) open at once, each with a private DB."""
    async def rollout(i: int) -> tuple[Path, str]:
        async with Episode(f"task-{i // 8}:{i % 8}", seed_db=seed_db) as ep:
            await asyncio.sleep(0.05)  # everyone is open at the same time here
            r = await TOOLS.call("refund", f'{{"order_id": "ord_{i}", "amount": 1}}', ep)
            assert not r.is_error
            refunded = ep.db.execute("SELECT count(*) FROM orders WHERE status='refunded'").fetchone()[0]
            assert refunded == 1  # no other rollout's write is visible
            return ep.dir, ep.state_hash()

    async def main():
        return await asyncio.gather(*(rollout(i) for i in range(1024)))

    t0 = time.perf_counter()
    results = asyncio.run(main())
    elapsed = time.perf_counter() - t0
    assert len({h for _, h in results}) == 1024
    assert not any(d.exists() for d, _ in results)
    assert elapsed < 60, f"1024 episodes took {elapsed:.1f}s"
