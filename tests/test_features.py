"""Caching, rate limiting and the circuit breaker end to end, through real
sockets, with the fake upstream counting what reached it.

Every test starts its own relay (on both event loops, through the
``relay_factory`` fixture) so no bucket, cache entry or breaker state leaks
from one test into another; the fake upstream is shared and its counters
are reset before each test.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import openai
import pytest

from relay.features.coalescer import OPEN
from relay.testing import ThreadedFakeUpstream
from tests.support import RelayThread, free_port

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "say hello to the cache"}]}
CHAT_PATH = "/v1/chat/completions"
KEY_A = "Bearer sk-test-key-a"
KEY_B = "Bearer sk-test-key-b"
TIMEOUT = 10.0


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
@dataclass
class Reply:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    @property
    def cache(self) -> str | None:
        return self.header("x-relay-cache")

    def json(self) -> Any:
        return json.loads(self.body)


def call(
    relay: RelayThread,
    body: Any = CHAT,
    *,
    path: str = CHAT_PATH,
    method: str = "POST",
    headers: dict[str, str] | None = None,
    source: str | None = None,
) -> Reply:
    """One request on a fresh connection; *body* is JSON-encoded unless bytes."""
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
    sent = {"Authorization": KEY_A, "Content-Type": "application/json"}
    sent.update(headers or {})
    sent = {k: v for k, v in sent.items() if v is not None}
    conn = http.client.HTTPConnection(
        "127.0.0.1",
        relay.port,
        timeout=TIMEOUT,
        source_address=(source, 0) if source else None,
    )
    try:
        conn.request(method, path, body=body if method != "GET" else None, headers=sent)
        resp = conn.getresponse()
        data = resp.read()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    finally:
        conn.close()


def stream_body(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {**CHAT, "stream": True, **(extra or {})}


def metric(relay: RelayThread, name: str, labels: str = "") -> float:
    """A sample's value from GET /metrics (0 when absent)."""
    reply = call(relay, None, path="/metrics", method="GET")
    assert reply.status == 200
    pattern = re.compile("^" + re.escape(name + labels) + r" (\S+)$", re.M)
    found = pattern.search(reply.body.decode())
    return float(found.group(1)) if found else 0.0


def assert_error_shape(reply: Reply, status: int) -> dict[str, Any]:
    assert reply.status == status
    assert reply.header("content-type").startswith("application/json")
    error = reply.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert isinstance(error["code"], str) and error["code"]
    return error


def retry_after(reply: Reply) -> int:
    value = reply.header("retry-after")
    assert value is not None and value.isdigit(), value
    assert int(value) >= 1
    return int(value)


