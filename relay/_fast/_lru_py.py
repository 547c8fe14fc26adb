"""The memory cache's table: keys of up to 32 bytes in least-recently-used order.

This is the reference twin: an ``OrderedDict``. The compiled twin
(``_lru_c.pyx``) keeps the same behaviour in one C array of fixed-size slots
(the key inline, the value, the order links) and an index of 32-bit slot
numbers: per entry about 62 bytes instead of the ~155 a dict slot, a
linked-order node and a key object cost, which is most of what a cache
full of small responses holds besides the responses themselves.

Keys are the 32-byte digests of ``cache_key`` (shorter ones are accepted);
a longer key is refused with ValueError, and never found. The table holds at
most *capacity* entries: storing one more is an OverflowError, so the owner
evicts first (``pop_oldest``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

__all__ = ["MAX_KEY", "LruTable"]

MAX_KEY = 32  # bytes of a key kept inline


class LruTable:
    """*capacity* entries at most, ordered from least to most recently used."""

    __slots__ = ("_data", "_capacity")

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError("capacity must not be negative")
        self._capacity = capacity
        self._data: OrderedDict[bytes, Any] = OrderedDict()

    @property
    def capacity(self) -> int:
        return self._capacity

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: bytes) -> Any:
        """The value of *key*, now the most recently used; None if absent."""
        data = self._data
        value = data.get(key)
        if value is not None:
            data.move_to_end(key)
        return value

    def put(self, key: bytes, value: Any) -> None:
        """Store *value* (never None) under *key* as the most recently used."""
        if len(key) > MAX_KEY:
            raise ValueError(f"a key is at most {MAX_KEY} bytes")
        if value is None:
            raise ValueError("None is not a value")
        data = self._data
        if key in data:
            data[key] = value
            data.move_to_end(key)
            return
        if len(data) >= self._capacity:
            raise OverflowError("the table is full")
        data[bytes(key)] = value

    def pop(self, key: bytes) -> Any:
        """Remove *key*; its value, or None if it was absent."""
        return self._data.pop(key, None)

    def pop_oldest(self) -> tuple[bytes, Any]:
        """Remove and return the least recently used (key, value); KeyError if empty."""
        if not self._data:
            raise KeyError("the table is empty")
        return self._data.popitem(last=False)

    def values(self) -> list[Any]:
        """The values, least recently used first."""
        return list(self._data.values())

    def clear(self) -> None:
        self._data.clear()
