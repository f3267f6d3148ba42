"""JSON/dict episode state: `Episode(data=...)` gives every episode its own copy of a seed.

The footgun this guards against: `ep.data.update(seed)` is a shallow copy, so concurrent
episodes write into the same nested records and each other's state (every one wrong).
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import pickle

import pytest

from turnwise.env import Episode, SeedData, ToolBox, tool
from turnwise.types import json_dumps_canonical

SEED = {
    "orders": {f"#W{i}": {"order_id": f"#W{i}", "status": "pending", "items": [{"price": 10.0 + i}],
                          "payment_history": []} for i in range(40)},
    "users": {"u1": {"name": "Ann", "orders": ["#W0"]}},
    "log": [],
    "version": 1,
}
PRISTINE = json.dumps(SEED, sort_keys=True)


@tool
def cancel(order_id: str, ep: Episode) -> dict:
    """Cancel an order (a sync tool: it runs in the thread pool, concurrently with the others)."""
    order = ep.data["orders"][order_id]
    order["status"] = "cancelled"
    order["payment_history"].append({"type": "refund", "amount": order["items"][0]["price"], "by": ep.seed})
    ep.data["log"].append(order_id)
    return order


def full_hash(ep: Episode) -> str:
    return hashlib.sha256(json_dumps_canonical(ep.state_snapshot()).encode()).hexdigest()


@pytest.mark.parametrize("make_seed", [lambda: SEED, lambda: SeedData(SEED)], ids=["mapping", "seed_data"])
def test_32_concurrent_episodes_do_not_share_state(make_seed):
    seed = make_seed()
    box = ToolBox([cancel])
    n = 48

    async def one(i: int) -> tuple[dict, str]:
        with Episode(seed=f"ep{i}", data=seed) as ep:
            for order_id in (f"#W{i % 40}", f"#W{(i * 7 + 1) % 40}"):
                await asyncio.sleep(0)  # interleave the episodes
                result = await box.call("cancel", {"order_id": order_id}, ep)
                assert not result.is_error, result.content
            return ep.state_snapshot()["data"], await ep.state_hash_async()

    async def main():
        return await asyncio.gather(*(one(i) for i in range(n)))

    results = asyncio.run(main())
    for i, (data, _) in enumerate(results):
        mine = {f"#W{i % 40}", f"#W{(i * 7 + 1) % 40}"}
        cancelled = {k for k, o in data["orders"].items() if o["status"] == "cancelled"}
        assert cancelled == mine, f"episode {i} sees {sorted(cancelled - mine)} cancelled by others"
        assert data["log"] == [f"#W{i % 40}", f"#W{(i * 7 + 1) % 40}"]
        assert all(p["by"] == f"ep{i}" for o in data["orders"].values() for p in o["payment_history"])
    assert len({h for _, h in results}) == n
    assert json.dumps(SEED, sort_keys=True) == PRISTINE  # the seed never changed


def test_the_shallow_update_of_todays_main_leaks_and_data_does_not():
    leaky = [Episode(seed=i) for i in range(2)]
    for ep in leaky:
        ep.data.update(SEED)
    leaky[0].data["orders"]["#W1"]["status"] = "lost"  # what a user did before data= existed
    assert leaky[1].data["orders"]["#W1"]["status"] == "lost"
    SEED["orders"]["#W1"]["status"] = "pending"
    for ep in leaky:
        ep.close()
    with Episode(data=SeedData(SEED)) as a, Episode(data=SeedData(SEED)) as b:
        a.data["orders"]["#W1"]["status"] = "lost"
        assert b.data["orders"]["#W1"]["status"] == "pending"


def test_copy_on_write_hash_is_the_hash_of_the_whole_snapshot():
    seed = SeedData(SEED)
    with Episode(data=seed) as cow, Episode(data=SEED) as plain:
        assert cow.state_hash() == plain.state_hash() == full_hash(cow)
        for ep in (cow, plain):
            ep.data["orders"]["#W3"]["status"] = "cancelled"
            ep.data["orders"]["#W99"] = {"order_id": "#W99", "status": "new"}
            del ep.data["orders"]["#W5"]
            ep.data["users"]["u1"]["orders"].append("#W99")
            ep.data["version"] = 2
            ep.data["extra"] = {"k": [1, 2.5, None]}
        assert cow.state_hash() == plain.state_hash() == full_hash(cow) == full_hash(plain)
        assert cow.state_snapshot() == plain.state_snapshot()
    with Episode(data=seed) as again:
        assert again.data["orders"]["#W3"]["status"] == "pending" and "#W5" in again.data["orders"]


ESCAPES = {
    "getitem": lambda r: r["#W2"],
    "get": lambda r: r.get("#W2"),
    "values": lambda r: next(o for o in r.values() if o["order_id"] == "#W2"),
    "items": lambda r: dict(r.items())["#W2"],
    "setdefault": lambda r: r.setdefault("#W2", {}),
    "pop": lambda r: r.pop("#W2"),
    "copy": lambda r: r.copy()["#W2"],
    "or": lambda r: (r | {})["#W2"],
    "dict": lambda r: dict(r)["#W2"],
    "unpack": lambda r: {**r}["#W2"],
    "copy.copy": lambda r: copy.copy(r)["#W2"],
    "deepcopy": lambda r: copy.deepcopy(r)["#W2"],
    "pickle": lambda r: pickle.loads(pickle.dumps(r))["#W2"],
}


@pytest.mark.parametrize("route", sorted(ESCAPES))
def test_no_way_of_reading_a_record_hands_out_the_shared_one(route):
    seed = SeedData(SEED)
    with Episode(data=seed) as a, Episode(data=seed) as b:
        record = ESCAPES[route](a.data["orders"])
        record["status"] = "mutated"
        record.setdefault("items", []).append({"price": 0})
        assert b.data["orders"]["#W2"]["status"] == "pending"
        assert seed.value["orders"]["#W2"] == SEED["orders"]["#W2"]
        assert json.loads(json.dumps(b.data["orders"]))["#W2"] == SEED["orders"]["#W2"]


def test_json_dumps_and_len_see_the_whole_collection():
    with Episode(data=SeedData(SEED)) as ep:
        orders = ep.data["orders"]
        assert len(orders) == 40 and "#W39" in orders and isinstance(orders, dict)
        assert json.loads(json.dumps(ep.data)) == SEED
        assert ep.state_snapshot()["data"] == SEED


def test_bad_data_is_a_clear_error():
    with pytest.raises(TypeError, match="Episode data must be a mapping or a SeedData, got list"):
        Episode(data=[1, 2])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="SeedData needs a mapping"):
        SeedData([1])  # type: ignore[arg-type]
