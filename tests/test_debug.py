"""relay's debug mode: the counts move with what is open, a leak fails the
check the suite runs after every test, and with debug off nothing of it is
installed (nor answered on ``/relay/debug``)."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from relay import debug
from relay.features.coalescer import Leader
from relay.http.protocol import ClientConnection, ConnectionLimits
from relay.http.request import Request
from relay.http.server import RelayServer, bind_socket
from relay.testing import ThreadedFakeUpstream
from relay.upstream.exchange import ProxyExchange
from relay.upstream.protocol import UpstreamConnection
from tests.conftest import RawClient, RelayFactory
from tests.leakcheck import check_released
from tests.support import (
    ROOT,
    RelayThread,
    free_port,
    start_relay_process,
    wait_for_port,
    write_config,
)

TIMEOUT = 10.0
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "count what is open"}]}

# The module whose class serves client connections in this process (the
# compiled twin or the pure one, as relay.http.protocol chose).
CLIENT_MODULE = ClientConnection.__module__
UPSTREAM_MODULE = UpstreamConnection.__module__
EXCHANGE_MODULE = ProxyExchange.__module__
COALESCER_MODULE = Leader.__module__

# Every method the debug mode wraps: (module, class, method).
COUNTED = {
    ("relay.app", "Gateway", "__init__"),
    ("relay.app", "Gateway", "stop"),
    (COALESCER_MODULE, "Follower", "close"),
    (COALESCER_MODULE, "Leader", "close"),
    (EXCHANGE_MODULE, "ProxyExchange", "_settle"),
    (CLIENT_MODULE, "ClientConnection", "_serve"),
    ("relay.keys.service", "KeyService", "__init__"),
    ("relay.keys.service", "KeyService", "_refresh_loop"),
    ("relay.keys.service", "KeyService", "_spawn"),
    ("relay.keys.service", "KeyService", "close"),
    (CLIENT_MODULE, "ClientConnection", "connection_lost"),
    (CLIENT_MODULE, "ClientConnection", "connection_made"),
    ("relay.accounting.ledger", "SharedUsage", "_send_all"),
    ("relay.redisconn", "RedisConnection", "__init__"),
    ("relay.redisconn", "RedisConnection", "_probe_until_up"),
    ("relay.redisconn", "RedisConnection", "close"),
    ("relay.runtime", "Runtime", "spawn"),
    ("relay.upstream.pool", "UpstreamPool", "__init__"),
    ("relay.upstream.pool", "UpstreamPool", "_closed_one"),
    ("relay.upstream.pool", "UpstreamPool", "close"),
    (UPSTREAM_MODULE, "UpstreamConnection", "connection_lost"),
    (UPSTREAM_MODULE, "UpstreamConnection", "connection_made"),
}


def chat_request(body: dict[str, Any] = CHAT, headers: dict[str, str] | None = None) -> bytes:
    data = json.dumps(body).encode()
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
    for name, value in (headers or {}).items():
        head += f"{name}: {value}\r\n".encode()
    return head + b"Content-Length: %d\r\n\r\n" % len(data) + data


def counts_on(relay: RelayThread) -> dict[str, int]:
    return relay.call(debug.counters.snapshot)


def wait_for(relay: RelayThread, check: Callable[[dict[str, int]], bool], what: str) -> dict[str, int]:
    """Poll the counts on relay's loop until *check* holds (bounded)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        counts = counts_on(relay)
        if check(counts):
            return counts
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {counts}")
        time.sleep(0.01)


# -- the registry and its decorators ------------------------------------------


class _Counted:
    """Stands for a relay object that opens, holds a buffer and closes."""

    @debug.opens("followers")
    def __init__(self, held: int = 0) -> None:
        self.held = held

    def _debug_buffers(self) -> dict[str, int]:
        return {"follower_pending_bytes": self.held}

    @debug.closes("followers")
    def close(self) -> None:
        pass

    @debug.closes("followers")
    async def aclose(self) -> None:
        await asyncio.sleep(0)

    @debug.during("requests")
    async def serve(self, fail: bool) -> None:
        await asyncio.sleep(0)
        if fail:
            raise ValueError("a request that failed")

    @debug.spawns("tasks")
    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        return asyncio.get_running_loop().create_task(coro)