def wait_until(check: Callable[[], bool], timeout: float = 5.0, step: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(step)


@pytest.fixture(autouse=True)
def _fresh_counts(fake_upstream: ThreadedFakeUpstream) -> Iterator[None]:
    fake_upstream.reset_stats()
    yield


@pytest.fixture
def upstream(fake_upstream: ThreadedFakeUpstream) -> ThreadedFakeUpstream:
    return fake_upstream


CACHE = {"enabled": True, "ttl": 60}


# --------------------------------------------------------------------------- #
# caching
# --------------------------------------------------------------------------- #
def test_miss_then_hit_without_touching_upstream(relay_factory, upstream):
    relay = relay_factory(upstream.url, cache=CACHE)
    first = call(relay)
    assert first.status == 200 and first.cache == "MISS"
    assert len(upstream.requests) == 1
    opened = upstream.connections_opened
    second = call(relay)
    assert second.status == 200 and second.cache == "HIT"
    assert second.body == first.body
    assert second.header("content-type") == first.header("content-type")
    assert "x-relay-usage" not in second.headers  # relay's bookkeeping stays inside
    assert len(upstream.requests) == 1
    assert upstream.connections_opened == opened
    assert metric(relay, "relay_cache_hits_total") == 1
    assert metric(relay, "relay_cache_misses_total") == 1


def test_a_stored_miss_answers_the_next_pipelined_request(relay_factory, upstream, connect):
    # The memory cache stores a response before the connection reads its
    # next request: the second of two identical pipelined requests is a hit.
    relay = relay_factory(upstream.url, cache=CACHE)
    body = json.dumps({**CHAT, "messages": [{"role": "user", "content": "pipelined"}]}).encode()
    one = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: relay\r\n"
        b"Authorization: Bearer sk-test-key-a\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    ) + body
    client = connect(relay.port)
    client.send(one + one)
    first, second = client.response(), client.response()
    assert first.status == 200 and first.header("x-relay-cache") == "MISS"
    assert second.status == 200 and second.header("x-relay-cache") == "HIT"
    assert second.body == first.body
    assert len(upstream.requests) == 1


def test_key_ignores_json_key_order_and_whitespace(relay_factory, upstream):
    relay = relay_factory(upstream.url, cache=CACHE)
    assert call(relay, json.dumps(CHAT).encode()).cache == "MISS"
    reordered = {"messages": CHAT["messages"], "model": CHAT["model"]}
    spaced = json.dumps(reordered, indent=4).encode() + b"\n"
    assert call(relay, spaced).cache == "HIT"
    assert call(relay, json.dumps(CHAT, separators=(",", ":")).encode()).cache == "HIT"
    assert len(upstream.requests) == 1


def test_key_differs_by_path_query_and_body(relay_factory, upstream):
    relay = relay_factory(upstream.url, cache=CACHE)
    other = {**CHAT, "messages": [{"role": "user", "content": "something else"}]}
    variants = [
        {"path": CHAT_PATH},
        {"path": CHAT_PATH + "?a=1"},
        {"path": CHAT_PATH + "?a=2"},
        {"path": "/v1/completions"},
        {"path": CHAT_PATH, "body": other},
    ]
    for i, v in enumerate(variants, 1):
        reply = call(relay, v.get("body", CHAT), path=v["path"])
        assert reply.status == 200 and reply.cache == "MISS", v
        assert len(upstream.requests) == i
    # ...and each of them is now cached under its own key.
    for v in variants:
        assert call(relay, v.get("body", CHAT), path=v["path"]).cache == "HIT", v
    assert len(upstream.requests) == len(variants)
    assert upstream.requests[1].path == CHAT_PATH + "?a=1"


def test_every_proxied_response_says_how_the_cache_treated_it(relay_factory, upstream):
    relay = relay_factory(upstream.url, cache=CACHE)
    models = call(relay, None, path="/v1/models", method="GET")
    assert models.status == 200 and models.cache == "BYPASS"
    assert call(relay, None, path="/v1/models", method="GET").cache == "BYPASS"
    assert len(upstream.requests) == 2  # GETs are never served from the cache
    missing = call(relay, path="/v1/nothing-here")
    assert missing.status == 404 and missing.cache == "MISS"
    assert call(relay).cache == "MISS"
    assert call(relay).cache == "HIT"
    # relay's own endpoints are not proxied responses
    assert call(relay, None, path="/healthz", method="GET").cache is None


def test_disabled_cache_bypasses_everything(relay_factory, upstream):
    relay = relay_factory(upstream.url, cache={"enabled": False})
    for _ in range(3):
        reply = call(relay)
        assert reply.status == 200 and reply.cache == "BYPASS"
    assert call(relay, None, path="/v1/models", method="GET").cache == "BYPASS"
    assert len(upstream.requests) == 4
    assert metric(relay, "relay_cache_hits_total") == 0


def test_no_cache_is_not_served_from_cache_but_stored(relay_factory, upstream):
    relay = relay_factory(upstream.url, cache=CACHE)
    fresh = call(relay, headers={"Cache-Control": "no-cache"})
    assert fresh.status == 200 and fresh.cache == "BYPASS"
    assert len(upstream.requests) == 1
    # stored: a normal request now hits
    assert call(relay).cache == "HIT"
    assert len(upstream.requests) == 1
    # ...but no-cache still goes upstream although the entry is there
    again = call(relay, headers={"Cache-Control": "no-cache"})
    assert again.cache == "BYPASS" and again.body == fresh.body
    # directives are case-insensitive and may come with others
    assert call(relay, headers={"Cache-Control": "max-age=0, No-Cache"}).cache == "BYPASS"
    assert len(upstream.requests) == 3


def test_no_store_is_bypassed_and_not_stored(relay_factory, upstream):
    relay = relay_factory(upstream.url, cache=CACHE)
    reply = call(relay, headers={"Cache-Control": "no-store"})
    assert reply.status == 200 and reply.cache == "BYPASS"
    assert call(relay).cache == "MISS"  # nothing was stored
    assert call(relay).cache == "HIT"
    # an existing entry is not served to a no-store request either
    assert call(relay, headers={"Cache-Control": "private, no-store"}).cache == "BYPASS"
    assert len(upstream.requests) == 3


def test_scope_api_key_never_shares_between_callers(relay_factory, upstream):
    relay = relay_factory(upstream.url, cache={**CACHE, "scope": "api_key"})
    assert call(relay, headers={"Authorization": KEY_A}).cache == "MISS"
    assert call(relay, headers={"Authorization": KEY_A}).cache == "HIT"
    assert call(relay, headers={"Authorization": KEY_B}).cache == "MISS"
    assert len(upstream.requests) == 2
    # x-api-key (Anthropic style) is a credential too
    assert call(relay, headers={"Authorization": None, "x-api-key": "sk-ant-one"}).cache == "MISS"
    assert call(relay, headers={"Authorization": None, "x-api-key": "sk-ant-two"}).cache == "MISS"
    assert call(relay, headers={"Authorization": None, "x-api-key": "sk-ant-one"}).cache == "HIT"
    # a caller without any credential does not get a keyed caller's entry
    assert call(relay, headers={"Authorization": None}).cache == "MISS"
    assert len(upstream.requests) == 5
    assert [r.header("authorization") for r in upstream.requests[:2]] == [KEY_A, KEY_B]


def test_scope_global_shares_between_callers(relay_factory, upstream):
    relay = relay_factory(upstream.url, cache={**CACHE, "scope": "global"})
    assert call(relay, headers={"Authorization": KEY_A}).cache == "MISS"
    assert call(relay, headers={"Authorization": KEY_B}).cache == "HIT"
    assert call(relay, headers={"Authorization": None, "x-api-key": "sk-ant"}).cache == "HIT"
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("status", [400, 404, 429, 500, 503])
def test_non_2xx_is_not_cached(relay_factory, upstream, status):
    relay = relay_factory(upstream.url, cache=CACHE)
    for _ in range(2):
        reply = call(relay, headers={"x-fake-status": str(status)})
        assert reply.status == status and reply.cache == "MISS"
    assert len(upstream.requests) == 2


def test_responses_over_max_body_bytes_are_not_cached(relay_factory, upstream):
    relay = relay_factory(upstream.url, cache={**CACHE, "max_body_bytes": 200})
    for body in (CHAT, stream_body()):  # a known length and a chunked stream
        upstream.reset_stats()
        first = call(relay, body)
        assert first.status == 200 and len(first.body) > 200
        second = call(relay, body)
        assert (first.cache, second.cache) == ("MISS", "MISS")
        assert second.body == first.body
        assert len(upstream.requests) == 2
    # the same responses are cached when the bound allows them
    big = relay_factory(upstream.url, cache={**CACHE, "max_body_bytes": 100000})
    for body in (CHAT, stream_body()):
        call(big, body)
        assert call(big, body).cache == "HIT"


def test_entries_expire_after_ttl(relay_factory, upstream):
    # A TTL long enough for the HIT to come in time on a busy machine; the
    # expiry side is exact whatever the load (time only moves on).
    relay = relay_factory(upstream.url, cache={**CACHE, "ttl": 2.0})
    assert call(relay).cache == "MISS"
    assert call(relay).cache == "HIT"
    time.sleep(2.1)
    assert call(relay).cache == "MISS"
    assert len(upstream.requests) == 2


def test_streamed_response_is_replayed_as_the_same_event_stream(relay_factory, upstream):
    relay = relay_factory(upstream.url, cache=CACHE)
    first = call(relay, stream_body())
    assert first.status == 200 and first.cache == "MISS"
    assert first.header("content-type").startswith("text/event-stream")
    assert first.body.count(b"data: ") >= 5 and first.body.endswith(b"data: [DONE]\n\n")
    second = call(relay, stream_body())
    assert second.cache == "HIT"
    assert second.header("content-type") == first.header("content-type")
    assert second.header("transfer-encoding") == "chunked"
    assert second.body == first.body
    assert len(upstream.requests) == 1
    # The usage chunk relay asked for is removed from the live and the
    # replayed stream alike.
    assert b'"usage"' not in first.body


def test_anthropic_stream_is_replayed_byte_for_byte(relay_factory, upstream):
    relay = relay_factory(upstream.url, cache=CACHE)
    body = {
        "model": "claude-3-5-haiku-latest",
        "max_tokens": 64,
        "stream": True,
        "messages": [{"role": "user", "content": "hello from the cache"}],
    }
    headers = {"Authorization": None, "x-api-key": "sk-ant", "anthropic-version": "2023-06-01"}
    first = call(relay, body, path="/v1/messages", headers=headers)
    second = call(relay, body, path="/v1/messages", headers=headers)
    assert (first.cache, second.cache) == ("MISS", "HIT")
    assert first.body.startswith(b"event: message_start")
    assert second.body == first.body
    assert len(upstream.requests) == 1


def test_openai_sdk_stream_from_cache_gives_the_same_chunks(relay_factory, upstream):
    relay = relay_factory(upstream.url, cache=CACHE)
    client = openai.OpenAI(base_url=relay.url + "/v1", api_key="sk-sdk", max_retries=0, timeout=10)
    kwargs = {"stream_options": {"include_usage": True}}

    def chunks() -> tuple[str | None, list[dict[str, Any]]]:
        raw = client.chat.completions.with_raw_response.create(**CHAT, stream=True, **kwargs)
        return raw.headers.get("x-relay-cache"), [c.model_dump() for c in raw.parse()]

    miss_state, missed = chunks()
    hit_state, hit = chunks()
    assert (miss_state, hit_state) == ("MISS", "HIT")
    assert hit == missed
    assert len(missed) >= 6 and missed[-1]["usage"] is not None
    assert len(upstream.requests) == 1


def _concurrent(n: int, fn: Callable[[], Reply]) -> list[Reply]:
    barrier = threading.Barrier(n)

    def run() -> Reply:
        barrier.wait(TIMEOUT)
        return fn()

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: run(), range(n)))


