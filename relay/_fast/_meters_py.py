"""Metric children: one slot (or a histogram's run of slots) of a values array.

The pure twin of ``_meters_c``. ``values`` is a writable buffer of doubles
(a ``memoryview`` cast to ``'d'``, over an mmap of a worker's file or an
anonymous one); a child keeps it and its first slot, so an update is an
index into the array: no lock (one event loop writes it), no lookup.

A histogram's slots are its buckets in bound order, then ``+Inf``, then
the sum; buckets are stored non-cumulative (one add per observation) and
made cumulative at scrape time. The bucket is the first bound ``>=`` the
value (``le`` is inclusive), found by bisection.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from typing import Any

__all__ = ["CounterChild", "GaugeChild", "HistogramChild"]


def _checked(values: Any, slot: int, width: int) -> Any:
    view = memoryview(values)
    if view.format != "d" or view.readonly or view.ndim != 1:
        raise ValueError("values must be a writable one-dimensional buffer of doubles")
    if slot < 0 or slot + width > len(view):
        raise IndexError(f"slots {slot}..{slot + width - 1} outside the values array")
    return view


class CounterChild:
    """One labelled counter: ``inc`` adds to its slot."""

    __slots__ = ("_values", "_slot")

    def __init__(self, values: Any, slot: int) -> None:
        self._values = _checked(values, slot, 1)
        self._slot = slot

    def inc(self, amount: float = 1.0) -> None:
        self._values[self._slot] += amount

    def get(self) -> float:
        return float(self._values[self._slot])


class GaugeChild(CounterChild):
    """One labelled gauge."""

    __slots__ = ()

    def set(self, value: float) -> None:
        self._values[self._slot] = value

    def dec(self, amount: float = 1.0) -> None:
        self._values[self._slot] -= amount


class HistogramChild:
    """One labelled histogram: ``len(bounds) + 2`` slots from ``slot``."""

    __slots__ = ("_values", "_slot", "_bounds", "_sum")

    def __init__(self, values: Any, slot: int, bounds: Sequence[float]) -> None:
        self._bounds = tuple(float(b) for b in bounds)
        if list(self._bounds) != sorted(self._bounds):
            raise ValueError("histogram bounds must be sorted")
        self._values = _checked(values, slot, len(self._bounds) + 2)
        self._slot = slot
        self._sum = slot + len(self._bounds) + 1

    def observe(self, amount: float) -> None:
        values = self._values
        values[self._slot + bisect_left(self._bounds, amount)] += 1.0
        values[self._sum] += amount

    def get(self) -> tuple[list[float], float]:
        """``(non-cumulative bucket counts with +Inf last, sum)``."""
        end = self._sum
        return [float(v) for v in self._values[self._slot : end]], float(self._values[end])
