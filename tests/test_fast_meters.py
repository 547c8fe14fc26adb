"""Metric children, compiled and pure twins: the same slots, the same sums."""

from __future__ import annotations

import math
import mmap
from bisect import bisect_left

import pytest

import relay._fast as fast
from tests.support import compiled_or_skip

BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 60.0)
OBSERVED = (0.0, 0.0005, 0.00050001, 0.003, 0.3, 1.0, 59.9, 60.0, 60.5, 1e9, -1.0, math.inf)


@pytest.fixture(params=["pure", "compiled"])
def fast_impl(request: pytest.FixtureRequest) -> fast.Implementation:
    return fast.pure if request.param == "pure" else compiled_or_skip()


def values(slots: int = 64) -> memoryview:
    return memoryview(bytearray(slots * 8)).cast("d")


def test_counter_adds_to_its_slot_only(fast_impl: fast.Implementation) -> None:
    v = values()
    counter = fast_impl.CounterChild(v, 3)
    counter.inc()
    counter.inc(2.5)
    counter.inc(7)  # an int, as token counts are
    assert counter.get() == 10.5
    assert [i for i, x in enumerate(v) if x] == [3]


def test_gauge_set_inc_dec(fast_impl: fast.Implementation) -> None:
    v = values()
    gauge = fast_impl.GaugeChild(v, 0)
    gauge.set(2)
    gauge.dec()
    gauge.inc(0.5)
    assert v[0] == 1.5 and gauge.get() == 1.5


def test_histogram_buckets_as_bisect_left(fast_impl: fast.Implementation) -> None:
    v = values()
    hist = fast_impl.HistogramChild(v, 5, BOUNDS)
    expected = [0.0] * (len(BOUNDS) + 1)
    for x in OBSERVED:
        hist.observe(x)
        expected[bisect_left(BOUNDS, x)] += 1
    counts, total = hist.get()
    assert counts == expected
    assert total == sum(OBSERVED)
    assert list(v[5 : 5 + len(BOUNDS) + 1]) == expected and v[5 + len(BOUNDS) + 1] == total
    assert not any(v[:5]) and not any(v[5 + len(BOUNDS) + 2 :])  # its own slots only


def test_twins_agree_on_random_values() -> None:
    import random

    compiled_impl = compiled_or_skip()
    rng = random.Random(7)
    a, b = values(), values()
    pure = fast.pure.HistogramChild(a, 0, BOUNDS)
    compiled = compiled_impl.HistogramChild(b, 0, BOUNDS)
    for _ in range(2000):
        x = rng.choice((rng.random() * 2, rng.choice(BOUNDS), rng.random() * 100))
        pure.observe(x)
        compiled.observe(x)
    assert list(a) == list(b)


def test_children_write_through_an_mmap(fast_impl: fast.Implementation) -> None:
    with mmap.mmap(-1, 64 * 8) as backing:
        view = memoryview(backing).cast("d")
        fast_impl.CounterChild(view, 63).inc(4)
        reader = memoryview(backing).cast("d")
        assert reader[63] == 4.0
        view.release()
        reader.release()


@pytest.mark.parametrize(
    ("buffer", "slot", "error"),
    [
        (values(4), 4, IndexError),
        (values(4), -1, (IndexError, OverflowError)),
        (memoryview(bytearray(32)), 0, ValueError),  # bytes, not doubles
        (memoryview(bytes(32)).cast("d"), 0, (ValueError, TypeError)),  # read-only
    ],
)
def test_bad_values_or_slot_refused(fast_impl: fast.Implementation, buffer, slot, error) -> None:
    with pytest.raises(error):
        fast_impl.CounterChild(buffer, slot)


def test_histogram_past_the_end_refused(fast_impl: fast.Implementation) -> None:
    with pytest.raises(IndexError):
        fast_impl.HistogramChild(values(8), 0, BOUNDS)  # needs len(BOUNDS) + 2 slots
    with pytest.raises(ValueError):
        fast_impl.HistogramChild(values(), 0, (1.0, 0.5))