def test_concurrent_identical_misses_go_upstream_once(relay_factory, upstream):
    relay = relay_factory(upstream.url, cache=CACHE)
    replies = _concurrent(10, lambda: call(relay, headers={"x-fake-delay": "0.5"}))
    assert len(upstream.requests) == 1
    assert {r.status for r in replies} == {200}
    assert len({r.body for r in replies}) == 1
    states = sorted(r.cache for r in replies)
    assert states.count("MISS") == 1 and states.count("HIT") == 9
    assert call(relay).cache == "HIT"  # and it was stored


def test_concurrent_identical_streamed_misses_go_upstream_once(relay_factory, upstream):
    relay = relay_factory(upstream.url, cache=CACHE)
    replies = _concurrent(
        10, lambda: call(relay, stream_body(), headers={"x-fake-event-delay": "0.05"})
    )
    assert len(upstream.requests) == 1
    assert {r.status for r in replies} == {200}
    assert len({r.body for r in replies}) == 1
    assert all(r.header("content-type").startswith("text/event-stream") for r in replies)
    assert replies[0].body.endswith(b"data: [DONE]\n\n")
    assert call(relay, stream_body()).body == replies[0].body


def test_concurrent_stream_too_large_to_cache_still_reaches_every_caller(relay_factory, upstream):
    relay = relay_factory(upstream.url, cache={**CACHE, "max_body_bytes": 300})
    delayed = {"x-fake-delay": "0.3", "x-fake-event-delay": "0.05", "x-fake-events": "12"}
    replies = _concurrent(5, lambda: call(relay, stream_body(), headers=delayed))
    assert {r.status for r in replies} == {200}
    assert len({r.body for r in replies}) == 1
    assert len(replies[0].body) > 300 and replies[0].body.endswith(b"data: [DONE]\n\n")
    assert len(upstream.requests) == 1  # callers that started relaying keep going
    assert call(relay, stream_body()).cache == "MISS"  # too large: not stored


