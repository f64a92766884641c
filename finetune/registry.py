"""Explicit name -> object registries: duplicates raise, unknown names list the valid ones."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from finetune.errors import RecipeError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named table of ``T``; ``key`` is the recipe key that selects from it (used in errors)."""

    def __init__(self, kind: str, key: str) -> None:
        self.kind = kind
        self.key = key
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(item: T) -> T:
            if name in self._items:
                raise KeyError(f"{self.kind} {name!r} is already registered")
            self._items[name] = item
            return item

        return add

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise RecipeError(
                self.key, f"unknown {self.kind} {name!r}; choose one of: {', '.join(self)}"
            ) from None

    def name_of(self, item: T) -> str:
        """The name ``item`` is registered under (reverse lookup)."""
        return next(name for name, known in self._items.items() if known is item)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
