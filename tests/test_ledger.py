from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from relay.accounting.ledger import ANONYMOUS, OTHER, RedisUsageLedger, UsageLedger, usage_keys
from relay.accounting.usage import Usage

ZERO = {
    "requests": 0,
    "estimated_requests": 0,
    "prompt_tokens": 0,
    "completion_tokens": 0,
    "cached_tokens": 0,
    "cost_usd": 0.0,
    "cache_hits": 0,
    "saved_usd": 0.0,
}


def row(**values: float) -> dict:
    return {**ZERO, **values}


def fill(ledger_record) -> list:
    """The same sequence of records for both ledgers; returns awaitables/None."""
    return [
        ledger_record("gpt-4o", "k1", Usage("gpt-4o-2024-08-06", 1200, 30, 1024), 0.00202),
        ledger_record("gpt-4o", "k2", Usage("gpt-4o", 10, 5, 0, True), 0.000075),
        ledger_record("claude-3", "k1", Usage("claude-3", 115, 12, 100), 0.000255),
        # A cache hit: saved cost, its tokens not paid (nor counted) again.
        ledger_record("gpt-4o", "k1", Usage("gpt-4o", 1200, 30, 1024), 0.0, 0.00202, True),
        ledger_record("gpt-4o", "", Usage("gpt-4o", 1, 1), 0.0),
    ]


EXPECTED_MODELS = {
    "gpt-4o": row(
        requests=3,
        estimated_requests=1,
        prompt_tokens=1211,
        completion_tokens=36,
        cached_tokens=1024,
        cost_usd=0.00202 + 0.000075,
        cache_hits=1,
        saved_usd=0.00202,
    ),
    "claude-3": row(
        requests=1, prompt_tokens=115, completion_tokens=12, cached_tokens=100, cost_usd=0.000255
    ),
}
EXPECTED_KEYS = {
    "k1": row(
        requests=2,
        prompt_tokens=1315,
        completion_tokens=42,
        cached_tokens=1124,
        cost_usd=0.00202 + 0.000255,
        cache_hits=1,
        saved_usd=0.00202,
    ),
    "k2": row(
        requests=1, estimated_requests=1, prompt_tokens=10, completion_tokens=5, cost_usd=0.000075
    ),
    ANONYMOUS: row(requests=1, prompt_tokens=1, completion_tokens=1),
}
EXPECTED_TOTALS = row(
    requests=4,
    estimated_requests=1,
    prompt_tokens=1326,
    completion_tokens=48,
    cached_tokens=1124,
    cost_usd=0.00202 + 0.000075 + 0.000255,
    cache_hits=1,
    saved_usd=0.00202,
)


def assert_rows_equal(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for name, exp in expected.items():
        got = actual[name]
        assert set(got) == set(exp), name
        for field, value in exp.items():
            if isinstance(value, float):
                assert abs(got[field] - value) < 1e-12, (name, field)
            else:
                assert got[field] == value and isinstance(got[field], int), (name, field)


def assert_snapshot(snap: dict) -> None:
    assert_rows_equal(snap["models"], EXPECTED_MODELS)
    assert_rows_equal(snap["keys"], EXPECTED_KEYS)
    assert_rows_equal({"t": snap["totals"]}, {"t": EXPECTED_TOTALS})
    assert snap["since"].endswith("Z") and "T" in snap["since"]
    json.dumps(snap)  # JSON-ready


# -- memory ------------------------------------------------------------------------


def test_memory_ledger() -> None:
    ledger = UsageLedger(now=0.0)
    fill(ledger.record)
    snap = ledger.snapshot()
    assert_snapshot(snap)
    assert snap["since"] == "1970-01-01T00:00:00Z"


def test_memory_snapshot_is_a_copy() -> None:
    ledger = UsageLedger()
    ledger.record("m", "k", Usage("m", 1, 1), 0.1)
    snap = ledger.snapshot()
    snap["totals"]["requests"] = 99
    snap["models"]["m"]["requests"] = 99
    assert ledger.snapshot()["totals"]["requests"] == 1
    assert ledger.snapshot()["models"]["m"]["requests"] == 1


def test_memory_key_bound() -> None:
    ledger = UsageLedger(max_keys=3)
    for i in range(10):
        ledger.record("m", f"k{i}", Usage("m", 1, 0), 0.0)
    ledger.record("m", "k0", Usage("m", 1, 0), 0.0)  # known key keeps its row
    keys = ledger.snapshot()["keys"]
    assert set(keys) == {"k0", "k1", "k2", OTHER}
    assert keys["k0"]["requests"] == 2 and keys[OTHER]["requests"] == 7


# -- redis -------------------------------------------------------------------------


def _redis_binary() -> str:
    path = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None
    )
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server binary not found (CI is set)")
        pytest.skip("redis-server binary not found")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def redis_port() -> Iterator[int]:
    binary = _redis_binary()
    port = _free_port()
    with tempfile.TemporaryDirectory() as workdir:
        proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                workdir,
            ],  # fmt: skip
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                        s.sendall(b"PING\r\n")
                        if s.recv(16).startswith(b"+PONG"):
                            break
                except OSError:
                    pass
                assert proc.poll() is None, "redis-server exited"
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.02)
            yield port
        finally:
            proc.terminate()
            proc.wait(10)


