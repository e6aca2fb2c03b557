"""Registries of named parts the core looks up and other packages implement (pure logic).

The core names what it needs (a defense, a loss kind, a schedule's strategy) and finds it here;
``privacy/``, ``clients/`` and user code register implementations. The built-in ones live in
packages above the core, so a registry imports their module by name the first time it is read
(``builtins``): the core never imports them itself, and a plan naming a built-in validates
without anyone importing its package first::

    STRATEGIES = Registry("schedule", builtins="splitlearn.clients.strategies")
    STRATEGIES.register("largest_two", LargestTwo())   # from a test file or a user's module
    STRATEGIES.get("largest_two")

The core imports the built-ins' modules by name here, and nowhere else: the one exception to
"a layer never imports a layer above it", made so that a plan can be validated anywhere.
"""

from __future__ import annotations

import importlib
import threading
from typing import TYPE_CHECKING, Generic, Iterator, TypeVar

if TYPE_CHECKING:
    from .defense import Defense

__all__ = ["Registry", "DEFENSES"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> implementation, in registration order; ``builtins`` are loaded on first read."""

    def __init__(self, what: str, builtins: tuple[str, ...] | str = ()):
        self.what = what
        self._builtins = (builtins,) if isinstance(builtins, str) else tuple(builtins)
        self._items: dict[str, T] = {}
        self._loaded = not self._builtins
        self._loading = False
        self._lock = threading.RLock()  # another thread's first read waits until the built-ins are in
        self._changes = 0  # registrations and removals so far (what a reader caching a lookup compares)

    def _load(self) -> None:
        if self._loaded:
            return
        with self._lock:
            if self._loaded or self._loading:  # loading: the built-ins' module registering, in this thread
                return
            self._loading = True
            try:
                for module in self._builtins:
                    importlib.import_module(module)
                self._loaded = True  # only once they are in: a failed import is raised again at the next read
            finally:
                self._loading = False

    def register(self, name: str, item: T, *, replace: bool = False) -> T:
        """Add ``item`` under ``name``; plans validated afterwards may name it. A name already taken
        (a built-in too) is refused unless ``replace``: nothing changes meaning silently."""
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"a {self.what} name must be an identifier, got {name!r}")
        self._load()  # the built-ins first, so that a user's part never hides behind one
        if name in self._items and not replace and self._items[name] is not item:
            raise ValueError(f"a {self.what} named {name!r} is registered already; pass replace=True to replace it")
        self._items[name] = item
        self._changes += 1
        return item

    def get(self, name: str) -> T:
        """The implementation named ``name``; a ValueError naming the registered ones otherwise."""
        self._load()
        if name not in self._items:
            raise ValueError(f"unknown {self.what} {name!r}; registered: {sorted(self._items)}")
        return self._items[name]

    def unregister(self, name: str) -> T:
        """Take ``name`` out again (a test's own part, once it is done); KeyError if it is not there."""
        self._load()
        item = self._items.pop(name)
        self._changes += 1
        return item

    @property
    def version(self) -> int:
        """Changes so far, built-ins loaded: equal between two reads, a lookup over the registry gives the same."""
        self._load()
        return self._changes

    def names(self) -> list[str]:
        self._load()
        return list(self._items)

    def items(self) -> list[tuple[str, T]]:
        self._load()
        return list(self._items.items())

    def values(self) -> list[T]:
        self._load()
        return list(self._items.values())

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())


# the defenses a wire may name (the protocol: core/defense.py), here so that the plan's entries can
# check keys without importing the protocol; built-ins first, in registration order
DEFENSES: Registry[Defense] = Registry("defense", builtins="splitlearn.privacy.defenses")
