"""The upstream side below the gateway: UpstreamPool discipline and
UpstreamConnection parsing, against a tiny scripted asyncio server on the
same loop (both loops).

The pool must hand out the most recently used live socket (LIFO), never one
that saw stray bytes or EOF while idle, nor one older than IDLE_EXPIRY, and
keep at most pool_size idle; connect failures and timeouts become
UpstreamError.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import uvloop

from relay.upstream import pool as pool_module
from relay.upstream.pool import Origin, UpstreamPool
from relay.upstream.protocol import UpstreamConnection, UpstreamError
from tests.support import unanswered_port

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

# What the scripted server answers, by request path. Callables get the
# transport and do something cleverer than one write.
SCRIPT: dict[bytes, Any] = {
    b"/ok": OK,
    b"/close": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
    b"/chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
    b"/nolength": b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end",
    b"/interim": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
                 + OK,
    b"/nocontent": b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n",
    b"/garbage": b"\x00\x01 not http at all\r\n\r\n",
    b"/truncate": b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
    b"/silent": b"",
}


class ScriptedServer(asyncio.Protocol):
    """Answers bodiless requests by path from SCRIPT; counts connections."""

    def __init__(self, owner: Upstream) -> None:
        self.owner = owner
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.owner.opened += 1
        self.owner.live.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.live.discard(self)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            path = head.split(b" ", 2)[1]
            self.owner.paths.append(path)
            self.answer(path)

    def answer(self, path: bytes) -> None:
        transport = self.transport
        assert transport is not None
        loop = asyncio.get_running_loop()
        if path == b"/stray":  # a good answer, then bytes nobody asked for
            transport.write(OK)
            loop.call_later(0.02, transport.write, b"HTTP/1.1 200 OK\r\n")
        elif path == b"/eof":  # keep-alive promised, then closed while idle
            transport.write(OK)
            loop.call_later(0.02, transport.close)
        elif path == b"/slowbody":  # the head now, the body once the client waited
            transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
            loop.call_later(0.02, transport.write, b"cd")
        else:
            transport.write(self.owner.script[path])
            if path in (b"/nolength", b"/truncate", b"/garbage", b"/close"):
                transport.close()


class Upstream:
    def __init__(self, server: asyncio.AbstractServer) -> None:
        self.server = server
        self.opened = 0
        self.live: set[ScriptedServer] = set()
        self.paths: list[bytes] = []
        self.script = dict(SCRIPT)  # a test may add answers of its own

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"


class Sink:
    """A ResponseSink that keeps everything."""

    def __init__(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.length: int | None = -1
        self.body = b""
        self.error: UpstreamError | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.on_head_hook: Callable[[], None] | None = None

    def on_head(self, status: int, headers: list[tuple[bytes, bytes]], length: int | None) -> None:
        self.status, self.headers, self.length = status, headers, length
        if self.on_head_hook is not None:
            self.on_head_hook()

    def on_body(self, chunk: bytes) -> None:
        self.body += chunk

    def on_complete(self) -> None:
        assert not self.done.done()
        self.done.set_result(None)

    def on_error(self, error: UpstreamError) -> None:
        assert not self.done.done()
        self.error = error
        self.done.set_result(None)

    def on_read_end(self) -> None:
        pass


# The pools of the running test, closed by Env.close as a Runtime would.
_POOLS: list[UpstreamPool] = []


def make_pool(upstream: Upstream | str, **kwargs: Any) -> UpstreamPool:
    url = upstream if isinstance(upstream, str) else upstream.url
    settings: dict[str, Any] = {"pool_size": 4, "connect_timeout": 2.0, "read_timeout": 2.0,
                                "ssl_context": None}
    settings.update(kwargs)
    pool = UpstreamPool(Origin.parse(url), asyncio.get_running_loop(), **settings)
    _POOLS.append(pool)
    return pool


async def exchange(conn: UpstreamConnection, path: bytes, *, method: bytes = b"GET",
                   sink: Sink | None = None) -> Sink:
    sink = sink or Sink()
    conn.send([b"%s %s HTTP/1.1\r\n" % (method, path), b"Host: upstream\r\n\r\n"], sink,
              head_only=method == b"HEAD")
    await asyncio.wait_for(sink.done, 3)
    return sink


async def until(predicate: Callable[[], bool], timeout: float = 2.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate() and loop.time() < deadline:
        await asyncio.sleep(0.005)
    return predicate()


class Env:
    """One event loop per test, and the scripted servers started on it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.upstreams: list[Upstream] = []

    def run(self, coro: Awaitable[Any]) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, 10))

    async def upstream(self) -> Upstream:
        holder: list[Upstream] = []
        server = await self.loop.create_server(
            lambda: ScriptedServer(holder[0]), "127.0.0.1", 0)
        holder.append(Upstream(server))
        self.upstreams.append(holder[0])
        return holder[0]

    def close(self) -> None:
        pools, _POOLS[:] = list(_POOLS), []
        for pool in pools:
            pool.close()
        for upstream in self.upstreams:
            upstream.server.close()
            for conn in list(upstream.live):
                if conn.transport is not None:
                    conn.transport.abort()
        self.loop.run_until_complete(asyncio.sleep(0.01))
        self.loop.close()


