"""Name → function tables, so config strings pick algorithms and users can add their own."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

F = TypeVar("F", bound=Callable[..., object])


class UnknownNameError(KeyError, ValueError):
    """A name that no function was registered under; the message lists the valid ones."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class Registry(Generic[F]):
    """Functions of one kind, by name. Registering a taken name fails, unless `replace=True`."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._fns: dict[str, F] = {}

    def register(self, name: str, *, replace: bool = False) -> Callable[[F], F]:
        if not name or not isinstance(name, str):
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")

        def decorate(fn: F) -> F:
            if name in self._fns and not replace and self._fns[name] != fn:
                raise ValueError(f"{self.kind} {name!r} is already registered; pass replace=True to override it")
            self._fns[name] = fn
            return fn

        return decorate

    def get(self, name: str) -> F:
        try:
            return self._fns[name]
        except KeyError:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())}") from None

    def unregister(self, name: str) -> None:
        """Remove a name (for tests and plugins that clean up after themselves)."""
        self._fns.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self._fns)

    def __contains__(self, name: object) -> bool:
        return name in self._fns
