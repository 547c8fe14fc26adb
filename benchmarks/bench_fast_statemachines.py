"""Token buckets and the circuit breaker: compiled vs pure, per call."""

from __future__ import annotations

import itertools

import pytest

import relay._fast as fast


@pytest.mark.benchmark(group="BucketTable.acquire, hot key")
def test_bucket_acquire(benchmark, fast_impl: fast.Implementation) -> None:
    table = fast_impl.BucketTable(1.0, 1e15)  # never runs dry: the allowed path
    allowed, _, _ = benchmark(table.acquire, b"key:0123456789abcdef", 1.0)
    assert allowed


@pytest.mark.benchmark(group="BucketTable.acquire, denied")
def test_bucket_acquire_denied(benchmark, fast_impl: fast.Implementation) -> None:
    table = fast_impl.BucketTable(0.0, 1)
    table.acquire(b"key", 1.0)
    allowed, _, _ = benchmark(table.acquire, b"key", 1.0)
    assert not allowed


@pytest.mark.benchmark(group="BucketTable.acquire, new key evicting the oldest")
def test_bucket_acquire_churn(benchmark, fast_impl: fast.Implementation) -> None:
    table = fast_impl.BucketTable(10.0, 20, max_keys=1000)
    keys = itertools.cycle([b"key:%d" % i for i in range(5000)])
    benchmark(lambda: table.acquire(next(keys), 1.0))
    assert len(table) == 1000


@pytest.mark.benchmark(group="CircuitBreaker.allow, closed")
def test_breaker_allow(benchmark, fast_impl: fast.Implementation) -> None:
    breaker = fast_impl.CircuitBreaker(5, 30.0)
    assert benchmark(breaker.allow, 1.0)


@pytest.mark.benchmark(group="CircuitBreaker.allow, open")
def test_breaker_allow_open(benchmark, fast_impl: fast.Implementation) -> None:
    breaker = fast_impl.CircuitBreaker(1, 30.0)
    breaker.record_failure(0.0)
    assert not benchmark(breaker.allow, 1.0)


@pytest.mark.benchmark(group="CircuitBreaker.record_success")
def test_breaker_record_success(benchmark, fast_impl: fast.Implementation) -> None:
    breaker = fast_impl.CircuitBreaker(5, 30.0)
    benchmark(breaker.record_success)
    assert breaker.state == fast.CLOSED


@pytest.mark.benchmark(group="CircuitBreaker.record_failure, closed")
def test_breaker_record_failure(benchmark, fast_impl: fast.Implementation) -> None:
    breaker = fast_impl.CircuitBreaker(2**31 - 1, 30.0)  # counts, never opens
    benchmark(breaker.record_failure, 1.0)
    assert breaker.state == fast.CLOSED
