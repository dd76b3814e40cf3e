"""Named choices that users extend: decomposition methods, sampler model steps, objectives.

A registry maps the name a study file uses to a class. Adding a choice is one class in one file plus
`@REGISTRY.register("name")`; the study file, `bolaco config` and the error messages read the names from here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from .errors import BolacoError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, what: str):
        self.what = what
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.what} '{name}' is registered twice")
            self._items[name] = item
            return item
        return add

    def get(self, name: str, key: str = "") -> T:
        if name not in self._items:
            where = f"{key}: " if key else ""
            raise BolacoError(f"{where}unknown {self.what} '{name}'; choose from {', '.join(self._items)}")
        return self._items[name]

    def names(self) -> tuple[str, ...]:
        return tuple(self._items)

    def items(self):
        return self._items.items()

    def __contains__(self, name: object) -> bool:
        return name in self._items