def test_concurrent_misses_are_coalesced_per_credential(relay_factory, upstream):
    relay = relay_factory(upstream.url, cache=CACHE)
    keys = iter([KEY_A, KEY_B] * 3)
    lock = threading.Lock()

    def one() -> Reply:
        with lock:
            key = next(keys)
        return call(relay, headers={"Authorization": key, "x-fake-delay": "0.3"})

    replies = _concurrent(6, one)
    assert {r.status for r in replies} == {200}
    assert sorted(r.header("authorization") for r in upstream.requests) == [KEY_A, KEY_B]


@pytest.mark.parametrize("fault", ["x-fake-truncate", "x-fake-reset-after"])
def test_broken_responses_are_not_cached(relay_factory, upstream, fault):
    relay = relay_factory(upstream.url, cache=CACHE)
    value = "1" if fault == "x-fake-truncate" else "60"
    for body in (CHAT, stream_body()):
        with pytest.raises((http.client.IncompleteRead, ConnectionError)):
            call(relay, body, headers={fault: value})
        clean = call(relay, body)  # fault headers are not part of the key
        assert clean.status == 200 and clean.cache == "MISS"
        assert call(relay, body).body == clean.body
    assert len(upstream.requests) == 4


def test_concurrent_misses_that_fail_are_not_shared(relay_factory, upstream):
    relay = relay_factory(upstream.url, cache=CACHE)
    replies = _concurrent(
        4, lambda: call(relay, headers={"x-fake-delay": "0.2", "x-fake-status": "500"})
    )
    assert {r.status for r in replies} == {500}
    assert len(upstream.requests) == 4  # each caller got its own answer
    assert all(r.cache == "MISS" for r in replies)


