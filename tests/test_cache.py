"""Cache entries, the memory and Redis backends, and request coalescing."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable, Coroutine
from types import ModuleType
from typing import Any

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from relay._fast import response_head
from relay.features import _coalescer_py
from relay.features.cache import (
    USAGE_HEADER,
    CacheEntry,
    MemoryCache,
    RedisCache,
    replay_headers,
    shared_headers,
)
from relay.http.protocol import HOP_BY_HOP
from relay.redisconn import RedisConnection
from tests.support import compiled_twin_or_skip

try:
    from redis_server import RedisServer
except ImportError:  # tests/ collected as a package
    from tests.redis_server import RedisServer

Runner = Callable[[Coroutine[Any, Any, Any]], Any]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def entry(body: bytes = b'{"ok":true}', *, streamed: bool = False, status: int = 200) -> CacheEntry:
    return CacheEntry(
        status=status,
        headers=((b"content-type", b"application/json"), (b"x-request-id", b"abc")),
        body=body,
        streamed=streamed,
        created=1_700_000_000.25,
    )


# -- CacheEntry ---------------------------------------------------------------


def test_entry_roundtrip() -> None:
    for e in (entry(), entry(b"data: {}\n\ndata: [DONE]\n\n", streamed=True), entry(b"")):
        assert CacheEntry.from_bytes(e.to_bytes()) == e


def test_entry_renders_its_head_once_without_the_usage_header() -> None:
    stored = CacheEntry(
        200,
        ((b"Content-Type", b"application/json"), (USAGE_HEADER, b"3,4,0,0,gpt-4o"), (b"X-A", b"b")),
        b"{}",
        False,
        1_700_000_000.0,
    )
    assert stored.rendered is None  # nothing derived before the first hit
    assert stored.head == b"Content-Type: application/json\r\nX-A: b\r\n"
    assert stored.head is stored.head  # rendered once
    assert stored.usage_value == b"3,4,0,0,gpt-4o"
    # What any relay of this format wrote (the bytes carry no rendered
    # head) reads back with the same head: Redis entries stay shared.
    wire = (
        struct.pack(">BBHdH", 2, 0, 200, 1_700_000_000.0, 3)
        + b"".join(
            struct.pack(">HI", len(n), len(v)) + n + v for n, v in stored.headers
        )
        + struct.pack(">Q", 2) + b"{}"
    )
    assert wire == stored.to_bytes()
    read = CacheEntry.from_bytes(wire)
    assert read is not None and read == stored
    assert (read.head, read.usage_value) == (stored.head, stored.usage_value)
    assert entry().usage_value is None


headers_st = st.lists(
    st.tuples(st.binary(min_size=1, max_size=40), st.binary(max_size=200)), max_size=8
).map(tuple)


@given(
    status=st.integers(100, 999),
    headers=headers_st,
    body=st.binary(max_size=4096),
    streamed=st.booleans(),
    created=st.floats(allow_nan=False, allow_infinity=False),
)
def test_entry_roundtrip_property(
    status: int, headers: tuple[tuple[bytes, bytes], ...], body: bytes, streamed: bool, created: float
) -> None:
    e = CacheEntry(status, headers, body, streamed, created)
    data = e.to_bytes()
    assert CacheEntry.from_bytes(data) == e
    assert CacheEntry.from_bytes(bytearray(data)) == e
    # Any truncation or trailing garbage is refused, not misread.
    assert CacheEntry.from_bytes(data[:-1]) is None
    assert CacheEntry.from_bytes(data + b"\x00") is None


@given(st.binary(max_size=512))
def test_from_bytes_never_raises(data: bytes) -> None:
    result = CacheEntry.from_bytes(data)
    assert result is None or isinstance(result, CacheEntry)


@pytest.mark.parametrize(
    "data",
    [b"", b"\x01", b"\x03" + entry().to_bytes()[1:], b"\xff" * 64, b"not a cache entry"],
)
def test_from_bytes_corrupt(data: bytes) -> None:
    assert CacheEntry.from_bytes(data) is None


def test_from_bytes_wrong_type() -> None:
    assert CacheEntry.from_bytes("text") is None  # type: ignore[arg-type]


def test_replay_headers_drops_hop_by_hop_and_framing() -> None:
    upstream = (
        (b"Content-Type", b"text/event-stream"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Content-Length", b"12"),
        (b"Connection", b"keep-alive, X-Private"),
        (b"Keep-Alive", b"timeout=5"),
        (b"X-Private", b"1"),
        (b"Set-Cookie", b"__cf_bm=abc"),
        (b"openai-processing-ms", b"120"),
        (b"X-Relay-Cache", b"MISS"),
    )
    assert replay_headers(upstream) == (
        (b"Content-Type", b"text/event-stream"),
        (b"openai-processing-ms", b"120"),
    )


@pytest.mark.parametrize(
    "upstream",
    [
        [(b"Content-Type", b"Application/JSON"), (b"Content-Length", b"5"),
         (b"Connection", b"keep-alive"), (b"Date", b"x")],
        [(b"Content-Type", b"text/event-stream"), (b"Transfer-Encoding", b"chunked"),
         (b"Connection", b"keep-alive, X-Private"), (b"X-Private", b"1"),
         (b"Set-Cookie", b"a=b"), (b"X-Relay-Cache", b"HIT"), (b"openai-model", b"m")],
        [(b"set-cookie", b"a=1"), (b"WWW-Authenticate", b"Bearer"), (b"Content-Encoding", b"gzip"),
         (b"content-encoding", b"identity"), (b"X-A", b"1")],
        [(b"Connection", b"Set-Cookie"), (b"Set-Cookie", b"a=1"), (b"X-B", b"2")],
        [(b"Connection", b"close"), (b"Connection", b"x-c , content-type"),
         (b"Content-Type", b"text/plain"), (b"X-C", b"3")],
        [],
    ],
)
def test_relayed_and_shared_headers_are_what_replay_headers_keeps(
    upstream: list[tuple[bytes, bytes]],
) -> None:
    # The exchange keeps the relayed headers of the head and stores their
    # shared part: that is what replay_headers keeps of the upstream's.
    kept, _, content_type, *_ = response_head(upstream)
    named = {t.strip().lower() for n, v in upstream if n.lower() == b"connection" for t in v.split(b",")}
    assert kept == tuple(
        (n, v) for n, v in upstream
        if n.lower() not in HOP_BY_HOP | {b"x-relay-cache", b"content-encoding"} | named
    )
    assert content_type == next((v.lower() for n, v in upstream if n.lower() == b"content-type"), None)
    assert shared_headers(kept) == replay_headers(upstream) == replay_headers(kept)


# -- MemoryCache --------------------------------------------------------------


def test_memory_lru_by_entries() -> None:
    cache = MemoryCache(max_entries=2, ttl=60)
    cache.set_nowait(b"a", entry(b"1"))
    cache.set_nowait(b"b", entry(b"2"))
    assert cache.get_nowait(b"a") is not None  # a is now most recent
    cache.set_nowait(b"c", entry(b"3"))
    assert cache.get_nowait(b"b") is None
    assert cache.get_nowait(b"a").body == b"1"
    assert cache.get_nowait(b"c").body == b"3"
    assert len(cache) == 2


def test_memory_ttl_expires_on_get() -> None:
    clock = FakeClock()
    cache = MemoryCache(max_entries=10, ttl=5, clock=clock)
    cache.set_nowait(b"k", entry())
    clock.now += 4.9
    assert cache.get_nowait(b"k") is not None
    clock.now += 0.2
    assert cache.get_nowait(b"k") is None
    assert len(cache) == 0 and cache.nbytes == 0


def test_memory_bounded_by_bytes() -> None:
    one = entry(b"x" * 1000)
    cache = MemoryCache(max_entries=1000, max_bytes=3 * (one.size + 1), ttl=60)
    for i in range(10):
        cache.set_nowait(bytes([i]), one)
        assert cache.nbytes <= cache.max_bytes
    assert len(cache) == 3
    assert [cache.get_nowait(bytes([i])) is not None for i in range(10)] == [False] * 7 + [True] * 3
    # An entry bigger than the whole budget is not stored (and evicts nothing).
    cache.set_nowait(b"big", entry(b"y" * 10_000))
    assert cache.get_nowait(b"big") is None
    assert len(cache) == 3


def test_memory_overwrite_keeps_accounting() -> None:
    cache = MemoryCache(max_entries=10, ttl=60)
    cache.set_nowait(b"k", entry(b"x" * 100))
    cache.set_nowait(b"k", entry(b"x" * 10))
    assert len(cache) == 1
    assert cache.nbytes == entry(b"x" * 10).size + 1
    cache.delete(b"k")
    assert cache.nbytes == 0


@given(
    status=st.integers(100, 999),
    headers=headers_st,
    usage=st.one_of(st.none(), st.binary(max_size=80)),
    body=st.binary(max_size=2048),
    streamed=st.booleans(),
    created=st.floats(allow_nan=False, allow_infinity=False),
)
def test_memory_hit_is_the_entry_stored(
    status: int,
    headers: tuple[tuple[bytes, bytes], ...],
    usage: bytes | None,
    body: bytes,
    streamed: bool,
    created: float,
) -> None:
    # Whatever the headers hold (": " in a name, CRLF in a value, the usage
    # header anywhere), the compact form reads back as the entry stored.
    if usage is not None:
        headers = (*headers, (USAGE_HEADER, usage))
    stored = CacheEntry(status, headers, body, streamed, created)
    reference = CacheEntry(status, headers, body, streamed, created)
    cache = MemoryCache(max_entries=10, ttl=60)
    cache.set_nowait(b"k", stored)
    assert cache.nbytes == reference.size + 1
    assert cache.entries() == [reference]
    hit = cache.get_nowait(b"k")
    assert hit is not None and hit == reference
    assert hit.head == b"".join(
        b"%s: %s\r\n" % pair for pair in headers if pair[0] != USAGE_HEADER
    )
    assert hit.usage_value == reference.usage_value
    assert (hit.status, hit.body, hit.streamed, hit.created) == (status, body, streamed, created)
    assert cache.get_nowait(b"k") is hit  # expanded once, at the first hit
    assert cache.nbytes == reference.size + 1  # the same size, expanded or not
    cache.delete(b"k")
    assert cache.nbytes == 0 and len(cache) == 0


@given(
    status=st.integers(100, 999),
    headers=headers_st,
    usage=st.one_of(st.none(), st.binary(max_size=80)),
    body=st.binary(max_size=2048),
    streamed=st.booleans(),
    rendered=st.booleans(),
)
def test_a_miss_stored_from_its_parts_is_the_entry_set(
    status: int,
    headers: tuple[tuple[bytes, bytes], ...],
    usage: bytes | None,
    body: bytes,
    streamed: bool,
    rendered: bool,
) -> None:
    """store() (what a miss does, without a CacheEntry, with the lines the
    client was sent) holds exactly what set_nowait holds for the entry."""
    headers = tuple(pair for pair in headers if pair[0] != USAGE_HEADER)
    full = headers if usage is None else (*headers, (USAGE_HEADER, usage))
    clock = FakeClock()
    by_entry = MemoryCache(max_entries=10, ttl=60, clock=clock)
    by_parts = MemoryCache(max_entries=10, ttl=60, clock=clock)
    by_entry.set_nowait(b"k", CacheEntry(status, full, body, streamed, 5.0))
    lines = b"".join(b"%s: %s\r\n" % pair for pair in headers) if rendered else None
    by_parts.store(b"k", status, headers, lines, usage, body, streamed, 5.0)
    assert by_parts._data.values() == by_entry._data.values()
    assert by_parts.nbytes == by_entry.nbytes
    assert by_parts.entries() == [CacheEntry(status, full, body, streamed, 5.0)]


def test_memory_hit_bytes_and_usage_of_a_proxied_entry() -> None:
    headers = (
        (b"Server", b"nginx/1.24.0"),
        (b"Date", b"Wed, 02 Dec 2026 03:50:00 GMT"),
        (b"Content-Type", b"application/json"),
        (USAGE_HEADER, b"25,60,0,0,gpt-4o"),
    )
    cache = MemoryCache(max_entries=10, ttl=60)
    cache.set_nowait(b"k", CacheEntry(200, headers, b'{"id":"x"}', False, 5.0))
    hit = cache.get_nowait(b"k")
    assert hit is not None
    assert hit.head == (
        b"Server: nginx/1.24.0\r\nDate: Wed, 02 Dec 2026 03:50:00 GMT\r\n"
        b"Content-Type: application/json\r\n"
    )
    assert hit.usage_value == b"25,60,0,0,gpt-4o"
    assert hit.headers == headers and hit.body == b'{"id":"x"}'
    hit.keep_usage("read")  # kept with the entry for the next hits
    assert cache.get_nowait(b"k") is hit and hit.usage == "read"


def test_memory_eviction_order_and_sizes_mixed_forms() -> None:
    clock = FakeClock()
    cache = MemoryCache(max_entries=3, ttl=60, clock=clock)
    sizes = {}
    for name in (b"a", b"b", b"c"):
        e = entry(name * 50)
        sizes[name] = e.size + 1
        cache.set_nowait(name, e)
    assert cache.nbytes == sum(sizes.values())
    assert cache.get_nowait(b"a") is not None  # expanded, and most recent
    cache.set_nowait(b"d", entry(b"d"))  # evicts b, the least recent
    assert [e.body for e in cache.entries()] == [b"c" * 50, b"a" * 50, b"d"]
    assert cache.nbytes == sizes[b"c"] + sizes[b"a"] + entry(b"d").size + 1
    assert cache.get_nowait(b"b") is None
    cache.set_nowait(b"e", entry(b"e"))  # evicts c (compact), then a (expanded)
    cache.set_nowait(b"f", entry(b"f"))
    assert [e.body for e in cache.entries()] == [b"d", b"e", b"f"]
    assert cache.nbytes == 3 * (entry(b"d").size + 1)
    # Expiry removes either form and gives back its bytes.
    assert cache.get_nowait(b"e") is not None
    clock.now += 61
    assert cache.get_nowait(b"d") is None and cache.get_nowait(b"e") is None
    assert len(cache) == 1 and cache.nbytes == entry(b"f").size + 1


def test_memory_ttl_zero_disables() -> None:
    cache = MemoryCache(ttl=0)
    cache.set_nowait(b"k", entry())
    assert cache.get_nowait(b"k") is None


def test_memory_async_api(run: Runner) -> None:
    async def main() -> None:
        cache = MemoryCache(ttl=60)
        await cache.set(b"k", entry())
        assert await cache.get(b"k") == entry()
        assert await cache.get(b"other") is None

    run(main())


# -- Coalescer ----------------------------------------------------------------


@pytest.fixture(scope="module", params=["pure", "compiled"])
def co(request: pytest.FixtureRequest) -> ModuleType:
    """Each twin of the coalescer in turn."""
    if request.param == "pure":
        return _coalescer_py
    return compiled_twin_or_skip("relay.features._coalescer_c")


async def relay_follower(follower: Any) -> tuple[Any, list[bytes]]:
    """What a pipeline follower does: head, then the body chunks."""
    try:
        head = await follower.head()
        if head is None:
            return None, []
        return head, [chunk async for chunk in follower]
    finally:
        follower.close()


HEAD = (200, ((b"content-type", b"text/event-stream"),))


def test_coalescer_one_leader_followers_get_identical_chunks(run: Runner, co: ModuleType) -> None:
    async def main() -> None:
        coalescer = co.Coalescer(max_body_bytes=1 << 20)
        leader = coalescer.join(b"key")
        assert isinstance(leader, co.Leader) and leader.is_leader
        early = [coalescer.join(b"key") for _ in range(5)]
        assert all(isinstance(f, co.Follower) and not f.is_leader for f in early)
        assert leader.followers == 5
        tasks = [asyncio.create_task(relay_follower(f)) for f in early]
        await asyncio.sleep(0)

        chunks = [b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"]
        leader.start(*HEAD)
        leader.chunk(chunks[0])
        await asyncio.sleep(0)
        # Streamed incrementally: the followers already hold the first chunk
        # while the leader is still waiting on upstream.
        assert all(f.pos == 1 for f in early)
        leader.chunk(chunks[1])
        late = coalescer.join(b"key")  # joins mid-stream
        assert isinstance(late, co.Follower)
        late_task = asyncio.create_task(relay_follower(late))
        await asyncio.sleep(0)
        leader.chunk(chunks[2])
        leader.finish()
        # Still joinable until close(): the window while the entry is stored.
        after_finish = coalescer.join(b"key")
        assert isinstance(after_finish, co.Follower)
        leader.close()
        assert len(coalescer) == 0

        results = await asyncio.gather(*tasks, late_task, relay_follower(after_finish))
        assert all(r == (HEAD, chunks) for r in results)
        # The flight is gone: the next request leads a new one.
        next_leader = coalescer.join(b"key")
        assert isinstance(next_leader, co.Leader)
        next_leader.close()

    run(main())


def test_coalescer_keys_are_independent(run: Runner, co: ModuleType) -> None:
    async def main() -> None:
        coalescer = co.Coalescer()
        a, b = coalescer.join(b"a"), coalescer.join(b"b")
        assert isinstance(a, co.Leader) and isinstance(b, co.Leader)
        a.close()
        b.close()

    run(main())


def test_coalescer_leader_failure_before_head_releases_followers(run: Runner, co: ModuleType) -> None:
    async def main() -> None:
        coalescer = co.Coalescer()
        leader = coalescer.join(b"k")
        followers = [coalescer.join(b"k") for _ in range(3)]
        tasks = [asyncio.create_task(relay_follower(f)) for f in followers]
        await asyncio.sleep(0)
        leader.fail()  # e.g. upstream said 500: not cacheable, not shared
        results = await asyncio.gather(*tasks)
        assert results == [(None, [])] * 3
        # A failed flight takes no new followers.
        next_leader = coalescer.join(b"k")
        assert isinstance(next_leader, co.Leader)
        next_leader.close()
        leader.close()

    run(main())


def test_coalescer_close_without_finish_fails(run: Runner, co: ModuleType) -> None:
    async def main() -> None:
        coalescer = co.Coalescer()
        leader = coalescer.join(b"k")
        follower = coalescer.join(b"k")
        task = asyncio.create_task(relay_follower(follower))
        await asyncio.sleep(0)
        leader.close()  # e.g. from a finally after the upstream connection reset
        assert await task == (None, [])

    run(main())


def test_coalescer_leader_failure_mid_body_aborts_started_followers(run: Runner, co: ModuleType) -> None:
    async def main() -> None:
        coalescer = co.Coalescer()
        leader = coalescer.join(b"k")
        follower = coalescer.join(b"k")
        leader.start(*HEAD)
        leader.chunk(b"data: 1\n\n")
        assert await follower.head() == HEAD
        assert await follower.next_chunk() == b"data: 1\n\n"
        leader.fail()
        with pytest.raises(co.FlightAborted):
            await follower.next_chunk()
        follower.close()
        leader.close()

    run(main())


def test_coalescer_cancelled_follower_does_not_disturb_others(run: Runner, co: ModuleType) -> None:
    async def main() -> None:
        coalescer = co.Coalescer()
        leader = coalescer.join(b"k")
        f1, f2 = coalescer.join(b"k"), coalescer.join(b"k")
        t1 = asyncio.create_task(relay_follower(f1))
        t2 = asyncio.create_task(relay_follower(f2))
        await asyncio.sleep(0)
        t1.cancel()  # its client went away
        await asyncio.sleep(0)
        assert leader.followers == 1
        leader.start(*HEAD)
        leader.chunk(b"x")
        leader.finish()
        leader.close()
        assert await t2 == (HEAD, [b"x"])
        assert t1.cancelled()

    run(main())


def test_coalescer_overflow_bounds_memory(run: Runner, co: ModuleType) -> None:
    async def main() -> None:
        coalescer = co.Coalescer(max_body_bytes=10)
        leader = coalescer.join(b"k")
        started = coalescer.join(b"k")
        waiting = coalescer.join(b"k")
        leader.start(*HEAD)
        assert await started.head() == HEAD
        leader.chunk(b"12345")
        assert await started.next_chunk() == b"12345"
        leader.chunk(b"678901")  # 11 bytes > 10: not cacheable any more
        assert leader.overflowed
        # Not joinable now: a new identical request goes upstream on its own.
        own = coalescer.join(b"k")
        assert isinstance(own, co.Leader)
        own.close()
        # A follower that had not started yet is told to fetch for itself ...
        assert await waiting.head() is None
        waiting.close()
        # ... one already relaying keeps getting the live stream,
        assert await started.next_chunk() == b"678901"
        leader.chunk(b"abc")
        assert await started.next_chunk() == b"abc"
        # and the buffer keeps only what it has not consumed yet.
        flight = started._flight
        assert flight.retained == 0
        leader.chunk(b"A" * 6)
        leader.chunk(b"B" * 6)  # started lags 12 > 10 bytes: cut loose
        with pytest.raises(co.FlightAborted):
            await started.next_chunk()
        assert flight.retained == 0
        started.close()
        leader.finish()
        leader.close()

    run(main())


def test_coalescer_body_exactly_at_cap_is_shared(run: Runner, co: ModuleType) -> None:
    async def main() -> None:
        coalescer = co.Coalescer(max_body_bytes=10)
        leader = coalescer.join(b"k")
        leader.start(*HEAD)
        leader.chunk(b"0123456789")
        leader.finish()
        late = coalescer.join(b"k")
        assert isinstance(late, co.Follower)
        assert await relay_follower(late) == (HEAD, [b"0123456789"])
        leader.close()

    run(main())


# -- RedisCache ---------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_server() -> RedisServer:
    with RedisServer() as server:
        yield server


@pytest.mark.redis
def test_redis_cache_set_get_and_ttl(run: Runner, redis_server: RedisServer) -> None:
    admin = redis.Redis(port=redis_server.port)
    admin.flushall()

    async def main() -> None:
        conn = RedisConnection(redis_server.address, timeout=0.5)
        fallback = MemoryCache(ttl=60)
        cache = RedisCache(conn, ttl=0.3, prefix="t:cache:", fallback=fallback)
        try:
            assert await cache.get(b"k") is None
            await cache.set(b"k", entry(streamed=True))
            assert await cache.get(b"k") == entry(streamed=True)
            assert admin.exists(b"t:cache:k")
            assert 0 < admin.pttl(b"t:cache:k") <= 300
            assert len(fallback) == 0  # Redis up: memory untouched
            for _ in range(100):  # bounded wait for Redis to expire it
                if await cache.get(b"k") is None:
                    break
                await asyncio.sleep(0.02)
            assert await cache.get(b"k") is None
            # Not ours / corrupt: a miss, not an error.
            admin.set(b"t:cache:bad", b"garbage")
            assert await cache.get(b"bad") is None
        finally:
            await conn.close()

    run(main())


@pytest.mark.redis
def test_redis_cache_shared_between_connections(run: Runner, redis_server: RedisServer) -> None:
    redis.Redis(port=redis_server.port).flushall()

    async def main() -> None:
        one = RedisConnection(redis_server.address, timeout=0.5)
        two = RedisConnection(redis_server.address, timeout=0.5)
        try:
            await RedisCache(one, ttl=60).set(b"k", entry())
            assert await RedisCache(two, ttl=60).get(b"k") == entry()
        finally:
            await one.close()
            await two.close()

    run(main())


@pytest.mark.redis
def test_redis_cache_falls_back_to_memory_and_back(run: Runner) -> None:
    with RedisServer() as server:
        errors: list[float] = []

        async def main() -> None:
            conn = RedisConnection(
                server.address,
                timeout=0.3,
                on_error=lambda: errors.append(time.monotonic()),
                probe_interval=0.05,
            )
            fallback = MemoryCache(ttl=60)
            cache = RedisCache(conn, ttl=60, fallback=fallback)
            try:
                await cache.set(b"in-redis", entry(b"r"))
                server.kill()
                # No error reaches the caller: misses, then memory serves.
                assert await cache.get(b"in-redis") is None
                assert errors
                await cache.set(b"during", entry(b"m"))
                assert fallback.get_nowait(b"during") is not None
                assert await cache.get(b"during") == entry(b"m")

                server.start()  # empty, same port
                for _ in range(250):
                    if conn.up:
                        break
                    await asyncio.sleep(0.02)
                assert conn.up
                await cache.set(b"after", entry(b"a"))
                assert fallback.get_nowait(b"after") is None
                assert await cache.get(b"after") == entry(b"a")
            finally:
                await conn.close()

        run(main())
        assert redis.Redis(port=server.port).exists(b"relay:cache:after")