def test_debug_decorators_count_from_open_to_close(run: Callable[[Any], Any]) -> None:
    opened = debug.counters.opened["followers"]
    first, second = _Counted(3), _Counted(4)
    assert debug.counters.counts()["followers"] == 2
    assert debug.counters.buffers()["follower_pending_bytes"] == 7
    assert debug.counters.opened["followers"] == opened + 2
    first.close()
    first.close()  # a second close changes nothing
    assert debug.counters.counts()["followers"] == 1
    assert debug.counters.buffers()["follower_pending_bytes"] == 4
    run(second.aclose())
    assert debug.counters.snapshot() == dict.fromkeys((*debug.KINDS, *debug.BUFFERS), 0)


def test_debug_during_counts_a_coroutine_while_it_runs(run: Callable[[Any], Any]) -> None:
    thing = _Counted()

    async def main() -> None:
        task = asyncio.ensure_future(thing.serve(fail=True))
        await asyncio.sleep(0)
        assert debug.counters.counts()["requests"] == 1
        with pytest.raises(ValueError):
            await task
        assert debug.counters.counts()["requests"] == 0
        spawned = thing.spawn(asyncio.sleep(0.01))
        assert debug.counters.counts()["tasks"] == 1
        await spawned
        await asyncio.sleep(0)  # done callbacks run in the next loop turn
        assert debug.counters.counts()["tasks"] == 0

    run(main())
    thing.close()


def test_debug_counts_from_several_threads_add_up() -> None:
    import threading

    def churn() -> None:
        for _ in range(2000):
            _Counted().close()

    threads = [threading.Thread(target=churn) for _ in range(4)]
    for thread in threads:
        thread.start()
    kept = [_Counted() for _ in range(5)]
    for thread in threads:
        thread.join(TIMEOUT)
    assert debug.counters.counts()["followers"] == 5
    for thing in kept:
        thing.close()
    assert debug.counters.counts()["followers"] == 0


def test_debug_refuses_an_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown debug counter 'sockets'"):
        debug.opens("sockets")


# -- the counts follow real sockets --------------------------------------------


def test_debug_counts_a_client_connection_up_and_back(
    relay_factory: RelayFactory, fake_upstream: ThreadedFakeUpstream
) -> None:
    relay = relay_factory(fake_upstream.url)
    before = counts_on(relay)
    assert before["gateways"] == 1 and before["client_connections"] == 0

    client = RawClient(relay.port, timeout=TIMEOUT)
    client.send(chat_request())
    assert client.response().status == 200
    # Answered: its request task, exchange and flow end; the connection is
    # kept alive, the upstream connection pooled.
    counts = wait_for(relay, lambda c: c["requests"] == 0, "the request to end")
    assert counts["client_connections"] == 1
    assert counts["upstream_connections"] == 1
    assert counts["exchanges"] == 0

    client.close()
    counts = wait_for(relay, lambda c: c["client_connections"] == 0, "the connection to close")
    assert counts["upstream_connections"] == 1  # pooled until the relay stops

    relay.stop()
    assert debug.counters.settle(5.0) == {}


def test_debug_counts_requests_exchanges_and_queued_while_in_flight(
    relay_factory: RelayFactory, fake_upstream: ThreadedFakeUpstream
) -> None:
    relay = relay_factory(fake_upstream.url, proxy={"read_timeout": 30})
    client = RawClient(relay.port, timeout=TIMEOUT)
    # Two pipelined requests: the first waits 1.5 s for its head upstream,
    # the second waits in the connection's queue for its turn.
    client.send(chat_request(headers={"x-fake-delay": "1.5"}) + chat_request())
    during = wait_for(
        relay,
        lambda c: c["exchanges"] == 1 and c["client_queued_requests"] == 1,
        "one request upstream and one queued",
    )
    assert during["requests"] == 1 and during["upstream_connections"] == 1
    assert during["client_connections"] == 1

    assert client.response().status == 200
    assert client.response().status == 200
    after = wait_for(relay, lambda c: c["requests"] == 0, "both requests to end")
    assert after["client_queued_requests"] == 0 and after["exchanges"] == 0
    client.close()