# --------------------------------------------------------------------------- #
# rate limiting
# --------------------------------------------------------------------------- #
SLOW = {"enabled": True, "requests_per_second": 0.01, "burst": 3}


def test_burst_then_429_with_headers_and_error_shape(relay_factory, upstream):
    relay = relay_factory(upstream.url, ratelimit={**SLOW, "key": "api_key"})
    for remaining in (2, 1, 0):
        reply = call(relay)
        assert reply.status == 200
        assert reply.header("x-ratelimit-limit") == "3"
        assert reply.header("x-ratelimit-remaining") == str(remaining)
    for _ in range(2):
        rejected = call(relay)
        error = assert_error_shape(rejected, 429)
        assert error["type"] == "rate_limit_error"
        assert retry_after(rejected) >= 1
        assert rejected.header("x-ratelimit-limit") == "3"
        assert rejected.header("x-ratelimit-remaining") == "0"
    assert len(upstream.requests) == 3
    assert metric(relay, "relay_ratelimit_rejected_total", '{key_type="api_key"}') == 2


def test_openai_sdk_sees_a_rate_limit_error(relay_factory, upstream):
    relay = relay_factory(upstream.url, ratelimit={**SLOW, "burst": 1})
    client = openai.OpenAI(base_url=relay.url + "/v1", api_key="sk-sdk", max_retries=0, timeout=10)
    client.chat.completions.create(**CHAT)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(**CHAT)
    assert info.value.code == "rate_limit_exceeded"


def test_api_key_buckets_are_separate(relay_factory, upstream):
    relay = relay_factory(upstream.url, ratelimit={**SLOW, "key": "api_key"})
    assert [call(relay, headers={"Authorization": KEY_A}).status for _ in range(4)] == [200] * 3 + [
        429
    ]
    assert [call(relay, headers={"Authorization": KEY_B}).status for _ in range(4)] == [200] * 3 + [
        429
    ]
    xkey = {"Authorization": None, "x-api-key": "sk-ant-c"}
    assert [call(relay, headers=xkey).status for _ in range(4)] == [200] * 3 + [429]
    assert metric(relay, "relay_ratelimit_rejected_total", '{key_type="api_key"}') == 3


def test_ip_buckets_are_per_client_address(relay_factory, upstream):
    relay = relay_factory(upstream.url, ratelimit={**SLOW, "key": "ip"})
    # Keys do not matter, the peer address does (X-Forwarded-For is ignored).
    statuses = [
        call(
            relay, headers={"Authorization": f"Bearer sk-{i}", "X-Forwarded-For": f"10.0.0.{i}"}
        ).status
        for i in range(4)
    ]
    assert statuses == [200, 200, 200, 429]
    other = [call(relay, source="127.0.0.2").status for _ in range(4)]
    assert other == [200, 200, 200, 429]
    assert metric(relay, "relay_ratelimit_rejected_total", '{key_type="ip"}') == 2


