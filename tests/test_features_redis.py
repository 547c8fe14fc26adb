"""Shared cache and rate limit across relay instances through a real Redis,
and what clients see while that Redis dies and comes back.

Every test starts its own redis-server on a free port (never 6379). When
the binary is missing the tests are skipped, except under CI (env ``CI``),
where they fail.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from relay.testing import ThreadedFakeUpstream
from tests.conftest import RelayPair
from tests.redis_server import RedisServer
from tests.support import RelayThread, make_config
from tests.test_features import CHAT, KEY_A, KEY_B, Reply, call, metric, stream_body

pytestmark = pytest.mark.redis

CACHE_KEYS = "relay:cache:*"
BUCKET_KEYS = "relay:rl:*"


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def admin(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis(port=redis_server.port, socket_timeout=2)
    yield client
    client.close()


@pytest.fixture
def upstream(fake_upstream: ThreadedFakeUpstream) -> ThreadedFakeUpstream:
    fake_upstream.reset_stats()
    return fake_upstream


@pytest.fixture
def pair(
    redis_server: RedisServer, upstream: ThreadedFakeUpstream, relay_pair: RelayPair
) -> Callable[..., tuple[RelayThread, RelayThread]]:
    """``make(**sections)``: two relay instances (one per loop) on one Redis."""

    def make(**sections: Any) -> tuple[RelayThread, RelayThread]:
        sections.setdefault("circuit_breaker", {"enabled": False})
        sections.setdefault("server", {"shutdown_timeout": 1})
        sections["redis"] = {"enabled": True, "address": redis_server.address, "timeout": 0.25}
        return relay_pair(make_config(upstream.url, **sections))

    return make


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.05)


def prompt(text: str) -> dict[str, Any]:
    return {**CHAT, "messages": [{"role": "user", "content": text}]}


def timed_call(relay: RelayThread, body: Any = CHAT, **kwargs: Any) -> tuple[Reply, float]:
    started = time.monotonic()
    reply = call(relay, body, **kwargs)
    return reply, time.monotonic() - started


# --------------------------------------------------------------------------- #
# shared state
# --------------------------------------------------------------------------- #
def test_two_instances_share_one_bucket(pair, admin, upstream):
    a, b = pair(ratelimit={"enabled": True, "requests_per_second": 0.01, "burst": 4})
    replies = [call(relay) for relay in (a, b, a, b, a, b, a, b)]
    assert [r.status for r in replies] == [200] * 4 + [429] * 4
    assert [r.header("x-ratelimit-remaining") for r in replies[:4]] == ["3", "2", "1", "0"]
    assert {r.header("x-ratelimit-limit") for r in replies} == {"4"}
    assert len(upstream.requests) == 4
    assert len(admin.keys(BUCKET_KEYS)) == 1
    # another key has its own bucket, also shared
    assert [call(r, headers={"Authorization": KEY_B}).status for r in (b, a, b, a, b)] == [
        200,
        200,
        200,
        200,
        429,
    ]
    assert metric(a, "relay_ratelimit_rejected_total", '{key_type="api_key"}') == 2
    assert metric(b, "relay_ratelimit_rejected_total", '{key_type="api_key"}') == 3
    assert metric(a, "relay_redis_errors_total") == 0


def test_cache_filled_by_one_instance_hits_on_the_other(pair, admin, upstream):
    a, b = pair(cache={"enabled": True, "ttl": 60})
    for body in (CHAT, stream_body()):
        before = len(upstream.requests)
        first = call(a, body)
        assert first.status == 200 and first.cache == "MISS"
        # The entry is written after the response; wait for it to land.
        wait_for(lambda n=before: len(admin.keys(CACHE_KEYS)) == n + 1, 5, "entry in Redis")
        hit = call(b, body)
        assert hit.cache == "HIT"
        assert hit.body == first.body
        assert hit.header("content-type") == first.header("content-type")
        assert call(a, body).cache == "HIT"
        assert len(upstream.requests) == before + 1
    assert 0 < admin.pttl(admin.keys(CACHE_KEYS)[0]) <= 60_000
    # scope api_key holds across instances too
    assert call(b, headers={"Authorization": KEY_B}).cache == "MISS"
    assert metric(b, "relay_cache_hits_total") == 2


# --------------------------------------------------------------------------- #
# Redis outage
# --------------------------------------------------------------------------- #
def test_redis_dies_and_returns(pair, redis_server, admin, upstream, caplog):
    caplog.set_level(logging.INFO, logger="relay.redis")
    a, b = pair(
        cache={"enabled": True, "ttl": 60},
        ratelimit={"enabled": True, "requests_per_second": 0.01, "burst": 4},
    )
    assert call(a, prompt("before")).cache == "MISS"
    wait_for(lambda: admin.keys(CACHE_KEYS), 5, "entry in Redis")
    assert call(b, prompt("before")).cache == "HIT"

    redis_server.kill()
    # Clients see nothing of it: every answer is a normal, prompt one, from
    # memory backends (each instance on its own now).
    for i in range(6):
        for relay in (a, b):
            reply, seconds = timed_call(
                relay, prompt(f"outage {i}"), headers={"Authorization": f"Bearer sk-{i}"}
            )
            assert reply.status == 200, reply.body
            assert reply.cache == "MISS"
            assert reply.header("x-ratelimit-limit") == "4"
            assert seconds < 2.0
    assert call(a, prompt("outage 0"), headers={"Authorization": "Bearer sk-0"}).cache == "HIT"
    assert call(b, prompt("before")).cache == "MISS"  # B's Redis entry is out of reach
    assert metric(a, "relay_redis_errors_total") >= 1
    assert metric(b, "relay_redis_errors_total") >= 1
    down = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(down) == 2, [r.getMessage() for r in down]  # one line per instance
    assert all(r.levelno == logging.WARNING for r in down)

    redis_server.start()  # same port, empty
    # Each instance finds Redis again by itself (bounded).
    for relay in (a, b):

        def back(relay: RelayThread = relay) -> bool:
            before = len(admin.keys(CACHE_KEYS))
            fresh = f"Bearer sk-back-{time.monotonic()}"  # a full bucket every time
            reply = call(relay, prompt(f"after {fresh}"), headers={"Authorization": fresh})
            assert reply.status == 200
            time.sleep(0.1)  # the entry is written just after the response
            return len(admin.keys(CACHE_KEYS)) > before

        wait_for(back, 10, "cache entries written to Redis again")
    back_lines = [r for r in caplog.records if "is back" in r.getMessage()]
    assert len(back_lines) == 2
    # ...and the bucket is shared again
    fresh = {"Authorization": "Bearer sk-after"}
    statuses = [call(r, prompt("shared"), headers=fresh).status for r in (a, b, a, b, a)]
    assert statuses == [200, 200, 200, 200, 429]
    assert admin.keys(BUCKET_KEYS)
    # nothing else was logged about Redis
    assert len([r for r in caplog.records if r.name == "relay.redis"]) == 4


def test_hanging_redis_costs_a_request_at_most_the_timeout(pair, redis_server, admin, upstream):
    a, b = pair(
        cache={"enabled": True, "ttl": 60},
        ratelimit={"enabled": True, "requests_per_second": 0.01, "burst": 10},
    )
    assert call(a).status == 200
    pid = int(admin.info("server")["process_id"])
    os.kill(pid, signal.SIGSTOP)
    try:
        # The first calls wait out redis.timeout (0.25 s) once, then fall back
        # at once; the server answers nothing while stopped.
        for i in range(4):
            reply, seconds = timed_call(a, prompt(f"hang {i}"), headers={"Authorization": KEY_A})
            assert reply.status == 200
            assert seconds < 1.5
        assert metric(a, "relay_redis_errors_total") >= 1
    finally:
        os.kill(pid, signal.SIGCONT)

    def used() -> bool:
        before = len(admin.keys(CACHE_KEYS))
        fresh = f"Bearer sk-resume-{time.monotonic()}"
        assert call(a, prompt(fresh), headers={"Authorization": fresh}).status == 200
        time.sleep(0.1)
        return len(admin.keys(CACHE_KEYS)) > before

    wait_for(used, 10, "Redis used again after it resumed")
    # Calls cut off by the deadline left no stray replies on reused sockets:
    # every entry read back is the one asked for.
    texts = [f"distinct {i}" for i in range(4)]
    stored = len(admin.keys(CACHE_KEYS))
    filled = {t: call(a, prompt(t), headers={"Authorization": KEY_B}) for t in texts}
    wait_for(lambda: len(admin.keys(CACHE_KEYS)) == stored + 4, 5, "entries in Redis")
    for text in reversed(texts):
        hit = call(b, prompt(text), headers={"Authorization": KEY_B})
        assert hit.cache == "HIT" and hit.body == filled[text].body
        assert hit.json()["id"] == filled[text].json()["id"]


def test_relay_starts_without_redis_and_picks_it_up(upstream, caplog):
    caplog.set_level(logging.INFO, logger="relay.redis")
    server = RedisServer()  # port reserved, not started yet
    config = make_config(
        upstream.url,
        cache={"enabled": True, "ttl": 60},
        ratelimit={"enabled": True, "requests_per_second": 0.01, "burst": 3},
        circuit_breaker={"enabled": False},
        server={"shutdown_timeout": 1},
        redis={"enabled": True, "address": server.address, "timeout": 0.25},
    )
    try:
        with RelayThread(config) as relay:
            first = call(relay)
            assert first.status == 200 and first.cache == "MISS"
            assert call(relay).cache == "HIT"  # memory serves meanwhile
            assert [call(relay).status for _ in range(2)] == [200, 429]
            assert metric(relay, "relay_redis_errors_total") >= 1
            server.start()
            admin = redis.Redis(port=server.port, socket_timeout=2)
            try:

                def used() -> bool:
                    fresh = f"Bearer sk-start-{time.monotonic()}"
                    reply = call(relay, prompt(fresh), headers={"Authorization": fresh})
                    assert reply.status == 200
                    time.sleep(0.1)
                    return bool(admin.keys(CACHE_KEYS)) and bool(admin.keys(BUCKET_KEYS))

                wait_for(used, 10, "Redis used once it is there")
            finally:
                admin.close()
    finally:
        server.close()
    down = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(down) == 1
