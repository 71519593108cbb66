"""A bounded cache of what was used lately, for the hit path's per-value caches.

Two generations of plain dicts: a key is looked up in the current one, then in the
previous one (and moved forward); when the current one is full it becomes the previous
one and the oldest generation goes. So at most twice `size` entries are held whatever
clients send, and what is still in use survives a turnover. A dict cleared when full
forgets everything at once: at a campaign's cardinality (hundreds of thousands of
addresses) every turnover made each hit a miss for a while. An OrderedDict's
move_to_end and popitem cost about three times as much per hit.
"""

from __future__ import annotations

from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Recent(Generic[K, V]):
    __slots__ = ("_new", "_old", "_size")

    def __init__(self, size: int) -> None:
        self._size = size
        self._new: dict[K, V] = {}
        self._old: dict[K, V] = {}

    def get(self, key: K) -> V | None:
        value = self._new.get(key)
        if value is None:
            value = self._old.pop(key, None)
            if value is not None:
                self.put(key, value)
        return value

    def put(self, key: K, value: V) -> None:
        new = self._new
        if len(new) >= self._size:
            self._old = new
            self._new = new = {}
        new[key] = value

    def clear(self) -> None:
        self._new = {}
        self._old = {}

    def __len__(self) -> int:
        return len(self._new) + len(self._old)