def test_debug_counts_a_coalesced_flight_and_its_follower(
    relay_factory: RelayFactory, fake_upstream: ThreadedFakeUpstream
) -> None:
    relay = relay_factory(fake_upstream.url, cache={"enabled": True})
    slow = {"x-fake-event-delay": "0.3", "x-fake-events": "6"}
    body = {**CHAT, "stream": True, "messages": [{"role": "user", "content": "coalesced, counted"}]}
    leader = RawClient(relay.port, timeout=TIMEOUT)
    leader.send(chat_request(body, slow))
    wait_for(relay, lambda c: c["flights"] == 1, "the leader's flight")
    follower = RawClient(relay.port, timeout=TIMEOUT)
    follower.send(chat_request(body, slow))
    during = wait_for(relay, lambda c: c["followers"] == 1, "the follower to join")
    assert during["flights"] == 1 and during["requests"] == 2 and during["exchanges"] == 1

    first, second = leader.response(), follower.response()
    assert first.complete and second.complete and first.body == second.body
    assert second.header("x-relay-cache") == "HIT"
    after = wait_for(relay, lambda c: c["requests"] == 0, "both requests to end")
    assert after["flights"] == 0 and after["followers"] == 0
    assert after["flight_bytes"] == 0 and after["follower_pending_bytes"] == 0
    leader.close()
    follower.close()


def test_a_miss_with_every_memory_feature_on_starts_no_task(
    relay_factory: RelayFactory, fake_upstream: ThreadedFakeUpstream
) -> None:
    # Cache (stored at once), limiter, breaker, metrics, usage: a miss is
    # served by its request's own task, nothing spawned beside it.
    relay = relay_factory(
        fake_upstream.url,
        cache={"enabled": True},
        ratelimit={"enabled": True, "requests_per_second": 1000, "burst": 1000},
        circuit_breaker={"enabled": True},
    )
    client = RawClient(relay.port, timeout=TIMEOUT)
    first = {**CHAT, "messages": [{"role": "user", "content": "warm up"}]}
    client.send(chat_request(first, {"Authorization": "Bearer sk-no-task"}))
    assert client.response().status == 200
    spawned = relay.call(lambda: debug.counters.opened["tasks"])
    for i in range(20):
        body = {**CHAT, "messages": [{"role": "user", "content": f"miss {i}"}]}
        client.send(chat_request(body, {"Authorization": "Bearer sk-no-task"}))
        reply = client.response()
        assert reply.status == 200 and reply.header("x-relay-cache") == "MISS"
    assert relay.call(lambda: debug.counters.opened["tasks"]) == spawned
    client.close()


def test_debug_counts_a_request_waiting_for_a_connection_slot(
    relay_factory: RelayFactory, fake_upstream: ThreadedFakeUpstream
) -> None:
    relay = relay_factory(fake_upstream.url, proxy={"max_connections": 1, "connect_timeout": 10})
    busy = RawClient(relay.port, timeout=TIMEOUT)
    busy.send(chat_request(headers={"x-fake-delay": "1.5"}))
    wait_for(relay, lambda c: c["exchanges"] == 1, "the first request upstream")
    parked = RawClient(relay.port, timeout=TIMEOUT)
    parked.send(chat_request())
    during = wait_for(relay, lambda c: c["upstream_pool_waiters"] == 1, "the second to wait")
    assert during["requests"] == 2 and during["upstream_connections"] == 1
    assert busy.response().status == 200 and parked.response().status == 200
    after = wait_for(relay, lambda c: c["requests"] == 0, "both requests to end")
    assert after["upstream_pool_waiters"] == 0 and after["upstream_connections"] == 1
    busy.close()
    parked.close()


