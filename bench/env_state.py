"""Episode state at scale: 1,024 concurrent episodes over a 2 MB JSON database each.

A retail database in tau-bench's shape (users, orders, products; about 2 MB of JSON, seeded)
backs every episode. Each episode, all open at once: three sync tool calls (read an order, read
its user, cancel it: a write into nested records), each after a simulated model turn (a sleep
of 20-80 ms), then the state hash (the reward's input). Three modes, each in its own process
so that each peak RSS is its own:

- `cow`: `Episode(data=SeedData(db))` (copy-on-write), tools in the thread pool,
  `await ep.state_hash_async()`: turnwise's way;
- `inline`: the same state, with the tools and the hash run on the event loop (what a port
  without `turnwise.env.offload` does);
- `copy`: `Episode(data=db)` (a deep copy per episode, made when the episode opens, on the
  loop), tools and hash in the pool.

Reported per mode: wall time, peak RSS, and event-loop lag (how late a 5 ms heartbeat wakes:
p99 and max), which is what every other rollout on the loop waits. Every episode's final
hash is checked against a sequential replay of the same calls (no state leaked).

    .venv/bin/python bench/env_state.py [--episodes 1024] [--copy-episodes 1024] [--modes cow,copy,inline]

The last line is `cow_memory_ratio: <copy / cow>`, of the memory each episode adds (peak RSS
minus the database's, per episode), so modes run with different episode counts compare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import subprocess
import sys
import time
from typing import Any

from turnwise.env import Episode, SeedData, ToolBox, ToolError, tool

STATUSES = ("pending", "processed", "delivered", "cancelled")


def make_db(seed: int = 0, n_users: int = 1000, n_orders: int = 2000, n_products: int = 50) -> dict[str, Any]:
    """A seeded retail database in tau-bench's shape: ~2 MB of JSON at the defaults."""
    rng = random.Random(seed)
    products = {}
    for p in range(n_products):
        pid = str(rng.randrange(10**9, 10**10))
        variants = {}
        for _ in range(8):
            iid = str(rng.randrange(10**9, 10**10))
            variants[iid] = {"item_id": iid, "options": {"color": rng.choice(["red", "blue", "black"]),
                                                         "size": rng.choice(["S", "M", "L"])},
                             "available": rng.random() < 0.8, "price": round(rng.uniform(10, 500), 2)}
        products[pid] = {"name": f"Product {p}", "product_id": pid, "variants": variants}
    users = {}
    for u in range(n_users):
        uid = f"user_{u}_{rng.randrange(1000, 9999)}"
        users[uid] = {"user_id": uid, "name": {"first_name": f"First{u}", "last_name": f"Last{u}"},
                      "address": {"address1": f"{rng.randrange(1, 999)} Main Street", "address2": f"Suite {u}",
                                  "city": "Austin", "country": "USA", "state": "TX", "zip": f"{78700 + u % 99}"},
                      "email": f"{uid}@example.com",
                      "payment_methods": {f"gift_card_{u}": {"source": "gift_card", "balance": 50.0,
                                                             "id": f"gift_card_{u}"}},
                      "orders": []}
    uids = list(users)
    orders = {}
    for o in range(n_orders):
        oid = f"#W{1000000 + o}"
        uid = rng.choice(uids)
        users[uid]["orders"].append(oid)
        items = []
        for _ in range(rng.randint(1, 5)):
            product = products[rng.choice(list(products))]
            iid = rng.choice(list(product["variants"]))
            items.append({"name": product["name"], "product_id": product["product_id"], "item_id": iid,
                          "price": product["variants"][iid]["price"], "options": product["variants"][iid]["options"]})
        orders[oid] = {"order_id": oid, "user_id": uid, "address": dict(users[uid]["address"]), "items": items,
                       "fulfillments": [], "status": rng.choice(STATUSES),
                       "payment_history": [{"transaction_type": "payment", "payment_method_id": f"gift_card_{u}",
                                            "amount": round(sum(i["price"] for i in items), 2)}]}
    return {"users": users, "orders": orders, "products": products}


def make_tools(offload: bool) -> ToolBox:
    @tool(offload=offload)
    def get_order_details(order_id: str, ep: Episode) -> dict:
        """Order details."""
        if order_id not in ep.data["orders"]:
            raise ToolError("order not found")
        return ep.data["orders"][order_id]

    @tool(offload=offload)
    def get_user_details(user_id: str, ep: Episode) -> dict:
        """User details."""
        return ep.data["users"][user_id]

    @tool(offload=offload)
    def cancel_pending_order(order_id: str, reason: str, ep: Episode) -> dict:
        """Cancel an order and refund it."""
        order = ep.data["orders"][order_id]
        order["status"] = "cancelled"
        order["cancel_reason"] = reason
        order["payment_history"].append({**order["payment_history"][0], "transaction_type": "refund"})
        return order

    return ToolBox([get_order_details, get_user_details, cancel_pending_order], serialize="json")