# Generous: on a busy machine a Redis round trip can take far longer than
# the production deadline; these tests check outcomes, not speed.
CALL_TIMEOUT = 30.0


def run(coro):
    return asyncio.run(coro)


async def _client(port: int) -> aioredis.Redis:
    client = aioredis.Redis(host="127.0.0.1", port=port, socket_timeout=CALL_TIMEOUT)
    await client.flushall()
    return client


@pytest.mark.redis
def test_redis_ledger_matches_memory(redis_port: int) -> None:
    async def main() -> dict:
        client = await _client(redis_port)
        try:
            ledger = RedisUsageLedger(client, prefix="t1", timeout=CALL_TIMEOUT)
            for pending in fill(ledger.record):
                await pending
            return await ledger.snapshot()
        finally:
            await client.aclose()

    assert_snapshot(run(main()))


@pytest.mark.redis
def test_redis_ledger_adds_up_across_instances_and_restarts(redis_port: int) -> None:
    async def main() -> tuple[dict, dict]:
        client_a = await _client(redis_port)
        client_b = aioredis.Redis(host="127.0.0.1", port=redis_port, socket_timeout=CALL_TIMEOUT)
        try:
            a = RedisUsageLedger(client_a, prefix="t2", timeout=CALL_TIMEOUT)
            b = RedisUsageLedger(client_b, prefix="t2", timeout=CALL_TIMEOUT)
            await asyncio.gather(
                *(x.record("m", "k", Usage("m", 10, 1), 0.001) for x in [a, b] * 50)
            )
            first = await a.snapshot()
            # a new instance (as after a restart) sees and continues the totals
            c = RedisUsageLedger(client_b, prefix="t2", timeout=CALL_TIMEOUT)
            await c.record("m", "k", Usage("m", 10, 1), 0.001)
            return first, await c.snapshot()
        finally:
            await client_a.aclose()
            await client_b.aclose()

    first, second = run(main())
    assert first["totals"]["requests"] == 100 and first["totals"]["prompt_tokens"] == 1000
    assert abs(first["totals"]["cost_usd"] - 0.1) < 1e-12
    assert second["models"]["m"]["requests"] == 101
    assert second["since"] == first["since"]


@pytest.mark.redis
def test_redis_ledger_key_bound(redis_port: int) -> None:
    async def main() -> dict:
        client = await _client(redis_port)
        try:
            ledger = RedisUsageLedger(client, prefix="t3", max_keys=2, timeout=CALL_TIMEOUT)
            for i in range(5):
                await ledger.record("m", f"k{i}", Usage("m", 1, 0), 0.0)
            other_instance = RedisUsageLedger(client, prefix="t3", max_keys=2, timeout=CALL_TIMEOUT)
            await other_instance.record("m", "k9", Usage("m", 1, 0), 0.0)
            await other_instance.record("m", "k1", Usage("m", 1, 0), 0.0)
            return await ledger.snapshot()
        finally:
            await client.aclose()

    keys = run(main())["keys"]
    assert set(keys) == {"k0", "k1", OTHER}
    assert keys[OTHER]["requests"] == 4 and keys["k1"]["requests"] == 2