def test_global_bucket_is_shared_by_everyone(relay_factory, upstream):
    relay = relay_factory(upstream.url, ratelimit={**SLOW, "key": "global"})
    assert call(relay, headers={"Authorization": KEY_A}).status == 200
    assert call(relay, headers={"Authorization": KEY_B}).status == 200
    assert call(relay, source="127.0.0.2", headers={"Authorization": None}).status == 200
    rejected = call(relay, source="127.0.0.3", headers={"Authorization": "Bearer sk-new"})
    assert_error_shape(rejected, 429)
    assert metric(relay, "relay_ratelimit_rejected_total", '{key_type="global"}') == 1


def test_bucket_refills_over_time(relay_factory, upstream):
    relay = relay_factory(
        # A token per 2 s: three calls in a row never see one refill, even
        # on a busy machine.
        upstream.url, ratelimit={"enabled": True, "requests_per_second": 0.5, "burst": 2}
    )
    assert [call(relay).status for _ in range(3)] == [200, 200, 429]
    time.sleep(4.2)  # 2.1 tokens' worth, capped at the burst
    assert [call(relay).status for _ in range(3)] == [200, 200, 429]
    assert len(upstream.requests) == 4


def test_rejected_request_never_reaches_cache_or_upstream(relay_factory, upstream):
    relay = relay_factory(upstream.url, cache=CACHE, ratelimit={**SLOW, "burst": 1})
    assert call(relay).cache == "MISS"
    rejected = call(relay)
    assert rejected.status == 429
    assert len(upstream.requests) == 1
    assert metric(relay, "relay_cache_hits_total") == 0


# --------------------------------------------------------------------------- #
# circuit breaker
# --------------------------------------------------------------------------- #
def breaker(threshold: int = 3, recovery: float = 30.0) -> dict[str, Any]:
    return {"enabled": True, "failure_threshold": threshold, "recovery_timeout": recovery}


def gauge(relay: RelayThread, upstream_label: str) -> float:
    return metric(relay, "relay_circuit_breaker_state", f'{{upstream="{upstream_label}"}}')


def label_of(url: str) -> str:
    return url.split("://", 1)[1]


def fail(relay: RelayThread, n: int, status: int = 500) -> None:
    for _ in range(n):
        assert call(relay, headers={"x-fake-status": str(status)}).status == status


def test_consecutive_5xx_open_the_breaker(relay_factory, upstream):
    relay = relay_factory(upstream.url, circuit_breaker=breaker(3))
    label = label_of(upstream.url)
    assert call(relay).status == 200
    assert gauge(relay, label) == 0
    fail(relay, 3, 500)
    assert gauge(relay, label) == 2
    seen, opened = len(upstream.requests), upstream.connections_opened
    started = time.monotonic()
    rejected = call(relay)
    assert time.monotonic() - started < 1.0
    error = assert_error_shape(rejected, 503)
    assert error["code"] == "circuit_breaker_open"
    assert 1 <= retry_after(rejected) <= 30
    for _ in range(3):
        assert call(relay, headers={"x-fake-delay": "2"}).status == 503
    assert len(upstream.requests) == seen  # nothing reached the upstream
    assert upstream.connections_opened == opened


def test_successes_and_4xx_do_not_count_as_failures(relay_factory, upstream):
    relay = relay_factory(upstream.url, circuit_breaker=breaker(2))
    fail(relay, 10, 400)
    fail(relay, 3, 429)
    fail(relay, 1, 404)
    assert call(relay).status == 200
    # failures must be consecutive: a success in between starts over
    fail(relay, 1, 502)
    assert call(relay).status == 200
    fail(relay, 1, 503)
    assert call(relay).status == 200
    assert gauge(relay, label_of(upstream.url)) == 0


def test_connect_errors_open_the_breaker(relay_factory):
    dead = f"http://127.0.0.1:{free_port()}"
    relay = relay_factory(dead, circuit_breaker=breaker(2))
    for _ in range(2):
        assert_error_shape(call(relay), 502)
    error = assert_error_shape(call(relay), 503)
    assert error["code"] == "circuit_breaker_open"
    assert gauge(relay, label_of(dead)) == 2
    ready = call(relay, None, path="/readyz", method="GET")
    assert ready.status == 503 and ready.json()["reason"]