def test_debug_endpoint_shows_the_counts(
    relay_factory: RelayFactory, fake_upstream: ThreadedFakeUpstream
) -> None:
    relay = relay_factory(fake_upstream.url)
    conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=TIMEOUT)
    try:
        conn.request("GET", "/relay/debug")
        resp = conn.getresponse()
        report = json.loads(resp.read())
    finally:
        conn.close()
    assert resp.status == 200 and resp.getheader("content-type") == "application/json"
    assert report["pid"] == os.getpid()
    assert set(report["open"]) == set(debug.KINDS)
    assert set(report["buffers"]) == set(debug.BUFFERS)
    # This request and its connection are what is open, in the one gateway.
    assert report["open"]["gateways"] == 1
    assert report["open"]["client_connections"] == 1 and report["open"]["requests"] == 1
    assert report["open"]["upstream_connections"] == 0  # answered by relay itself
    (described,) = report["objects"]["client_connections"]
    assert described.startswith("<ClientConnection 127.0.0.1 OPEN")
    assert not [r for r in fake_upstream.requests if r.path == "/relay/debug"]


# -- a leak fails the check ------------------------------------------------------


class _Transport:
    """A socket-less transport: just what ClientConnection calls."""

    def __init__(self) -> None:
        self.closed = False

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("192.0.2.9", 40000) if name == "peername" else default

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        self.closed = True


async def _never(request: Request, client: ClientConnection) -> None:  # pragma: no cover
    raise AssertionError("no request is sent")


def _open_connection(loop: asyncio.AbstractEventLoop) -> ClientConnection:
    limits = ConnectionLimits(1000, 2048, 5.0, 5.0)
    conn = ClientConnection(_never, limits, set(), loop)
    conn.connection_made(_Transport())  # type: ignore[arg-type]
    return conn


def test_leak_check_fails_on_a_connection_left_open() -> None:
    loop = asyncio.new_event_loop()
    try:
        conn = _open_connection(loop)
        assert debug.counters.counts()["client_connections"] == 1
        with pytest.raises(pytest.fail.Exception) as failed:
            check_released(timeout=0.2)
        message = str(failed.value)
        assert "{'client_connections': 1}" in message
        assert "<ClientConnection 192.0.2.9 OPEN read=AWAIT answer=NONE queued=0>" in message
        # Reported once: the registry starts clean for the next test.
        assert debug.counters.settle(0) == {}
        conn.connection_lost(None)
        check_released(timeout=0)
    finally:
        loop.close()


def test_leak_check_passes_once_the_connection_is_lost() -> None:
    loop = asyncio.new_event_loop()
    try:
        conn = _open_connection(loop)
        conn.connection_lost(None)
        assert debug.counters.counts()["client_connections"] == 0
        check_released(timeout=0)
    finally:
        loop.close()


def test_leak_check_fails_on_a_pool_slot_never_given_back(run: Callable[[Any], Any]) -> None:
    """A closed pool is released only once every connection slot is back: a
    slot lost on some path would leave a pool that ends up refusing (503)."""
    from relay.upstream.pool import Origin, UpstreamPool

    async def main() -> UpstreamPool:
        pool = UpstreamPool(Origin.parse("http://127.0.0.1:9"), asyncio.get_running_loop(),
                            pool_size=2, connect_timeout=1.0, read_timeout=1.0, ssl_context=None)
        pool.open += 1  # as a connect that never gave its slot back would leave it
        pool.close()
        return pool

    pool = run(main())
    with pytest.raises(pytest.fail.Exception) as failed:
        check_released(timeout=0.1)
    assert "{'upstream_pools': 1}" in str(failed.value)
    assert "<UpstreamPool http://127.0.0.1:9 open=1 idle=0 waiters=0 closed=True>" in str(failed.value)
    debug.counters.open("upstream_pools", pool)
    pool._closed_one()  # the slot comes back: the pool is released
    check_released(timeout=0)


def test_leak_check_fixture_fails_the_leaking_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_inner="""
        import asyncio

        from relay.features.coalescer import Coalescer


        def test_leaves_a_flight_open():
            Coalescer().join(b"key")  # a Leader never closed


        def test_closes_its_flight():
            Coalescer().join(b"key").close()
        """
    )
    result = pytester.runpytest_inprocess("-p", "tests.leakcheck", "-p", "no:randomly")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines([
        "*ERROR at teardown of test_leaves_a_flight_open*",
        "*still open or held after the test*{'flights': 1}*",
        "*<Leader state=0 followers=0 total=0>*",
    ])


# -- debug off: nothing installed, nothing answered --------------------------------

