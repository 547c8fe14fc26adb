# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Metric children, compiled twin of ``_meters_py`` (which defines them).

The same slots and the same results; an update is a C store into the
values array through a typed memoryview (taken once, when the child is
made) and a histogram's bucket a C binary search over its bounds.
"""

from . import _meters_py as _reference


cdef class CounterChild:
    """One labelled counter: ``inc`` adds to its slot."""

    cdef double[::1] _values
    cdef Py_ssize_t _slot

    def __init__(self, values, Py_ssize_t slot):
        _reference._checked(values, slot, 1)
        self._values = values
        self._slot = slot

    def inc(self, double amount=1.0):
        self._values[self._slot] += amount

    def get(self):
        return self._values[self._slot]


cdef class GaugeChild(CounterChild):
    """One labelled gauge."""

    def set(self, double value):
        self._values[self._slot] = value

    def dec(self, double amount=1.0):
        self._values[self._slot] -= amount


cdef class HistogramChild:
    """One labelled histogram: ``len(bounds) + 2`` slots from ``slot``."""

    cdef double[::1] _values
    cdef double[::1] _bounds
    cdef Py_ssize_t _slot
    cdef Py_ssize_t _sum
    cdef Py_ssize_t _n

    def __init__(self, values, Py_ssize_t slot, bounds):
        from array import array

        ordered = tuple(float(b) for b in bounds)
        if list(ordered) != sorted(ordered):
            raise ValueError("histogram bounds must be sorted")
        _reference._checked(values, slot, len(ordered) + 2)
        self._bounds = array("d", ordered)
        self._n = len(ordered)
        self._values = values
        self._slot = slot
        self._sum = slot + self._n + 1

    def observe(self, double amount):
        # bisect_left: the first bound >= amount (a NaN lands in the first
        # bucket, as bisect_left puts it)
        cdef Py_ssize_t lo = 0, hi = self._n, mid
        while lo < hi:
            mid = (lo + hi) >> 1
            if self._bounds[mid] < amount:
                lo = mid + 1
            else:
                hi = mid
        self._values[self._slot + lo] += 1.0
        self._values[self._sum] += amount

    def get(self):
        """``(non-cumulative bucket counts with +Inf last, sum)``."""
        cdef Py_ssize_t i
        return [self._values[i] for i in range(self._slot, self._sum)], self._values[self._sum]