def test_half_open_lets_one_probe_through_and_success_closes(relay_factory, upstream):
    # Recovery and the probe's delay are long enough for the calls between
    # them to come in time on a busy machine.
    relay = relay_factory(upstream.url, circuit_breaker=breaker(2, recovery=2.0))
    label = label_of(upstream.url)
    fail(relay, 2)
    assert call(relay).status == 503
    time.sleep(2.1)
    upstream.reset_stats()
    # The probe is slow; everyone arriving while it is out still gets 503.
    with ThreadPoolExecutor(1) as pool:
        probe = pool.submit(call, relay, headers={"x-fake-delay": "5.0"})
        wait_until(lambda: len(upstream.requests) == 1)
        assert gauge(relay, label) == 1
        during = [call(relay) for _ in range(3)]
        assert [r.status for r in during] == [503] * 3
        assert all(retry_after(r) >= 1 for r in during)
        assert probe.result(TIMEOUT).status == 200
    assert len(upstream.requests) == 1
    assert gauge(relay, label) == 0
    assert [call(relay).status for _ in range(3)] == [200] * 3
    assert call(relay, None, path="/readyz", method="GET").status == 200


def test_half_open_failure_opens_again(relay_factory, upstream):
    relay = relay_factory(upstream.url, circuit_breaker=breaker(2, recovery=2.0))
    label = label_of(upstream.url)
    fail(relay, 2)
    time.sleep(2.1)
    fail(relay, 1)  # the probe fails...
    assert gauge(relay, label) == 2
    seen = len(upstream.requests)
    assert call(relay).status == 503  # ...so it is open again, timer restarted
    assert len(upstream.requests) == seen
    time.sleep(2.1)
    assert call(relay).status == 200
    assert gauge(relay, label) == 0


def test_readyz_only_fails_when_every_upstream_is_open(relay_factory, upstream):
    dead = f"http://127.0.0.1:{free_port()}"
    relay = relay_factory(
        upstream.url,
        circuit_breaker=breaker(1),
        routes=[{"path": "/v1/dead", "target": dead}],
    )
    ok = call(relay, None, path="/readyz", method="GET")
    assert ok.status == 200 and ok.json()["status"] == "ready"
    assert call(relay, path="/v1/dead").status == 502
    assert call(relay, path="/v1/dead").status == 503
    assert call(relay).status == 200  # the other upstream is unaffected
    assert call(relay, None, path="/readyz", method="GET").status == 200
    fail(relay, 1)
    not_ready = call(relay, None, path="/readyz", method="GET")
    assert not_ready.status == 503
    assert not_ready.header("content-type").startswith("application/json")
    assert "breaker" in not_ready.json()["reason"]
    assert gauge(relay, label_of(upstream.url)) == 2
    assert gauge(relay, label_of(dead)) == 2


def test_readyz_recovers_once_a_probe_would_be_allowed(relay_factory, upstream):
    # Nothing else sends traffic to a relay that says it is not ready (a load
    # balancer takes it out), so readiness must not wait for a probe request.
    relay = relay_factory(upstream.url, circuit_breaker=breaker(1, recovery=2.0))
    fail(relay, 1)
    assert call(relay, None, path="/readyz", method="GET").status == 503
    time.sleep(2.1)
    assert call(relay, None, path="/readyz", method="GET").status == 200
    assert call(relay).status == 200


def test_timeouts_resets_and_garbage_are_failures(relay_factory, upstream):
    relay = relay_factory(upstream.url, circuit_breaker=breaker(3), proxy={"read_timeout": 0.3})
    assert_error_shape(call(relay, headers={"x-fake-silence": "1"}), 504)
    assert_error_shape(call(relay, headers={"x-fake-garbage": "1"}), 502)
    with pytest.raises(http.client.IncompleteRead):  # the stream is cut
        call(relay, stream_body(), headers={"x-fake-reset-after": "40"})
    seen = len(upstream.requests)
    assert_error_shape(call(relay), 503)
    assert len(upstream.requests) == seen


def test_disabled_breaker_always_forwards(relay_factory, upstream):
    relay = relay_factory(upstream.url, circuit_breaker={"enabled": False, "failure_threshold": 1})
    fail(relay, 5)
    assert call(relay).status == 200
    assert len(upstream.requests) == 6
    assert call(relay, None, path="/readyz", method="GET").status == 200