@pytest.fixture(params=["asyncio", "uvloop"])
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    loop = uvloop.new_event_loop() if request.param == "uvloop" else asyncio.new_event_loop()
    environment = Env(loop)
    yield environment
    environment.close()


# --------------------------------------------------------------- pool


def test_lifo_reuse(env: Env) -> None:
    async def body() -> None:
        upstream = await env.upstream()
        pool = make_pool(upstream)
        first, second = await pool.connect(), await pool.connect()
        assert pool.connections_opened == 2
        for conn in (first, second):
            await exchange(conn, b"/ok")
            assert conn.reusable
        pool.release(first)
        pool.release(second)
        assert pool.idle_count == 2
        assert pool.take_idle() is second  # most recently used first
        assert pool.take_idle() is first
        assert pool.take_idle() is None
        sink = await exchange(second, b"/ok")  # a reused socket works
        assert sink.body == b"ok" and second.exchanges == 2
        assert upstream.opened == 2
        pool.close()

    env.run(body())


def test_connection_close_is_not_pooled(env: Env) -> None:
    async def body() -> None:
        upstream = await env.upstream()
        pool = make_pool(upstream)
        conn = await pool.connect()
        sink = await exchange(conn, b"/close")
        assert sink.body == b"ok" and not conn.reusable
        pool.release(conn)
        assert pool.idle_count == 0 and pool.take_idle() is None
        assert await until(lambda: not upstream.live)

    env.run(body())


@pytest.mark.parametrize("path", [b"/stray", b"/eof"], ids=["stray-bytes", "eof"])
def test_socket_disturbed_while_idle_is_not_handed_out(
    env: Env, path: bytes,
) -> None:
    async def body() -> None:
        upstream = await env.upstream()
        pool = make_pool(upstream)
        conn = await pool.connect()
        await exchange(conn, path)
        pool.release(conn)
        assert pool.idle_count == 1
        assert await until(lambda: conn.lost or not conn.reusable)
        assert pool.take_idle() is None
        assert pool.idle_count == 0
        assert await until(lambda: conn.lost)  # and the socket is closed, not leaked

    env.run(body())


def test_idle_expiry(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool_module, "IDLE_EXPIRY", 0.1)

    async def body() -> None:
        upstream = await env.upstream()
        pool = make_pool(upstream)
        old, fresh = await pool.connect(), await pool.connect()
        await exchange(old, b"/ok")
        await exchange(fresh, b"/ok")
        pool.release(old)
        await asyncio.sleep(0.15)
        await exchange(fresh, b"/ok")  # idle_since is the end of the last response
        pool.release(fresh)
        assert pool.take_idle() is fresh
        pool.release(fresh)
        await asyncio.sleep(0.15)
        assert pool.take_idle() is None  # both expired now
        assert await until(lambda: old.lost and fresh.lost)
        assert await until(lambda: not upstream.live)

    env.run(body())