@pytest.mark.redis
def test_redis_empty_snapshot(redis_port: int) -> None:
    async def main() -> dict:
        client = await _client(redis_port)
        try:
            return await RedisUsageLedger(client, prefix="t4", timeout=CALL_TIMEOUT).snapshot()
        finally:
            await client.aclose()

    snap = run(main())
    assert snap["totals"] == ZERO and snap["models"] == {} and snap["keys"] == {}


def test_redis_errors_propagate() -> None:
    async def main() -> None:
        # nothing listens there: the error must reach the caller (who falls back)
        client = aioredis.Redis(
            host="127.0.0.1",
            port=_free_port(),
            socket_connect_timeout=0.5,
            retry=Retry(NoBackoff(), 0),  # no retries: the caller decides
        )
        try:
            ledger = RedisUsageLedger(client, prefix="t5", timeout=2)
            with pytest.raises((aioredis.ConnectionError, OSError)):
                await ledger.record("m", "k", Usage("m", 1, 1), 0.0)
            with pytest.raises((aioredis.ConnectionError, OSError)):
                await ledger.snapshot()
        finally:
            await client.aclose()

    run(main())


def test_redis_timeout_bounds_the_call() -> None:
    async def main() -> float:
        # a server that accepts and never answers
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = aioredis.Redis(host="127.0.0.1", port=port)
        ledger = RedisUsageLedger(client, prefix="t6", timeout=0.2)
        start = time.monotonic()
        try:
            with pytest.raises(TimeoutError):
                await ledger.record("m", "k", Usage("m", 1, 1), 0.0)
            return time.monotonic() - start
        finally:
            await client.aclose()
            server.close()

    assert run(main()) < 5


@pytest.mark.redis
def test_redis_ledger_with_runner(redis_port: int) -> None:
    calls: list[object] = []

    async def runner(fn):
        calls.append(fn)
        return await fn()

    async def main() -> dict:
        client = await _client(redis_port)
        try:
            ledger = RedisUsageLedger(client, prefix="t7", runner=runner)
            await ledger.record("m", "k", Usage("m", 3, 4, 1), 0.5)
            await ledger.record("m", "k", Usage("m", 3, 4, 1), 0.5)
            return await ledger.snapshot()
        finally:
            await client.aclose()

    snap = run(main())
    assert snap["keys"]["k"] == row(
        requests=2, prompt_tokens=6, completion_tokens=8, cached_tokens=2, cost_usd=1.0
    )
    # one script call per record (key bound included), one for the snapshot
    assert len(calls) == 3


def test_usage_keys_share_one_hash_slot() -> None:
    # Redis Cluster runs a script only when all its KEYS hash to one slot.
    keys = usage_keys()
    names = [keys.totals, keys.models, keys.keys, keys.keyset, keys.since, keys.writer("w1")]
    assert all(name.startswith("relay:{usage}:") for name in names)
    assert len(set(names)) == len(names)


@pytest.mark.redis
def test_redis_batch_applies_once_per_number(redis_port: int) -> None:
    async def main() -> tuple[list[bool], dict]:
        client = await _client(redis_port)
        try:
            ledger = RedisUsageLedger(client, prefix="t8", timeout=CALL_TIMEOUT)
            batch = UsageLedger()
            fill(batch.record)
            applied = [
                await ledger.add(batch, "writer-a", 1),
                await ledger.add(batch, "writer-a", 1),  # resent: already there
                await ledger.add(batch, "writer-b", 1),  # another writer's own numbers
                await ledger.add(UsageLedger(), "writer-a", 1),
            ]
            return applied, await ledger.snapshot()
        finally:
            await client.aclose()

    applied, snap = run(main())
    assert applied == [True, False, True, False]
    assert snap["totals"]["requests"] == 2 * EXPECTED_TOTALS["requests"]
    assert snap["keys"]["k2"]["requests"] == 2