# --------------------------------------------------------------------------- #
# each feature switched off on its own
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("off", ["cache", "ratelimit", "circuit_breaker"])
def test_each_feature_can_be_disabled_on_its_own(relay_factory, upstream, off):
    sections: dict[str, dict[str, Any]] = {
        "cache": dict(CACHE),
        "ratelimit": {**SLOW, "burst": 4},
        "circuit_breaker": breaker(1),
    }
    sections[off] = {**sections[off], "enabled": False}
    relay = relay_factory(upstream.url, **sections)

    first, second = call(relay), call(relay)
    if off == "cache":
        assert (first.cache, second.cache) == ("BYPASS", "BYPASS")
    else:
        assert (first.cache, second.cache) == ("MISS", "HIT")
    if off == "ratelimit":
        assert first.header("x-ratelimit-limit") is None
    else:
        assert (first.header("x-ratelimit-limit"), second.header("x-ratelimit-remaining")) == (
            "4",
            "2",
        )

    # fault headers are not part of the cache key: no-cache reaches upstream
    assert call(relay, headers={"x-fake-status": "500", "Cache-Control": "no-cache"}).status == 500
    after = call(relay, headers={"Cache-Control": "no-cache"})
    if off == "circuit_breaker":
        assert after.status == 200
    else:
        assert after.status == 503

    # a fifth request: rejected only if the limiter is on
    assert call(relay).status == (200 if off == "ratelimit" else 429)


def test_coalesced_followers_finish_when_the_leaders_client_leaves(relay_factory, upstream):
    relay = relay_factory(upstream.url, cache=CACHE)
    body = json.dumps(stream_body()).encode()
    # Slow enough that the stream is still running once the followers have
    # joined (however long they take to connect): it lasts ~3.5 s.
    slow = {"x-fake-event-delay": "0.5"}
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: relay\r\nAuthorization: %s\r\n"
        b"x-fake-event-delay: 0.5\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % (KEY_A.encode(), len(body))
    )
    coalescer = relay.gateway.runtime.coalescer

    def flights() -> list[tuple[int, bool]]:
        """(followers joined, still streaming) of each flight in progress."""
        return relay.call(lambda: [
            (flight.joined, flight.state == OPEN) for flight in coalescer._flights.values()
        ])

    leader = socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT)
    try:
        leader.sendall(head + body)
        wait_until(lambda: len(upstream.requests) == 1, timeout=30.0)
        received = b""
        while b"data: " not in received:  # the stream has begun...
            data = leader.recv(65536)
            assert data, "relay closed the leader's stream"
            received += data
        with ThreadPoolExecutor(3) as pool:
            followers = [pool.submit(call, relay, stream_body(), headers=slow) for _ in range(3)]
            # Relay drops a flight nobody follows when its client leaves, so
            # the followers must have joined this one before the leader goes.
            wait_until(lambda: flights() == [(3, True)], timeout=30.0)
            leader.close()  # ...and the leader's client goes away mid-stream
            replies = [f.result(60.0) for f in followers]
    finally:
        leader.close()
    assert len(upstream.requests) == 1
    reference = call(relay, stream_body(), headers={"Cache-Control": "no-cache"})
    for reply in replies:
        assert reply.status == 200 and reply.cache == "HIT"
        assert reply.body == reference.body
    # the response the followers got complete is cached as well
    assert call(relay, stream_body()).cache == "HIT"


def test_relay_behind_relay_sends_one_cache_header(relay_factory, upstream):
    inner = relay_factory(upstream.url, cache=CACHE)
    outer = relay_factory(inner.url, cache={"enabled": False})
    for expected in ("BYPASS", "BYPASS"):
        conn = http.client.HTTPConnection("127.0.0.1", outer.port, timeout=TIMEOUT)
        try:
            conn.request("POST", CHAT_PATH, body=json.dumps(CHAT), headers={"Authorization": KEY_A})
            resp = conn.getresponse()
            resp.read()
            values = [v for k, v in resp.getheaders() if k.lower() == "x-relay-cache"]
        finally:
            conn.close()
        assert values == [expected]  # the outer relay's verdict, not the inner's too
    assert len(upstream.requests) == 1  # the inner relay served the second from its cache