def plan(db: dict[str, Any], i: int) -> list[tuple[str, dict[str, Any]]]:
    order_id = sorted(db["orders"])[i % len(db["orders"])]
    return [("get_order_details", {"order_id": order_id}),
            ("get_user_details", {"user_id": db["orders"][order_id]["user_id"]}),
            ("cancel_pending_order", {"order_id": order_id, "reason": "no longer needed"})]


async def run_mode(mode: str, episodes: int, db: dict[str, Any]) -> dict[str, Any]:
    box = make_tools(offload=mode != "inline")
    data: Any = db if mode == "copy" else SeedData(db)
    rng = random.Random(1)
    delays = [[rng.uniform(0.02, 0.08) for _ in range(3)] for _ in range(episodes)]
    lags: list[float] = []
    stop = asyncio.Event()

    async def heartbeat() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            await asyncio.sleep(0.005)
            lags.append(time.perf_counter() - t - 0.005)

    async def episode(i: int) -> str:
        with Episode(seed=i, data=data) as ep:
            for (name, args), delay in zip(plan(db, i), delays[i], strict=True):
                await asyncio.sleep(delay)  # the model's turn
                result = await box.call(name, args, ep)
                assert not result.is_error, result.content
            return ep.state_hash() if mode == "inline" else await ep.state_hash_async()

    beat = asyncio.create_task(heartbeat())
    start = time.perf_counter()
    hashes = await asyncio.gather(*(episode(i) for i in range(episodes)))
    wall = time.perf_counter() - start
    stop.set()
    await beat
    lags.sort()
    return {"mode": mode, "episodes": episodes, "wall_s": wall, "hashes": hashes,
            "lag_p99_ms": 1000 * lags[int(0.99 * (len(lags) - 1))], "lag_max_ms": 1000 * lags[-1],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


async def expected_hashes(db: dict[str, Any], indices: list[int]) -> dict[int, str]:
    """The same calls, one episode at a time, each on its own deep copy: the reference."""
    box = make_tools(offload=False)
    out = {}
    for i in indices:
        with Episode(seed=i, data=db) as ep:
            for name, args in plan(db, i):
                await box.call(name, args, ep)
            out[i] = ep.state_hash()
    return out


def child(mode: str, episodes: int) -> None:
    db = make_db()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = asyncio.run(run_mode(mode, episodes, db))
    result["base_rss_mb"] = base
    result["db_json_mb"] = len(json.dumps(db)) / 1e6
    check = list(range(0, episodes, max(1, episodes // 16)))
    expected = asyncio.run(expected_hashes(db, check))
    result["hashes_checked"] = len(check)
    result["hashes_ok"] = all(result["hashes"][i] == expected[i] for i in check)
    result["distinct_hashes"] = len(set(result.pop("hashes")))
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=1024)
    parser.add_argument("--copy-episodes", type=int, default=128,
                        help="episodes in the copy mode (a deep copy each: 1,024 of them need ~7 GB)")
    parser.add_argument("--modes", default="cow,inline,copy")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.episodes)
        return
    results = {}
    for mode in args.modes.split(","):
        n = args.copy_episodes if mode == "copy" else args.episodes
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--episodes", str(n)],
                             capture_output=True, text=True, env=os.environ, check=False)
        if out.returncode != 0:
            sys.exit(f"mode {mode} failed:\n{out.stderr[-2000:]}")
        r = results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{mode:6}  {r['episodes']:5} episodes over {r['db_json_mb']:.2f} MB of JSON each   "
              f"wall {r['wall_s']:6.2f} s   peak RSS {r['peak_rss_mb']:7.0f} MB (db alone {r['base_rss_mb']:.0f} MB)   "
              f"loop lag p99 {r['lag_p99_ms']:7.1f} ms  max {r['lag_max_ms']:7.1f} ms   "
              f"hashes ok {r['hashes_ok']} ({r['hashes_checked']} replayed), {r['distinct_hashes']} distinct")
    if "cow" in results and "copy" in results:
        per = {m: (results[m]["peak_rss_mb"] - results[m]["base_rss_mb"]) / results[m]["episodes"] for m in ("cow", "copy")}
        print(f"memory per episode: cow {per['cow']:.2f} MB, copy {per['copy']:.2f} MB")
        print(f"cow_memory_ratio: {per['copy'] / per['cow']:.1f}")


if __name__ == "__main__":
    main()