def test_pool_size_bounds_idle_connections(env: Env) -> None:
    async def body() -> None:
        upstream = await env.upstream()
        pool = make_pool(upstream, pool_size=2)
        conns = [await pool.connect() for _ in range(3)]
        for conn in conns:
            await exchange(conn, b"/ok")
            pool.release(conn)
        assert pool.idle_count == 2
        assert await until(lambda: conns[2].lost)  # the one beyond the bound was closed
        # A reload shrinking the pool closes the oldest idle socket first.
        pool.configure(pool_size=1, connect_timeout=2.0, read_timeout=2.0)
        assert pool.idle_count == 1
        assert await until(lambda: conns[0].lost)
        assert pool.take_idle() is conns[1]
        assert len(upstream.live) == 1

    env.run(body())


def test_release_unused_keeps_a_fresh_connection(env: Env) -> None:
    async def body() -> None:
        upstream = await env.upstream()
        pool = make_pool(upstream)
        conn = await pool.connect()
        pool.release_unused(conn)  # the client left while we connected
        assert pool.take_idle() is conn
        assert (await exchange(conn, b"/ok")).body == b"ok"

    env.run(body())


def test_closed_pool_keeps_nothing(env: Env) -> None:
    async def body() -> None:
        upstream = await env.upstream()
        pool = make_pool(upstream)
        a, b = await pool.connect(), await pool.connect()
        await exchange(a, b"/ok")
        await exchange(b, b"/ok")
        pool.release(a)
        pool.close()
        pool.release(b)  # a response finishing after shutdown
        assert pool.idle_count == 0
        assert await until(lambda: a.lost and b.lost)

    env.run(body())


def test_reused_connection_gets_the_reloaded_read_timeout(
    env: Env,
) -> None:
    async def body() -> None:
        upstream = await env.upstream()
        pool = make_pool(upstream, read_timeout=30.0)
        conn = await pool.connect()
        await exchange(conn, b"/ok")
        pool.release(conn)
        pool.configure(pool_size=4, connect_timeout=2.0, read_timeout=0.05)
        reused = pool.take_idle()
        assert reused is conn
        sink = await exchange(reused, b"/silent")
        assert sink.error is not None and sink.error.timeout

    env.run(body())


def test_connect_refused_is_an_upstream_error(env: Env) -> None:
    async def body() -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # bound, not listening: refused
            pool = make_pool(f"http://127.0.0.1:{port}")
            with pytest.raises(UpstreamError) as info:
                await pool.connect()
        assert not info.value.timeout
        assert f"127.0.0.1:{port}" in info.value.reason
        assert pool.connections_opened == 0

    env.run(body())


def test_connect_timeout_is_an_upstream_timeout(env: Env) -> None:
    with unanswered_port() as port:

        async def body() -> None:
            pool = make_pool(f"http://127.0.0.1:{port}", connect_timeout=0.2)
            loop = asyncio.get_running_loop()
            start = loop.time()
            with pytest.raises(UpstreamError) as info:
                await pool.connect()
            assert info.value.timeout
            assert 0.15 <= loop.time() - start < 1.5

        env.run(body())


# --------------------------------------------------------------- connection


@pytest.mark.parametrize(
    ("path", "status", "length", "body", "reusable"),
    [
        (b"/ok", 200, 2, b"ok", True),
        (b"/chunked", 200, None, b"abcde", True),
        (b"/nolength", 200, None, b"until the end", False),
        (b"/interim", 200, 2, b"ok", True),
        (b"/nocontent", 204, 0, b"", True),
    ],
    ids=["content-length", "chunked", "close-delimited", "interim", "no-content"],
)
def test_response_framing(
    env: Env, path: bytes, status: int, length: int | None,
    body: bytes, reusable: bool,
) -> None:
    async def test() -> None:
        upstream = await env.upstream()
        pool = make_pool(upstream)
        conn = await pool.connect()
        sink = await exchange(conn, path)
        assert sink.error is None
        assert (sink.status, sink.length, sink.body) == (status, length, body)
        assert conn.reusable is reusable
        if path == b"/interim":
            assert [n for n, _ in sink.headers] == [b"Content-Length"]  # no 103 headers
        if reusable:  # the next response on the same socket parses cleanly
            assert (await exchange(conn, b"/ok")).body == b"ok"

    env.run(test())