_WRAPPED_PROBE = """
import importlib, json, sys
from relay import debug
import relay.app  # imports every counted module
import relay.keys.service  # imported when keys are configured
from relay.ops.endpoints import own_endpoints

# Building the handlers touches none of what they read when called.
endpoints = own_endpoints(
    targets=(), breakers=False, draining=lambda: False, metrics=None, metrics_enabled=False,
    usage_snapshot=None, loop=None,
)

wrapped = []
for name, module in sorted(sys.modules.items()):
    if not name.startswith("relay"):
        continue
    for cls in vars(module).values():
        if isinstance(cls, type) and cls.__module__ == name:
            for attr, value in vars(cls).items():
                if hasattr(value, "__wrapped__"):
                    wrapped.append([name, cls.__name__, attr])
print(json.dumps({
    "enabled": debug.ENABLED,
    "wrapped": wrapped,
    "endpoint": b"/relay/debug" in endpoints,
}))
"""


def _probe(flag: str) -> dict[str, Any]:
    env = dict(os.environ, RELAY_DEBUG=flag)
    out = subprocess.run(
        [sys.executable, "-c", _WRAPPED_PROBE], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=60, check=True,
    )
    return json.loads(out.stdout)


def test_debug_off_installs_nothing_on_the_request_path() -> None:
    off, on = _probe(""), _probe("1")
    assert off["enabled"] is False and on["enabled"] is True
    # With debug off every counted method is the plain function: the
    # request path runs exactly the code it runs without relay.debug.
    assert {tuple(w) for w in on["wrapped"]} - {tuple(w) for w in off["wrapped"]} == COUNTED
    assert not COUNTED & {tuple(w) for w in off["wrapped"]}
    assert off["endpoint"] is False and on["endpoint"] is True
    assert _probe("0")["enabled"] is False


def _stop(proc: subprocess.Popen[bytes]) -> str:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode(errors="replace")
    return err.decode(errors="replace")


def test_debug_off_proxies_the_debug_path(tmp_path: Any) -> None:
    with ThreadedFakeUpstream() as upstream:
        port = free_port()
        path = write_config({"server": {"port": f"127.0.0.1:{port}"}, "proxy": {"target": upstream.url}},
                            directory=str(tmp_path))
        proc = start_relay_process(["--config", path], env={"RELAY_DEBUG": "0"})
        try:
            wait_for_port(port, proc=proc)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
            conn.request("GET", "/relay/debug")
            resp = conn.getresponse()
            resp.read()
            conn.close()
        finally:
            err = _stop(proc)
        # Not relay's: the upstream answered it (its 404), like any unknown path.
        assert resp.status == 404 and resp.getheader("x-relay-cache") == "BYPASS"
        assert [r.path for r in upstream.requests] == ["/relay/debug"]
        assert "debug:" not in err


def test_debug_on_logs_what_a_stopped_worker_released(tmp_path: Any) -> None:
    with ThreadedFakeUpstream() as upstream:
        port = free_port()
        path = write_config({"server": {"port": f"127.0.0.1:{port}"}, "proxy": {"target": upstream.url}},
                            directory=str(tmp_path))
        proc = start_relay_process(["--config", path], env={"RELAY_DEBUG": "1"})
        try:
            wait_for_port(port, proc=proc)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
            conn.request("POST", "/v1/chat/completions", json.dumps(CHAT))
            resp = conn.getresponse()
            resp.read()
            conn.request("GET", "/relay/debug")
            report = json.loads(conn.getresponse().read())
            conn.close()
        finally:
            err = _stop(proc)
        assert resp.status == 200
        assert report["pid"] == proc.pid
        assert report["open"]["upstream_connections"] == 1  # pooled after the chat request
        assert "debug: every connection, request, task and buffer was released" in err
        assert "still open" not in err


# -- leaks the check found ---------------------------------------------------------


def test_a_background_task_pending_at_stop_ends_with_the_gateway(
    relay_factory: RelayFactory, fake_upstream: ThreadedFakeUpstream
) -> None:
    """Runtime.close cancels the tasks it spawned and waits for them to end:
    cancelled but never run, a task would stay pending on a closed loop."""
    relay = relay_factory(fake_upstream.url)
    assert relay.gateway is not None
    runtime = relay.gateway.runtime
    relay.call(lambda: runtime.spawn(asyncio.sleep(3600)))
    assert counts_on(relay)["tasks"] == 1
    relay.stop()
    assert debug.counters.counts()["tasks"] == 0


