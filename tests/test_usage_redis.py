"""Usage totals in Redis are exact across Redis trouble: nothing recorded is
lost, nothing is counted twice.

Two ways it used to go wrong, each driven here through a real relay and a
real redis-server:

* a reply lost after Redis had applied the write (a timeout after the
  server's work was done): the totals were kept a second time in memory;
* totals recorded in memory while Redis was down vanished from
  ``/relay/usage`` once it came back.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from relay.accounting.ledger import usage_keys
from relay.testing import ThreadedFakeUpstream
from tests.redis_server import RedisServer
from tests.support import RelayThread, make_config
from tests.test_features import CHAT, KEY_A, KEY_B, call, metric

pytestmark = pytest.mark.redis

KEYS = usage_keys()
PRICE = {"input": 0.001, "output": 0.002}


class ReplyDropper:
    """A TCP proxy in front of Redis. Armed, it passes the next request that
    contains ``marker`` on to Redis (which executes it) and swallows every
    reply on that connection from then on: the client's call times out
    although the server did the work. The default marker is a counter name,
    present in every usage write and in no read."""

    def __init__(self, target_port: int, marker: bytes = b"prompt_tokens") -> None:
        self.target_port = target_port
        self.marker = marker
        self.seen = 0  # requests containing the marker, passed on
        self.dropped = threading.Event()
        self._armed = False
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, daemon=True)
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def arm(self) -> None:
        self._armed = True

    def __enter__(self) -> ReplyDropper:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0)
        )
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        swallow = False

        async def to_redis() -> None:
            nonlocal swallow
            while data := await reader.read(65536):
                if self.marker in data:
                    self.seen += 1
                    if self._armed:
                        self._armed = False
                        swallow = True  # set before Redis can answer
                        self.dropped.set()
                up_writer.write(data)
                await up_writer.drain()
            up_writer.close()

        async def to_client() -> None:
            while data := await up_reader.read(65536):
                if not swallow:
                    writer.write(data)
                    await writer.drain()
            writer.close()

        try:
            await asyncio.gather(to_redis(), to_client())
        except OSError:
            pass
        finally:
            writer.close()
            up_writer.close()


@pytest.fixture
def upstream(fake_upstream: ThreadedFakeUpstream) -> ThreadedFakeUpstream:
    return fake_upstream


def relay_config(upstream: ThreadedFakeUpstream, redis_address: str) -> Any:
    return make_config(
        upstream.url,
        circuit_breaker={"enabled": False},
        server={"shutdown_timeout": 1},
        models={"gpt-4o-mini": PRICE},
        # A normal call never comes near this on a busy machine; a swallowed
        # reply waits it out.
        redis={"enabled": True, "address": redis_address, "timeout": 2.0},
    )


def usage(relay: RelayThread) -> dict[str, Any]:
    reply = call(relay, None, path="/relay/usage", method="GET")
    assert reply.status == 200
    return json.loads(reply.body)


def wait_for(check: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)


def one_request_usage(relay: RelayThread, key: str) -> tuple[int, int]:
    reply = call(relay, CHAT, headers={"Authorization": key})
    assert reply.status == 200, reply.body
    body = reply.json()["usage"]
    return body["prompt_tokens"], body["completion_tokens"]


def redis_requests(admin: redis.Redis) -> int:
    return int(admin.hget(KEYS.totals, "requests") or 0)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    # Append-only file: a stopped and restarted server keeps its data, as a
    # production Redis does.
    with RedisServer(extra_args=("--appendonly", "yes")) as server:
        yield server


def test_a_write_applied_before_its_reply_was_lost_counts_once(redis_server, upstream):
    admin = redis.Redis(port=redis_server.port, socket_timeout=10)
    with ReplyDropper(redis_server.port) as proxy:
        relay = RelayThread(relay_config(upstream, proxy.address))
        relay.start()
        try:
            prompt, completion = one_request_usage(relay, KEY_A)
            wait_for(lambda: redis_requests(admin) == 1, "first request in Redis")
            sent_before = proxy.seen

            proxy.arm()
            one_request_usage(relay, KEY_A)
            assert proxy.dropped.wait(20)
            # Redis did the work: the request is counted there already.
            wait_for(lambda: redis_requests(admin) == 2, "second request in Redis")
            # relay saw a timeout, kept the batch, and sends it again once
            # Redis answers; the script recognizes it and adds nothing.
            wait_for(lambda: proxy.seen >= sent_before + 2, "the batch sent again")
            snap = wait_for(
                lambda: (s := usage(relay))["backend"] == "redis" and s, "usage from Redis"
            )
            assert metric(relay, "relay_redis_errors_total") >= 1
            assert snap["totals"]["requests"] == 2
            assert snap["totals"]["prompt_tokens"] == 2 * prompt
            assert snap["totals"]["completion_tokens"] == 2 * completion
            assert redis_requests(admin) == 2
            assert int(admin.hget(KEYS.totals, "prompt_tokens")) == 2 * prompt

            # Nothing of it stayed behind in memory either: with Redis gone,
            # this process has nothing Redis has not confirmed.
            redis_server.stop()
            snap = wait_for(
                lambda: (s := usage(relay))["backend"] == "memory" and s, "memory view"
            )
            assert snap["totals"]["requests"] == 0
        finally:
            relay.stop()
            admin.close()


def test_usage_recorded_during_an_outage_reaches_redis_once(redis_server, upstream):
    admin = redis.Redis(port=redis_server.port, socket_timeout=10)
    relay = RelayThread(relay_config(upstream, redis_server.address), loop="asyncio")
    relay.start()
    try:
        per_request = [one_request_usage(relay, KEY_A) for _ in range(3)]
        wait_for(lambda: redis_requests(admin) == 3, "requests in Redis")

        redis_server.stop()
        per_request += [one_request_usage(relay, KEY_B) for _ in range(4)]
        snap = usage(relay)
        assert snap["backend"] == "memory"
        assert snap["totals"]["requests"] == 4  # what Redis does not have yet

        redis_server.start()  # same port, data kept
        expected_prompt = sum(p for p, _ in per_request)
        expected_completion = sum(c for _, c in per_request)
        snap = wait_for(
            lambda: (s := usage(relay))["backend"] == "redis" and s, "usage from Redis again"
        )
        totals = snap["totals"]
        assert totals["requests"] == 7
        assert totals["prompt_tokens"] == expected_prompt
        assert totals["completion_tokens"] == expected_completion
        expected_cost = (expected_prompt * PRICE["input"] + expected_completion * PRICE["output"]) / 1000
        assert abs(totals["cost_usd"] - expected_cost) < 1e-12
        assert sorted(row["requests"] for row in snap["keys"].values()) == [3, 4]
        assert snap["models"]["gpt-4o-mini"]["requests"] == 7
        # In Redis itself, for every other instance to read: exactly once.
        assert redis_requests(admin) == 7
        time.sleep(1.5)  # past a retry interval: nothing is sent a second time
        assert redis_requests(admin) == 7
        one_request_usage(relay, KEY_A)
        wait_for(lambda: usage(relay)["totals"]["requests"] == 8, "one more")
        assert redis_requests(admin) == 8
    finally:
        relay.stop()
        admin.close()


def test_totals_waiting_for_redis_move_with_a_reload_to_another_redis(upstream, tmp_path):
    from relay.config import load_config
    from tests.test_reload import base_config, write

    gone = RedisServer()  # reserved, never started: every call fails
    path = str(tmp_path / "relay.yaml")
    data = base_config(upstream.url, ratelimit={"enabled": False}, models={"gpt-4o-mini": PRICE})
    write(path, {**data, "redis": {"enabled": True, "address": gone.address, "timeout": 2.0}})
    with RedisServer() as other:
        admin = redis.Redis(port=other.port, socket_timeout=10)
        relay = RelayThread(load_config(path, env={}))
        relay.start()
        try:
            for _ in range(3):
                one_request_usage(relay, KEY_A)
            snap = usage(relay)
            assert snap["backend"] == "memory" and snap["totals"]["requests"] == 3
            write(path, {**data, "redis": {"enabled": True, "address": other.address,
                                           "timeout": 2.0}})  # fmt: skip
            wait_for(lambda: redis_requests(admin) == 3, "totals handed to the new Redis")
            snap = wait_for(
                lambda: (s := usage(relay))["backend"] == "redis" and s, "usage from the new Redis"
            )
            assert snap["totals"]["requests"] == 3
            one_request_usage(relay, KEY_B)
            wait_for(lambda: redis_requests(admin) == 4, "the next request")
            time.sleep(1.5)  # past a retry interval: nothing sent twice
            assert redis_requests(admin) == 4
        finally:
            relay.stop()
            admin.close()
            gone.close()