def test_head_response_is_complete_without_a_body(env: Env) -> None:
    async def test() -> None:
        upstream = await env.upstream()
        pool = make_pool(upstream)
        conn = await pool.connect()
        # The server answers HEAD like GET minus the body: only the head comes.
        upstream.script[b"/head"] = b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"
        sink = await exchange(conn, b"/head", method=b"HEAD")
        assert sink.error is None and sink.status == 200 and sink.body == b""
        assert (b"Content-Length", b"1234") in sink.headers
        assert not conn.reusable  # llhttp cannot be told the next body is absent

    env.run(test())


@pytest.mark.parametrize(
    ("path", "timeout"),
    [(b"/garbage", False), (b"/truncate", False), (b"/silent", True)],
)
def test_failures_reach_the_sink_once(
    env: Env, path: bytes, timeout: bool,
) -> None:
    async def test() -> None:
        upstream = await env.upstream()
        pool = make_pool(upstream, read_timeout=0.1)
        conn = await pool.connect()
        sink = await exchange(conn, path)
        assert sink.error is not None and sink.error.timeout is timeout
        assert not conn.reusable
        assert conn.received_any is (path != b"/silent")
        assert await until(lambda: conn.lost)
        pool.release(conn)
        assert pool.idle_count == 0

    env.run(test())


def test_read_timeout_counts_silence_not_total_time(env: Env) -> None:
    async def test() -> None:
        upstream = await env.upstream()
        pool = make_pool(upstream, read_timeout=0.1)
        conn = await pool.connect()
        upstream.script[b"/drip"] = b""
        sink = Sink()
        conn.send([b"GET /drip HTTP/1.1\r\nHost: upstream\r\n\r\n"], sink)
        await until(lambda: bool(upstream.paths))
        server = next(iter(upstream.live))
        assert server.transport is not None
        for piece in (b"HTTP/1.1 200 OK\r\n", b"Content-Length: 3\r\n\r\n", b"a", b"b", b"c"):
            await asyncio.sleep(0.06)  # each gap below the timeout, the sum above it
            server.transport.write(piece)
        await asyncio.wait_for(sink.done, 2)
        assert sink.error is None and sink.body == b"abc"

    env.run(test())


def test_paused_connection_does_not_time_out(env: Env) -> None:
    """A slow client pauses the upstream read: that silence is not the upstream's."""
    async def test() -> None:
        upstream = await env.upstream()
        pool = make_pool(upstream, read_timeout=0.1)
        conn = await pool.connect()
        sink = Sink()
        sink.on_head_hook = conn.pause_reading
        conn.send([b"GET /slowbody HTTP/1.1\r\nHost: upstream\r\n\r\n"], sink)
        await asyncio.sleep(0.35)
        assert not sink.done.done()
        conn.resume_reading()
        await asyncio.wait_for(sink.done, 2)
        assert sink.error is None and sink.body == b"abcd"
        assert conn.reusable

    env.run(test())


def test_detach_drops_the_connection(env: Env) -> None:
    async def test() -> None:
        upstream = await env.upstream()
        pool = make_pool(upstream)
        conn = await pool.connect()
        sink = Sink()
        conn.send([b"GET /silent HTTP/1.1\r\nHost: upstream\r\n\r\n"], sink)
        await until(lambda: bool(upstream.paths))
        conn.detach()  # the client left
        assert await until(lambda: conn.lost and not upstream.live)
        assert not sink.done.done()  # a detached sink hears nothing more
        pool.release(conn)
        assert pool.take_idle() is None

    env.run(test())