def test_a_request_task_cut_by_the_drain_has_ended_when_it_returns(
    run: Callable[[Any], Any],
) -> None:
    """RelayServer.drain cancels the requests that outlive the shutdown
    timeout; by the time it returns they have ended (none is left pending
    for a loop that stops right after)."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stuck = loop.create_future()
        entered = asyncio.Event()

        async def hang(request: Request, client: ClientConnection) -> None:
            entered.set()
            await stuck  # never resolved: a request that outlives the drain

        server = RelayServer(hang, ConnectionLimits(1000, 2048, 5.0, 5.0), loop)
        await server.start(bind_socket("127.0.0.1", 0, reuse_port=False))
        _, writer = await asyncio.open_connection(*server.address)
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: relay\r\n\r\n")
        await asyncio.wait_for(entered.wait(), TIMEOUT)
        (task,) = server.tasks
        assert await server.drain(0.1) is False
        assert task.cancelled() and not server.tasks
        assert debug.counters.counts()["requests"] == 0
        writer.close()

    run(main())


def test_a_request_cut_by_the_drain_settles_without_an_error(
    relay_factory: RelayFactory, fake_upstream: ThreadedFakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by the debug tests: a request still waiting for its upstream
    when the drain's timeout ran out had its task cancelled (which cancels
    the exchange's future) before its client connection was lost, and the
    exchange then set a result on the cancelled future: an error in the
    loop's connection_lost callback for every such request."""
    relay = relay_factory(fake_upstream.url)  # shutdown_timeout: 1 s
    client = RawClient(relay.port, timeout=TIMEOUT)
    client.send(chat_request(headers={"x-fake-delay": "5"}))
    wait_for(relay, lambda c: c["exchanges"] == 1, "the request upstream")
    with caplog.at_level("ERROR"):
        relay.stop()
    client.wait_closed()
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text
    assert debug.counters.settle(5.0) == {}


def test_a_key_store_replaced_by_a_reload_is_closed_by_the_stop(
    fake_upstream: ThreadedFakeUpstream, tmp_path: Any
) -> None:
    """Found by the debug counts: a reload to another key store closed the
    previous key service 5 s later on a timer; a stop within those 5 s left
    it (its SQLite thread and connection) open and its close() coroutine
    never awaited. The runtime's close now closes it too."""
    from tests.support import make_config

    def keys_at(name: str) -> Any:
        return make_config(fake_upstream.url, circuit_breaker={"enabled": False},
                           keys={"enabled": True, "store": "sqlite", "path": str(tmp_path / name)})

    relay = RelayThread(keys_at("first.db"))
    relay.start()
    try:
        assert relay.gateway is not None
        gateway = relay.gateway
        assert counts_on(relay)["key_services"] == 1
        relay.call(lambda: gateway._reloaded(keys_at("second.db"), []))
        assert counts_on(relay)["key_services"] == 2  # the replaced one closes later
    finally:
        relay.stop()
    assert debug.counters.settle(5.0) == {}


def test_a_closed_client_connection_is_freed_without_the_cycle_collector(
    relay_factory: RelayFactory, fake_upstream: ThreadedFakeUpstream
) -> None:
    """A closed connection goes with its last reference, not at a full
    collection: workers collect rarely (relay.app._tune_gc), and a cycle left
    by each closed connection (its parser, transport, buffers) piles up in
    between, a worker's memory growing with the connections it has served."""
    import gc

    relay = relay_factory(fake_upstream.url)
    gc.collect()
    gc.disable()
    try:
        for _ in range(3):
            client = RawClient(relay.port, timeout=TIMEOUT)
            client.send(chat_request())
            assert client.response().status == 200
            client.close()
        wait_for(relay, lambda c: c["client_connections"] == 0, "the connections to close")
        deadline = time.monotonic() + TIMEOUT
        alive = -1
        while time.monotonic() < deadline:
            alive = sum(type(o) is ClientConnection for o in gc.get_objects())
            if alive == 0:
                break
            time.sleep(0.05)
        assert alive == 0
    finally:
        gc.enable()
