"""JSON/dict episode state: a seed shared by every episode, copied per episode, never leaked.

`Episode(data=seed)` gives each episode its own `ep.data`. A plain mapping is deep-copied
(containers copied, immutable leaves shared). A `SeedData` is shared copy-on-write, for large
states and many concurrent episodes (a 2 MB benchmark database times a thousand rollouts):

- `ep.data` is a plain dict of the seed's top-level keys. A top-level dict of records
  (`data["orders"]`, `data["users"]`) is a `Records`: a dict subclass that holds the seed's
  record objects and hands out a private deep copy of a record the first time it is read
  (`[]`, `get`, iteration over `values()` / `items()`, `pop`, `setdefault`, `copy()`, `|`,
  `dict(...)`, `json.dumps`, pickling), so code that mutates what it read mutates its own
  copy. Other top-level values are deep-copied at once.
- Cost per episode: one shallow dict copy per collection plus the records it touches, not a
  copy of the database.
- `state_hash()` stays the SHA-256 of canonical JSON, byte for byte what the whole dict would
  give; the canonical text of every record not touched is computed once per seed and reused.

The seed itself is deep-copied once, when `SeedData` is built, so later edits of the object
it was built from do not reach episodes. Keys of a collection must be strings (JSON objects'
keys are); a collection with other keys is deep-copied instead.
"""

from __future__ import annotations

import threading
from collections.abc import ItemsView, Iterator, Mapping, ValuesView
from typing import Any

import pydantic_core

from turnwise.types import json_dumps_canonical


def copy_json(value: Any) -> Any:
    """A deep copy of JSON-like data: dicts and lists copied, everything else shared (strings,
    numbers, None are immutable; other objects are copied with `copy.deepcopy`)."""
    t = type(value)
    if t is dict or isinstance(value, Records):
        return {k: copy_json(v) for k, v in value.items()}
    if t is list or t is tuple:
        return [copy_json(v) for v in value]
    if t in (str, int, float, bool) or value is None:
        return value
    import copy
    return copy.deepcopy(value)


def canonical(value: Any) -> str:
    """Canonical JSON of any JSON-able value (what the state hash covers)."""
    return json_dumps_canonical(pydantic_core.to_jsonable_python(value))


class SeedData:
    """A JSON state shared copy-on-write by every episode made from it (module docstring)."""

    def __init__(self, value: Mapping[str, Any]):
        if not isinstance(value, Mapping):
            raise TypeError(f"SeedData needs a mapping (a JSON object), got {type(value).__name__}")
        self.value: dict[str, Any] = copy_json(dict(value))
        """The seed (a private copy; do not mutate)."""
        self._fragments: dict[str, dict[str, str]] = {}
        self._lock = threading.Lock()

    def fresh(self) -> dict[str, Any]:
        """A new episode's `data`: collections copy-on-write, the rest deep-copied."""
        return {k: Records(self, k) if _is_collection(v) else copy_json(v) for k, v in self.value.items()}

    def fragments(self, collection: str) -> Mapping[str, str]:
        """`"key":<canonical JSON of the seed record>` per record of a collection, computed once
        per seed, by the first episode that needs them (the others wait, off the event loop)."""
        table = self._fragments.get(collection)
        if table is None:
            with self._lock:
                table = self._fragments.get(collection)
                if table is None:
                    table = {k: f"{json_dumps_canonical(k)}:{canonical(v)}"
                             for k, v in self.value[collection].items()}
                    self._fragments[collection] = table
        return table


def _is_collection(value: Any) -> bool:
    return type(value) is dict and all(type(k) is str for k in value)


class Records(dict):  # type: ignore[type-arg]
    """One collection of an episode's data, copy-on-write over its `SeedData` (module docstring).

    The dict's own storage holds, per key, the seed's record until the record is first read,
    then the episode's private copy; `_private` names the keys whose value is the episode's.
    Every way a value can leave the dict goes through `__getitem__`, which makes the copy.
    """

    __slots__ = ("_seed", "_name", "_private")

    def __init__(self, seed: SeedData, name: str):
        super().__init__(seed.value[name])
        self._seed = seed
        self._name = name
        self._private: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        value = dict.__getitem__(self, key)
        if key not in self._private:
            value = copy_json(value)
            dict.__setitem__(self, key, value)
            self._private.add(key)
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        dict.__setitem__(self, key, value)
        self._private.add(key)

    def __delitem__(self, key: str) -> None:
        dict.__delitem__(self, key)
        self._private.discard(key)

    def __iter__(self) -> Iterator[str]:  # overriding it also routes dict(x) and {**x} through __getitem__
        return dict.__iter__(self)

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if dict.__contains__(self, key) else default

    def setdefault(self, key: str, default: Any = None) -> Any:
        if not dict.__contains__(self, key):
            self[key] = default
        return self[key]

    def pop(self, key: str, *default: Any) -> Any:
        if not dict.__contains__(self, key):
            return dict.pop(self, key, *default)
        value = self[key]
        del self[key]
        return value

    def popitem(self) -> tuple[str, Any]:
        key = next(reversed(dict.keys(self)))
        return key, self.pop(key)

    def update(self, *args: Any, **kwargs: Any) -> None:
        for k, v in dict(*args, **kwargs).items():
            self[k] = v

    def values(self) -> ValuesView[Any]:  # type: ignore[override]
        return ValuesView(self)

    def items(self) -> ItemsView[str, Any]:  # type: ignore[override]
        return ItemsView(self)

    def copy(self) -> dict[str, Any]:  # type: ignore[override]
        return {k: self[k] for k in dict.__iter__(self)}

    def __or__(self, other: Any) -> dict[str, Any]:  # type: ignore[override]
        return {**self.copy(), **other}

    def __ror__(self, other: Any) -> dict[str, Any]:  # type: ignore[override]
        return {**other, **self.copy()}

    def __ior__(self, other: Any) -> Records:  # type: ignore[override,misc]
        self.update(other)
        return self

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        """Pickling and `copy.deepcopy` give a plain dict of private copies."""
        return dict, (self.copy(),)

    def __copy__(self) -> dict[str, Any]:
        return self.copy()

    def canonical(self) -> str:
        """Canonical JSON of this collection, reusing the seed's text for records not touched."""
        seed = self._seed.fragments(self._name)
        parts = [f"{json_dumps_canonical(key)}:{canonical(dict.__getitem__(self, key))}" if key in self._private
                 else seed[key] for key in sorted(dict.__iter__(self))]
        return "{" + ",".join(parts) + "}"


def data_canonical(data: Mapping[str, Any]) -> str:
    """Canonical JSON of an episode's `data` (byte for byte `canonical(data)`), fast for `Records`."""
    if not any(isinstance(v, Records) for v in data.values()) or not all(type(k) is str for k in data):
        return canonical(data)
    parts = [f"{json_dumps_canonical(k)}:{data[k].canonical() if isinstance(data[k], Records) else canonical(data[k])}"
             for k in sorted(data)]
    return "{" + ",".join(parts) + "}"
