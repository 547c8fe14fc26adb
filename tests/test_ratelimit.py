"""Rate limiter: keys, the memory bucket, the shared Redis bucket and fallback."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import redis
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay import _fast as fast
from relay.features.limits import (
    MemoryLimiter,
    RateDecision,
    RedisLimiter,
    key_function,
)
from relay.redisconn import RedisConnection
from tests.support import run_on

# Generous: these check outcomes, and a busy machine can be slow to answer.
CALL_TIMEOUT = 5.0

try:
    from redis_server import RedisServer
except ImportError:  # tests/ collected as a package
    from tests.redis_server import RedisServer

Runner = Callable[[Coroutine[Any, Any, Any]], Any]
IMPLEMENTATIONS = [impl for impl in (fast.pure, fast.compiled) if impl is not None]


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Counter:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> None:
        self.n += 1


# -- keys ---------------------------------------------------------------------


def test_limiter_keys() -> None:
    # The key builders the pipeline looks up once per config and calls per request.
    api_key, ip, everyone = key_function("api_key"), key_function("ip"), key_function("global")
    assert api_key(b"0123456789abcdef", "10.0.0.1") == b"key:0123456789abcdef"
    # No credential: limited per client address rather than one shared bucket.
    assert api_key(None, "10.0.0.1") == b"ip:10.0.0.1"
    assert api_key(b"", b"10.0.0.1") == b"ip:10.0.0.1"
    assert ip(b"0123456789abcdef", "::1") == b"ip:::1"
    assert everyone(b"0123456789abcdef", "10.0.0.1") == b"global"
    assert key_function("ip")(None, "10.0.0.2") == b"ip:10.0.0.2"
    with pytest.raises(ValueError):
        key_function("header")


# -- memory -------------------------------------------------------------------


def test_memory_burst_then_refill() -> None:
    clock = FakeClock()
    limiter = MemoryLimiter(rate=2.0, burst=3, clock=clock)
    decisions = [limiter.acquire_nowait(b"k") for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining for d in decisions] == [2, 1, 0, 0]
    assert all(d.limit == 3 for d in decisions)
    assert decisions[0].retry_after == 0
    assert decisions[3].retry_after == pytest.approx(0.5)
    # Other keys have their own bucket.
    assert limiter.acquire_nowait(b"other").allowed
    clock.now += 0.5
    assert limiter.acquire_nowait(b"k") == RateDecision(True, 3, 0, pytest.approx(0.5))
    assert not limiter.acquire_nowait(b"k").allowed


def test_memory_async_api(run: Runner) -> None:
    async def main() -> None:
        limiter = MemoryLimiter(rate=1.0, burst=1)
        assert (await limiter.acquire(b"k")).allowed
        assert not (await limiter.acquire(b"k")).allowed

    run(main())


@given(
    rate=st.floats(0.01, 1000),
    burst=st.integers(1, 50),
    steps=st.lists(st.floats(0, 5, allow_nan=False), min_size=1, max_size=200),
)
def test_memory_never_grants_more_than_burst_plus_refill(
    rate: float, burst: int, steps: list[float]
) -> None:
    clock = FakeClock()
    limiter = MemoryLimiter(rate=rate, burst=burst, clock=clock)
    start = clock.now
    granted = 0
    for step in steps:
        clock.now += step
        if limiter.acquire_nowait(b"k").allowed:
            granted += 1
        allowance = burst + rate * (clock.now - start)
        assert granted <= allowance * (1 + 1e-9) + 1e-9


@given(
    steps=st.lists(st.floats(0, 0.3, allow_nan=False), min_size=1, max_size=100),
)
def test_memory_grants_what_it_promises(steps: list[float]) -> None:
    # The other direction: a denial always comes with a positive retry_after,
    # and waiting that long is always enough.
    clock = FakeClock()
    limiter = MemoryLimiter(rate=5.0, burst=2, clock=clock)
    for step in steps:
        clock.now += step
        decision = limiter.acquire_nowait(b"k")
        if not decision.allowed:
            assert decision.retry_after > 0
            # (a hair more than promised: (1 - t) / r * r + t may round below 1)
            clock.now += decision.retry_after * (1 + 1e-9)
            assert limiter.acquire_nowait(b"k").allowed


# -- Redis --------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_server() -> RedisServer:
    with RedisServer() as server:
        yield server


@pytest.fixture
def admin(redis_server: RedisServer) -> redis.Redis:
    client = redis.Redis(port=redis_server.port)
    client.flushall()
    yield client
    client.close()


@pytest.mark.redis
def test_two_instances_share_one_bucket(
    run: Runner, redis_server: RedisServer, admin: redis.Redis
) -> None:
    async def main() -> list[RateDecision]:
        # Two relay instances: separate connections, separate fallbacks.
        one = RedisConnection(redis_server.address, timeout=CALL_TIMEOUT)
        two = RedisConnection(redis_server.address, timeout=CALL_TIMEOUT)
        try:
            a = RedisLimiter(one, rate=0.001, burst=4)
            b = RedisLimiter(two, rate=0.001, burst=4)
            decisions = []
            for _ in range(4):
                decisions.append(await a.acquire(b"key:abc"))
                decisions.append(await b.acquire(b"key:abc"))
            return decisions
        finally:
            await one.close()
            await two.close()

    decisions = run(main())
    assert sum(d.allowed for d in decisions) == 4  # not 8
    assert [d.allowed for d in decisions] == [True] * 4 + [False] * 4
    assert [d.remaining for d in decisions[:4]] == [3, 2, 1, 0]
    assert all(d.retry_after > 0 for d in decisions[4:])
    # Idle buckets vanish: the hash carries an expiry.
    assert admin.hgetall(b"relay:rl:key:abc").keys() == {b"tokens", b"ts"}
    assert admin.pttl(b"relay:rl:key:abc") > 0


@pytest.mark.redis
def test_server_clock_refills(run: Runner, redis_server: RedisServer, admin: redis.Redis) -> None:
    async def main() -> None:
        conn = RedisConnection(redis_server.address, timeout=CALL_TIMEOUT)
        try:
            limiter = RedisLimiter(conn, rate=20.0, burst=1)
            assert (await limiter.acquire(b"k")).allowed
            denied = await limiter.acquire(b"k")
            assert not denied.allowed
            assert 0 < denied.retry_after <= 0.05
            for _ in range(100):  # bounded: a token is due within 50 ms
                await asyncio.sleep(denied.retry_after)
                if (await limiter.acquire(b"k")).allowed:
                    break
            else:
                raise AssertionError("the bucket never refilled")
        finally:
            await conn.close()

    run(main())


# Steps on an exact binary grid (k/8 s) make the buckets land exactly on
# token boundaries, where any difference in the arithmetic would show;
# arbitrary floats cover the rest.
step_st = st.one_of(
    st.integers(0, 12).map(lambda k: k / 8),
    st.floats(0, 1.5, allow_nan=False),
)


@pytest.mark.redis
@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=lambda i: i.name)
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    rate=st.sampled_from([0.5, 2.0, 3.0, 10.0, 1024.0]),
    burst=st.sampled_from([1, 2, 5, 20]),
    steps=st.lists(st.tuples(st.sampled_from([b"a", b"b"]), step_st), min_size=1, max_size=40),
)
def test_redis_script_matches_memory_bucket(
    redis_server: RedisServer,
    admin: redis.Redis,
    impl: Any,
    rate: float,
    burst: int,
    steps: list[tuple[bytes, float]],
) -> None:
    admin.flushall()
    clock = FakeClock(1_700_000_000.0)  # server-time-sized numbers
    memory = MemoryLimiter(rate=rate, burst=burst, clock=clock)
    memory._table = impl.BucketTable(rate, burst)

    async def main() -> None:
        conn = RedisConnection(redis_server.address, timeout=CALL_TIMEOUT)
        try:
            shared = RedisLimiter(conn, rate=rate, burst=burst)
            for key, step in steps:
                clock.now += step
                expected = memory.acquire_nowait(key)
                got = await shared._acquire_at(key, clock.now)
                assert (got.allowed, got.remaining, got.limit) == (
                    expected.allowed,
                    expected.remaining,
                    expected.limit,
                )
                # Redis reports whole milliseconds, rounded up.
                assert expected.retry_after <= got.retry_after <= expected.retry_after + 0.001
                if impl is fast.pure:
                    # The very same double, not merely the same decision.
                    stored = float(admin.hget(b"relay:rl:" + key, b"tokens"))
                    assert stored == memory._table._buckets[key]._tokens
        finally:
            await conn.close()

    run_on(uvloop.new_event_loop, main())


@pytest.mark.redis
def test_noscript_is_recovered(run: Runner, redis_server: RedisServer, admin: redis.Redis) -> None:
    errors = Counter()

    async def main() -> None:
        conn = RedisConnection(redis_server.address, timeout=CALL_TIMEOUT, on_error=errors)
        try:
            limiter = RedisLimiter(conn, rate=0.001, burst=3)
            assert (await limiter.acquire(b"k")).remaining == 2
            admin.script_flush()
            assert (await limiter.acquire(b"k")).remaining == 1
            assert admin.script_exists(limiter._script.sha) == [True]
        finally:
            await conn.close()

    run(main())
    assert errors.n == 0
    assert float(admin.hget(b"relay:rl:k", b"tokens")) == pytest.approx(1.0, abs=0.01)


@pytest.mark.redis
def test_foreign_value_at_key_falls_back(
    run: Runner, redis_server: RedisServer, admin: redis.Redis
) -> None:
    admin.set(b"relay:rl:k", b"not a hash")

    async def main() -> None:
        conn = RedisConnection(redis_server.address, timeout=CALL_TIMEOUT)
        try:
            limiter = RedisLimiter(conn, rate=0.001, burst=2)
            decision = await limiter.acquire(b"k")
            assert decision.allowed and decision.remaining == 1  # from the fallback
            assert conn.up  # a reply error does not mean Redis is gone
        finally:
            await conn.close()

    run(main())


class Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.redis
def test_outage_falls_back_and_returns_to_redis(run: Runner) -> None:
    logger = logging.getLogger("test.ratelimit.outage")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    records = Recorder()
    logger.addHandler(records)
    errors = Counter()
    try:
        with RedisServer() as server:

            async def main() -> None:
                conn = RedisConnection(
                    server.address, timeout=CALL_TIMEOUT, on_error=errors, logger=logger,
                    probe_interval=0.05,
                )
                fallback = MemoryLimiter(rate=0.001, burst=3)
                limiter = RedisLimiter(conn, rate=0.001, burst=3, fallback=fallback)
                try:
                    assert (await limiter.acquire(b"k")).remaining == 2  # Redis
                    server.kill()
                    # Every call still answers; the memory bucket is fresh.
                    during = [await limiter.acquire(b"k") for _ in range(5)]
                    assert [d.allowed for d in during] == [True] * 3 + [False] * 2
                    assert errors.n >= 1
                    assert not conn.up

                    server.start()  # same port, empty
                    for _ in range(250):
                        if conn.up:
                            break
                        await asyncio.sleep(0.02)
                    assert conn.up
                    after = await limiter.acquire(b"k")
                    assert after.allowed and after.remaining == 2  # a Redis bucket again
                finally:
                    await conn.close()

            run(main())
            keys = redis.Redis(port=server.port).keys()
            assert keys == [b"relay:rl:k"]
    finally:
        logger.removeHandler(records)
    warnings = [r for r in records.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert sum("is back" in r.getMessage() for r in records.records) == 1


def test_redis_limiter_rejects_bad_config() -> None:
    class NoConn:
        client = None

    with pytest.raises(ValueError):
        RedisLimiter(NoConn(), rate=math.inf, burst=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        RedisLimiter(NoConn(), rate=1.0, burst=0)  # type: ignore[arg-type]
