"""Micro-benchmark of a cache hit with every feature on, in process.

One keep-alive client connection of a real :class:`~relay.app.Gateway`
(memory cache, memory rate limiter, breaker, metrics, usage) gets the SDK
chat request of ``bench_hotpath.py`` and answers it from the cache: bytes
in, the response handed to the transport, the hit counted. No sockets, so
the figure is relay's own Python and C per hit, without the kernel's
share. The same with virtual keys on (SQLite store, one key with limits
that never trip) shows what admission and its settle add to a hit, and
the admission-and-settle benchmark what they add to a miss. Run with ``python -m benchmarks.run --micro`` (or ``pytest benchmarks``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import tempfile
import time
from collections.abc import Iterator

import pytest
import uvloop

from relay import _fast
from relay.accounting.usage import Usage
from relay.app import Gateway
from relay.config import load_config
from relay.features.cache import CacheEntry
from relay.http.request import Request

from .bench_hotpath import CHAT_BODY, COMPLETION, SDK_REQUEST, _Transport

CONFIG = """\
proxy: {target: "http://127.0.0.1:9", pool_size: 64}
cache: {enabled: true, ttl: 3600, max_entries: 10000, scope: api_key}
ratelimit: {enabled: true, requests_per_second: 1000000000, burst: 1000000000, key: api_key}
circuit_breaker: {enabled: true}
redis: {enabled: false}
models:
  gpt-4o: {input: 0.0025, output: 0.01, cached_input: 0.00125}
"""
CREDENTIAL = b"sk-proj-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJ"
# The headers an OpenAI completion is stored with (usage kept beside them).
STORED_HEADERS = (
    (b"Date", b"Wed, 01 Jan 2025 00:00:00 GMT"),
    (b"Content-Type", b"application/json"),
    (b"openai-organization", b"user-bench"),
    (b"openai-processing-ms", b"412"),
    (b"openai-version", b"2020-10-01"),
    (b"x-request-id", b"req_0123456789abcdef0123456789abcdef"),
    (b"x-relay-usage", b"38,21,0,0,gpt-4o-2024-08-06"),
)


class _Recording(_Transport):
    def __init__(self) -> None:
        self.writes = 0
        self.last = b""

    def writelines(self, list_of_data: object) -> None:
        self.writes += 1
        self.last = b"".join(list_of_data)  # type: ignore[arg-type]


VIRTUAL_KEY = b"rk-bench0123456789abcdefghijklmnopqrstuvwxyz"


def _gateway(text: str) -> Iterator[Gateway]:
    loop = uvloop.new_event_loop()
    fd, path = tempfile.mkstemp(suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    try:
        config = dataclasses.replace(load_config(path, env={}), source=None)
    finally:
        os.unlink(path)
    gateway = Gateway(config, loop)
    loop.run_until_complete(gateway.runtime.settled())
    yield gateway
    loop.run_until_complete(gateway.runtime.close())
    loop.close()


@pytest.fixture(scope="module")
def gateway() -> Iterator[Gateway]:
    yield from _gateway(CONFIG)


@pytest.fixture(scope="module")
def gateway_with_keys() -> Iterator[Gateway]:
    digest = hashlib.sha256(VIRTUAL_KEY).hexdigest()
    with tempfile.TemporaryDirectory() as store:
        yield from _gateway(CONFIG + f"""\
keys:
  enabled: true
  path: "{os.path.join(store, 'keys.db')}"
  static:
    - {{id: bench, name: bench, secret_sha256: "{digest}", budget_usd: 1000000000,
       rpm: 1000000000, tpm: 1000000000000}}
""")


@pytest.mark.benchmark(group="cache hit: SDK chat request answered from memory, every feature on")
def test_cache_hit(benchmark, gateway: Gateway) -> None:
    key = _fast.cache_key(b"POST", b"/v1/chat/completions", CHAT_BODY, CREDENTIAL, b"")
    entry = CacheEntry(200, STORED_HEADERS, COMPLETION, False, time.time())
    gateway.pipeline._cache.set_nowait(key, entry)
    conn = gateway.server._make_protocol()
    transport = _Recording()
    conn.connection_made(transport)

    benchmark(conn.data_received, SDK_REQUEST)

    assert transport.writes >= 1 and not conn.busy  # answered at once, no task left
    assert b"\r\nX-Relay-Cache: HIT\r\n" in transport.last
    assert transport.last.endswith(b"\r\n\r\n" + COMPLETION)
    conn.connection_lost(None)


@pytest.mark.benchmark(group="cache hit: SDK chat request answered from memory, every feature on")
def test_cache_hit_with_virtual_key(benchmark, gateway_with_keys: Gateway) -> None:
    gateway = gateway_with_keys
    loop = gateway.runtime.loop
    request = SDK_REQUEST.replace(CREDENTIAL, VIRTUAL_KEY)
    key = _fast.cache_key(b"POST", b"/v1/chat/completions", CHAT_BODY, b"relay-key:bench", b"")
    entry = CacheEntry(200, STORED_HEADERS, COMPLETION, False, time.time())
    gateway.pipeline._cache.set_nowait(key, entry)
    conn = gateway.server._make_protocol()
    transport = _Recording()
    conn.connection_made(transport)

    async def answered() -> None:
        for _ in range(10000):
            if not conn.busy:
                return
            await asyncio.sleep(0.001)

    # The first request finds the key through the store and reserves its
    # first allowance; after it the key's requests are admitted at once.
    # When an allowance is spent before the next one came (the loop runs
    # only here), the request waits for it as it would under load.
    loop.run_until_complete(answered())
    conn.data_received(request)
    loop.run_until_complete(answered())

    def one_hit() -> None:
        conn.data_received(request)
        if conn.busy:
            loop.run_until_complete(answered())

    benchmark(one_hit)

    assert transport.writes >= 1 and not conn.busy
    assert b"\r\nX-Relay-Cache: HIT\r\n" in transport.last
    assert transport.last.endswith(b"\r\n\r\n" + COMPLETION)
    conn.connection_lost(None)


@pytest.mark.benchmark(group="virtual key: admission and settle of one request, no I/O")
def test_key_admission_and_settle(benchmark, gateway_with_keys: Gateway) -> None:
    """What a keyed miss adds in admission and its settle: the key from the
    process cache, the estimate drawn from the allowance, then the exact
    usage and cost settled and the finish hook run (a no-op by then)."""
    gateway = gateway_with_keys
    loop = gateway.runtime.loop
    admission = gateway.pipeline._admission
    assert admission is not None
    usage = Usage(prompt_tokens=38, completion_tokens=21, model="gpt-4o")

    def request() -> Request:
        made = Request(b"POST", b"/v1/chat/completions", [], CHAT_BODY, True, 1, "127.0.0.1", 0.0)
        made.authorization = b"Bearer " + VIRTUAL_KEY
        made.facts()  # scanned anyway by the cache key and routing before admission
        return made

    # The first request finds the key through the store and its first allowance.
    loop.run_until_complete(admission.admit(request())).settle(None, 0.0)

    def one_request() -> None:
        ticket = admission.admit_now(request())
        if ticket is None:  # the allowance is renewed through the store, as under load
            ticket = loop.run_until_complete(admission.admit(request()))
        ticket.settle(usage, 0.000305)
        ticket.release()

    benchmark(one_request)
    assert admission.service._allowances  # drawn from the process's allowance
