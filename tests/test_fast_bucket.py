"""Token bucket and bucket table, for both twins."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import relay._fast as fast

# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("burst", [0, 0.5, -1, math.nan, math.inf, 2.0**53 + 2])
def test_burst_below_one_or_not_finite_is_refused(impl: fast.Implementation, burst: float) -> None:
    with pytest.raises(ValueError, match="burst"):
        impl.TokenBucket(1.0, burst)
    with pytest.raises(ValueError, match="burst"):
        impl.BucketTable(1.0, burst)


@pytest.mark.parametrize("rate", [-0.1, math.nan, math.inf, -math.inf])
def test_negative_or_not_finite_rate_is_refused(impl: fast.Implementation, rate: float) -> None:
    with pytest.raises(ValueError, match="rate"):
        impl.TokenBucket(rate, 1)
    with pytest.raises(ValueError, match="rate"):
        impl.BucketTable(rate, 1)


@pytest.mark.parametrize("max_keys", [0, -5])
def test_table_needs_room_for_a_key(impl: fast.Implementation, max_keys: int) -> None:
    with pytest.raises(ValueError, match="max_keys"):
        impl.BucketTable(1.0, 1, max_keys)


# ------------------------------------------------------------------ behaviour


def test_starts_full_and_drains(impl: fast.Implementation) -> None:
    bucket = impl.TokenBucket(2.0, 3)
    assert bucket.remaining(100.0) == 3
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.remaining(100.0) == 0
    assert bucket.retry_after(100.0) == pytest.approx(0.5)


def test_refills_at_rate_and_never_above_burst(impl: fast.Implementation) -> None:
    bucket = impl.TokenBucket(4.0, 2)
    assert bucket.take(0.0) and bucket.take(0.0) and not bucket.take(0.0)
    assert not bucket.take(0.2)  # 0.8 tokens
    assert bucket.remaining(0.2) == 0
    assert bucket.retry_after(0.2) == pytest.approx(0.05)
    assert bucket.take(0.25)  # 1.0 token
    assert bucket.remaining(1000.0) == 2  # capped at burst
    assert bucket.take(1000.0) and bucket.take(1000.0) and not bucket.take(1000.0)


def test_fractional_burst(impl: fast.Implementation) -> None:
    bucket = impl.TokenBucket(1.0, 1.5)
    assert bucket.remaining(0.0) == 1
    assert bucket.take(0.0)
    assert not bucket.take(0.0)
    assert bucket.retry_after(0.0) == pytest.approx(0.5)


def test_time_going_backwards_adds_nothing(impl: fast.Implementation) -> None:
    bucket = impl.TokenBucket(1.0, 2)
    assert bucket.take(10.0) and bucket.take(10.0)
    assert not bucket.take(5.0)
    assert bucket.remaining(5.0) == 0
    assert bucket.remaining(10.0) == 0  # back at the latest time: still nothing
    assert not bucket.take(10.5)
    assert bucket.take(11.0)


def test_nan_time_adds_nothing(impl: fast.Implementation) -> None:
    bucket = impl.TokenBucket(1.0, 1)
    assert bucket.take(1.0)
    assert not bucket.take(math.nan)
    assert bucket.take(2.0)


def test_rate_zero_never_refills(impl: fast.Implementation) -> None:
    bucket = impl.TokenBucket(0.0, 2)
    assert bucket.take(0.0) and bucket.take(0.0)
    assert not bucket.take(1e9)
    assert bucket.remaining(1e9) == 0
    assert bucket.retry_after(1e9) == math.inf


def test_retry_after_is_zero_with_a_token(impl: fast.Implementation) -> None:
    bucket = impl.TokenBucket(1.0, 5)
    assert bucket.retry_after(0.0) == 0.0
    assert isinstance(bucket.retry_after(0.0), float)
    assert isinstance(bucket.remaining(0.0), int)


def test_properties(impl: fast.Implementation) -> None:
    bucket = impl.TokenBucket(2, 3)
    assert (bucket.rate, bucket.burst) == (2.0, 3.0)
    table = impl.BucketTable(2, 3, 7)
    assert (table.rate, table.burst, table.max_keys) == (2.0, 3.0, 7)


def test_table_acquire_reports_the_decision(impl: fast.Implementation) -> None:
    table = impl.BucketTable(1.0, 2)
    assert table.acquire(b"k", 0.0) == (True, 1, 0.0)
    allowed, remaining, retry_after = table.acquire(b"k", 0.0)
    assert (allowed, remaining) == (True, 0)
    assert retry_after == pytest.approx(1.0)
    allowed, remaining, retry_after = table.acquire(b"k", 0.25)
    assert (allowed, remaining) == (False, 0)
    assert retry_after == pytest.approx(0.75)
    assert type(allowed) is bool and type(remaining) is int and type(retry_after) is float


def test_table_keys_are_independent(impl: fast.Implementation) -> None:
    table = impl.BucketTable(1.0, 1)
    assert table.acquire(b"a", 0.0)[0]
    assert not table.acquire(b"a", 0.0)[0]
    assert table.acquire(b"b", 0.0)[0]
    assert len(table) == 2


def test_table_evicts_least_recently_used(impl: fast.Implementation) -> None:
    table = impl.BucketTable(1.0, 1, max_keys=2)
    table.acquire(b"a", 0.0)
    table.acquire(b"b", 0.0)
    table.acquire(b"a", 0.0)  # a is now the most recent
    table.acquire(b"c", 0.0)  # evicts b
    assert len(table) == 2
    assert b"a" in table and b"c" in table and b"b" not in table
    assert not table.acquire(b"a", 0.0)[0]  # a kept its (empty) bucket


def test_evicted_full_bucket_loses_nothing(impl: fast.Implementation) -> None:
    table = impl.BucketTable(1.0, 3, max_keys=1)
    table.acquire(b"a", 0.0)
    table.acquire(b"b", 100.0)  # a, long since full again, is evicted
    assert table.acquire(b"a", 100.0) == (True, 2, 0.0)  # same as a full bucket


# ----------------------------------------------------------------- properties

events = st.lists(
    st.tuples(
        st.floats(min_value=-2.0, max_value=5.0, allow_nan=False),  # time step, may go back
        st.integers(min_value=0, max_value=5),  # takes at that time
    ),
    max_size=40,
)
rates = st.floats(min_value=0.0, max_value=1000.0, allow_nan=False)
bursts = st.floats(min_value=1.0, max_value=100.0)


@settings(max_examples=300, deadline=None)
@given(rate=rates, burst=bursts, start=st.floats(-1e6, 1e6), steps=events)
def test_grants_never_exceed_burst_plus_refill(
    impl: fast.Implementation, rate: float, burst: float, start: float, steps: list
) -> None:
    bucket = impl.TokenBucket(rate, burst)
    now = start
    first = latest = None  # the bucket starts full at the first time it sees
    granted = 0
    for step, takes in steps:
        now += step
        if first is None:
            first = latest = now
        latest = max(latest, now)
        for _ in range(takes):
            granted += bucket.take(now)
        # Time only counts from the first reading to the latest one seen.
        assert granted <= burst + rate * (latest - first) + 1e-6 * (1 + granted)
        assert 0 <= bucket.remaining(now) <= burst
        retry = bucket.retry_after(now)
        assert retry >= 0.0
        if bucket.remaining(now) >= 1:
            assert retry == 0.0


@settings(max_examples=200, deadline=None)
@given(rate=rates, burst=bursts, steps=events, keys=st.lists(st.binary(max_size=2), max_size=40))
def test_twins_decide_alike(
    both: tuple[fast.Implementation, fast.Implementation],
    rate: float,
    burst: float,
    steps: list,
    keys: list,
) -> None:
    pure, compiled = both
    tables = [impl.BucketTable(rate, burst, max_keys=3) for impl in (pure, compiled)]
    buckets = [impl.TokenBucket(rate, burst) for impl in (pure, compiled)]
    now = 0.0
    for index, (step, takes) in enumerate(steps):
        now += step
        key = keys[index % len(keys)] if keys else b""
        for _ in range(takes):
            first, second = (table.acquire(key, now) for table in tables)
            assert first == second
            assert buckets[0].take(now) == buckets[1].take(now)
        assert buckets[0].remaining(now) == buckets[1].remaining(now)
        assert buckets[0].retry_after(now) == buckets[1].retry_after(now)
        assert len(tables[0]) == len(tables[1]) <= 3
