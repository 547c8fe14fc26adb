"""ClientConnection below the socket: a fake transport and a handler of our
own, so parsing, the Request it builds, pipelining, response framing, flow
control and timers are checked byte for byte, on both event loops.

Requests are fed whole and byte by byte (as httptools' own tests do): the
result must not depend on how the bytes were split.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any

import httptools
import pytest
import uvloop

from relay.http import errors
from relay.http.protocol import (
    ANSWER_MOVES,
    CONN_MOVES,
    MAX_PIPELINED,
    READ_MOVES,
    WRITE_HIGH_WATER,
    WRITE_LOW_WATER,
    AnswerState,
    ClientConnection,
    ConnectionLimits,
    ConnState,
    ProtocolStateError,
    ReadState,
)
from relay.http.request import Request

LIMITS = ConnectionLimits(max_body_bytes=1000, max_header_bytes=2048,
                          header_timeout=5.0, idle_timeout=5.0)


class FakeTransport:
    """Records what the connection does to its socket."""

    def __init__(self, peer: tuple[str, int] | None = ("10.1.2.3", 40000)) -> None:
        self.out = bytearray()
        self.late: list[bytes] = []  # written after close: always a bug
        self.closed = False
        self.aborted = False
        self.reading = True
        self.pauses = 0
        self.resumes = 0
        self.limits: tuple[int | None, int | None] | None = None
        self.peer = peer

    def write(self, data: bytes) -> None:
        # Recorded, not raised: the connection would swallow an exception.
        if self.closed:
            self.late.append(bytes(data))
        else:
            self.out += data

    def writelines(self, parts: Any) -> None:
        for part in parts:
            self.write(part)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        assert self.reading, "paused twice"
        self.reading = False
        self.pauses += 1

    def resume_reading(self) -> None:
        assert not self.reading, "resumed while reading"
        self.reading = True
        self.resumes += 1

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": self.peer}.get(name, default)

    def get_write_buffer_size(self) -> int:
        return 0  # every write is taken at once

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.limits = (high, low)

    def take(self) -> bytes:
        data = bytes(self.out)
        self.out.clear()
        return data


class Flow:
    """A FlowListener (the upstream side) that counts calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def pause_reading(self) -> None:
        self.calls.append("pause")

    def resume_reading(self) -> None:
        self.calls.append("resume")


class Parsed:
    def __init__(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.complete = False

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k.lower() == name), None)


class _Responses:
    """httptools callbacks collecting every response."""

    def __init__(self) -> None:
        self.out: list[Parsed] = []
        self.parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self.out.append(Parsed())

    def on_header(self, name: bytes, value: bytes) -> None:
        self.out[-1].headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.out[-1].status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.out[-1].body += body

    def on_message_complete(self) -> None:
        self.out[-1].complete = True


def parse(data: bytes) -> list[Parsed]:
    """Every response in *data*, the last one possibly incomplete."""
    responses = _Responses()
    responses.parser.feed_data(data)
    return responses.out


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Iterator[Callable[[Awaitable[Any]], Any]]:
    loop = uvloop.new_event_loop() if request.param == "uvloop" else asyncio.new_event_loop()

    def run_(coro: Awaitable[Any]) -> Any:
        return loop.run_until_complete(asyncio.wait_for(coro, 5))

    yield run_
    # The fake transport has no socket to lose: the test's connections are
    # lost here, and their request tasks run to their end, before the loop
    # closes (so nothing of one test is left open for the leak check).
    servers, _SERVERS[:] = list(_SERVERS), []
    for server in servers:
        server.conn.connection_lost(None)
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.close()


Handler = Callable[[Request, ClientConnection], Coroutine[Any, Any, None]]


# The Servers of the running test, lost at its end by the run fixture.
_SERVERS: list[Server] = []


class Server:
    """One ClientConnection on a FakeTransport, with the requests it dispatched."""

    def __init__(self, handler: Handler | None = None, limits: ConnectionLimits = LIMITS,
                 peer: tuple[str, int] | None = ("10.1.2.3", 40000)) -> None:
        self.requests: list[Request] = []
        self.registry: set[ClientConnection] = set()
        self.transport = FakeTransport(peer)
        self._handler = handler or echo
        self.conn = ClientConnection(self._handle, limits, self.registry,
                                     asyncio.get_running_loop())
        self.conn.connection_made(self.transport)  # type: ignore[arg-type]
        _SERVERS.append(self)

    async def _handle(self, request: Request, conn: ClientConnection) -> None:
        self.requests.append(request)
        await self._handler(request, conn)

    def feed(self, data: bytes, *, bytewise: bool = False) -> None:
        if bytewise:
            for i in range(len(data)):
                self.conn.data_received(data[i:i + 1])
        else:
            self.conn.data_received(data)

    async def settle(self, rounds: int = 20) -> None:
        """Let the handler tasks run."""
        for _ in range(rounds):
            await asyncio.sleep(0)


async def echo(request: Request, conn: ClientConnection) -> None:
    conn.respond(200, [b"Content-Type: text/plain\r\n"], request.method + b" " + request.target)


FULL_REQUEST = (
    b"POST /v1/chat/completions?stream=1&x=%20 HTTP/1.1\r\n"
    b"Host: relay.local\r\n"
    b"Authorization: Bearer sk-abc\r\n"
    b"x-api-key: key-2\r\n"
    b"Content-Type: application/json\r\n"
    b"Cache-Control: No-Cache\r\n"
    b"X-Forwarded-For: 192.0.2.7\r\n"
    b"X-Forwarded-Proto: https\r\n"
    b"Connection: keep-alive, X-Hop-A , x-hop-b\r\n"
    b"X-Hop-A: a\r\n"
    b"X-HOP-B: b\r\n"
    b"Keep-Alive: timeout=5\r\n"
    b"TE: trailers\r\n"
    b"Trailer: X-T\r\n"
    b"Proxy-Authorization: Basic Zm9v\r\n"
    b"Proxy-Connection: keep-alive\r\n"
    b"OpenAI-Organization: org-1\r\n"
    b"anthropic-version: 2023-06-01\r\n"
    b"Content-Length: 16\r\n"
    b"X-Empty:\r\n"
    b"\r\n"
    b'{"model":"gpt"}\n'
)


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
def test_request_fields(run: Callable[[Awaitable[Any]], Any], bytewise: bool) -> None:
    async def body() -> None:
        server = Server()
        server.feed(FULL_REQUEST, bytewise=bytewise)
        await server.settle()
        (request,) = server.requests
        assert request.method == b"POST"
        assert request.target == b"/v1/chat/completions?stream=1&x=%20"
        assert request.path == b"/v1/chat/completions"
        assert request.body == b'{"model":"gpt"}\n'
        assert request.http_minor == 1 and request.keep_alive
        assert request.client_ip == "10.1.2.3"
        assert request.authorization == b"Bearer sk-abc"
        assert request.api_key == b"key-2"
        assert request.credential == b"sk-abc"  # the Bearer scheme is taken off
        assert request.cache_control == b"no-cache"
        assert request.forwarded_for == b"192.0.2.7"
        assert request.model() == "gpt"
        # Every header kept as sent, in order, for relay's own decisions.
        names = [name for name, _ in request.headers]
        assert names[0] == b"Host" and names[-1] == b"X-Empty" and len(names) == 19
        # Forwarded: end-to-end only, original spelling and order.
        # The credential headers are kept apart (an upstream key replaces them).
        assert request.credential_headers == (
            b"Authorization: Bearer sk-abc\r\n"
            b"x-api-key: key-2\r\n"
        )
        assert request.forward_headers == (
            b"Content-Type: application/json\r\n"
            b"Cache-Control: No-Cache\r\n"
            b"OpenAI-Organization: org-1\r\n"
            b"anthropic-version: 2023-06-01\r\n"
            b"X-Empty: \r\n"
        )
        response = parse(server.transport.take())
        assert [r.status for r in response] == [200]

    run(body())


def test_credential_falls_back_to_api_key(run: Callable[[Awaitable[Any]], Any]) -> None:
    async def body() -> None:
        server = Server(peer=None)
        server.feed(b"GET /a HTTP/1.1\r\nHost: t\r\nx-api-key: sk-ant\r\n\r\nGET /b HTTP/1.1\r\nHost: t\r\n\r\n")
        await server.settle()
        first, second = server.requests
        assert first.credential == b"sk-ant" and first.authorization is None
        assert second.credential is None
        assert first.client_ip == ""  # no peer name (e.g. a UNIX socket)

    run(body())


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
def test_chunked_body_is_assembled(run: Callable[[Awaitable[Any]], Any], bytewise: bool) -> None:
    async def body() -> None:
        server = Server()
        server.feed(b"POST /v1/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"5\r\nhello\r\n1;ext=1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: t\r\n\r\n",
                    bytewise=bytewise)
        await server.settle()
        (request,) = server.requests
        assert request.body == b"hello world"
        assert b"Transfer-Encoding" not in request.forward_headers

    run(body())


def test_http10_request_is_answered_then_closed(run: Callable[[Awaitable[Any]], Any]) -> None:
    async def body() -> None:
        server = Server()
        server.feed(b"GET /v1/models HTTP/1.0\r\n\r\n")
        await server.settle()
        (request,) = server.requests
        assert request.http_minor == 0 and not request.keep_alive
        (response,) = parse(server.transport.take())
        assert response.header(b"connection") == b"close"
        assert response.body == b"GET /v1/models"
        assert server.transport.closed
        assert server.transport.late == []

    run(body())


def test_connection_close_is_honoured_and_later_requests_ignored(
    run: Callable[[Awaitable[Any]], Any],
) -> None:
    async def body() -> None:
        server = Server()
        server.feed(b"GET /1 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\nGET /2 HTTP/1.1\r\nHost: t\r\n\r\n")
        await server.settle()
        assert [r.target for r in server.requests] == [b"/1"]
        (response,) = parse(server.transport.take())
        assert response.header(b"connection") == b"close"
        assert server.transport.closed
        assert server.transport.late == []

    run(body())


# --------------------------------------------------------------- pipelining


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
def test_pipelined_requests_are_answered_in_order(
    run: Callable[[Awaitable[Any]], Any], bytewise: bool,
) -> None:
    async def slow_first(request: Request, conn: ClientConnection) -> None:
        # The first is the slowest: its answer must still come first.
        await asyncio.sleep({b"/1": 0.05, b"/2": 0.01}.get(request.target, 0))
        await echo(request, conn)

    async def body() -> None:
        server = Server(slow_first)
        server.feed(b"GET /1 HTTP/1.1\r\nHost: t\r\n\r\n"
                    b"POST /2 HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc"
                    b"GET /3 HTTP/1.1\r\nHost: t\r\n\r\n", bytewise=bytewise)
        for _ in range(100):
            await asyncio.sleep(0.01)
            if len(server.requests) == 3 and not server.conn.busy:
                break
        responses = parse(server.transport.take())
        assert [r.body for r in responses] == [b"GET /1", b"POST /2", b"GET /3"]
        assert all(r.complete for r in responses)
        assert server.requests[1].body == b"abc"
        assert not server.transport.closed

    run(body())


def test_one_request_at_a_time(run: Callable[[Awaitable[Any]], Any]) -> None:
    async def body() -> None:
        active: list[int] = []
        peak = 0

        async def handler(request: Request, conn: ClientConnection) -> None:
            nonlocal peak
            active.append(1)
            peak = max(peak, len(active))
            await asyncio.sleep(0.001)
            active.pop()
            await echo(request, conn)

        server = Server(handler)
        server.feed(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n" * 10)
        for _ in range(200):
            await asyncio.sleep(0.005)
            if len(server.requests) == 10 and not server.conn.busy:
                break
        assert peak == 1
        assert len(parse(server.transport.take())) == 10

    run(body())


def test_reading_pauses_when_the_pipeline_queue_is_full(
    run: Callable[[Awaitable[Any]], Any],
) -> None:
    async def body() -> None:
        gate = asyncio.Event()

        async def handler(request: Request, conn: ClientConnection) -> None:
            if request.target == b"/0":
                await gate.wait()
            await echo(request, conn)

        server = Server(handler)
        data = b"".join(b"GET /%d HTTP/1.1\r\nHost: t\r\n\r\n" % i for i in range(MAX_PIPELINED + 1))
        server.feed(data)
        await server.settle()
        assert len(server.requests) == 1
        assert server.transport.pauses == 1 and not server.transport.reading
        gate.set()
        for _ in range(100):
            await asyncio.sleep(0.005)
            if len(server.requests) == MAX_PIPELINED + 1 and not server.conn.busy:
                break
        responses = parse(server.transport.take())
        assert [r.body for r in responses] == [b"GET /%d" % i for i in range(MAX_PIPELINED + 1)]
        assert server.transport.reading and server.transport.resumes == 1

    run(body())


def test_bad_request_behind_a_busy_one_waits_its_turn(
    run: Callable[[Awaitable[Any]], Any],
) -> None:
    async def body() -> None:
        gate = asyncio.Event()

        async def handler(request: Request, conn: ClientConnection) -> None:
            await gate.wait()
            await echo(request, conn)

        server = Server(handler)
        server.feed(b"GET /ok HTTP/1.1\r\nHost: t\r\n\r\nGET /bad HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\n"
                    b"Content-Length: 2\r\n\r\n")
        await server.settle()
        assert server.transport.out == b"" and not server.transport.reading
        gate.set()
        await server.settle()
        first, second = parse(server.transport.take())
        assert first.body == b"GET /ok" and first.header(b"connection") is None
        assert second.status == 400 and second.header(b"connection") == b"close"
        assert json.loads(second.body)["error"]["code"] == "bad_request"
        assert server.transport.closed
        assert server.transport.late == []
        assert [r.target for r in server.requests] == [b"/ok"]

    run(body())


# --------------------------------------------------------------- limits in the parser


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost: t\r\n" + b"X-H: 1\r\n" * 129 + b"\r\n", 431),
        (b"GET /" + b"a" * 2100 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 2100 + b"\r\n\r\n", 431),
        (b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1001\r\n\r\n", 413),
        (b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + (b"64\r\n" + b"x" * 100 + b"\r\n") * 11, 413),
        (b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: t\r\nExpect: 200-ok\r\n\r\n", 417),
    ],
    ids=["count", "url", "value", "content-length", "chunked", "te", "host", "expect"],
)
def test_refusals(
    run: Callable[[Awaitable[Any]], Any], data: bytes, status: int, bytewise: bool,
) -> None:
    async def body() -> None:
        server = Server()
        server.feed(data, bytewise=bytewise)
        await server.settle()
        assert server.requests == []
        (response,) = parse(server.transport.take())
        assert response.status == status and response.complete
        assert response.header(b"content-type") == b"application/json"
        assert set(json.loads(response.body)["error"]) == {"message", "type", "code"}
        assert server.transport.closed
        assert server.transport.late == []
        # Bytes arriving after the refusal are ignored.
        server.feed(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        await server.settle()
        assert server.requests == [] and server.transport.out == b""
        assert server.transport.late == []

    run(body())


def test_unfinished_header_is_cut_off_near_twice_the_limit(
    run: Callable[[Awaitable[Any]], Any],
) -> None:
    async def body() -> None:
        server = Server()
        server.feed(b"GET / HTTP/1.1\r\nHost: t\r\nX-Endless: ")
        fed = 0
        while not server.transport.out and fed < 10 * LIMITS.max_header_bytes:
            server.feed(b"a" * 256)
            fed += 256
        assert fed <= 2 * LIMITS.max_header_bytes + 256
        (response,) = parse(server.transport.take())
        assert response.status == 431

    run(body())


def test_pipelined_expect_continue_waits_for_its_turn(
    run: Callable[[Awaitable[Any]], Any],
) -> None:
    gate = asyncio.Event()

    async def handler(request: Request, conn: ClientConnection) -> None:
        if request.target == b"/stream":
            conn.start_response(200, [], None)
            conn.write(b"data: 1\n\n")
            await gate.wait()
            conn.write(b"data: 2\n\n")
            conn.finish()
        else:
            await echo(request, conn)

    async def body() -> None:
        server = Server(handler)
        server.feed(b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\n")
        await server.settle()
        server.feed(b"POST /next HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n"
                    b"Content-Length: 3\r\n\r\n")
        await server.settle()
        assert b"100 Continue" not in server.transport.out  # not inside the chunked body
        gate.set()
        await server.settle()
        data = server.transport.take()
        assert data.endswith(b"0\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n")
        first, interim = parse(data)
        assert first.complete and first.body == b"data: 1\n\ndata: 2\n\n"
        assert interim.status == 100
        server.feed(b"abc")
        await server.settle()
        (second,) = parse(server.transport.take())
        assert second.status == 200 and server.requests[1].body == b"abc"

    run(body())


def test_pipelined_body_sent_without_waiting_gets_no_late_100(
    run: Callable[[Awaitable[Any]], Any],
) -> None:
    gate = asyncio.Event()

    async def handler(request: Request, conn: ClientConnection) -> None:
        if request.target == b"/slow":
            await gate.wait()
        await echo(request, conn)

    async def body() -> None:
        server = Server(handler)
        server.feed(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n"
                    b"POST /next HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n"
                    b"Content-Length: 3\r\n\r\nab")
        await server.settle()
        gate.set()
        await server.settle()
        server.feed(b"c")
        await server.settle()
        data = server.transport.take()
        assert b"100 Continue" not in data
        assert [r.status for r in parse(data)] == [200, 200]

    run(body())


def test_expect_continue_invites_the_body(run: Callable[[Awaitable[Any]], Any]) -> None:
    async def body() -> None:
        server = Server()
        server.feed(b"POST /v1/x HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
        assert server.transport.take() == b"HTTP/1.1 100 Continue\r\n\r\n"
        server.feed(b"abc")
        await server.settle()
        assert server.requests[0].body == b"abc"
        assert b"Expect" not in server.requests[0].forward_headers
        assert parse(server.transport.take())[0].status == 200

    run(body())


# --------------------------------------------------------------- response framing


def test_respond_frames_with_content_length(run: Callable[[Awaitable[Any]], Any]) -> None:
    async def handler(request: Request, conn: ClientConnection) -> None:
        conn.respond(201, [b"X-A: 1\r\n"], b"hello")

    async def body() -> None:
        server = Server(handler)
        server.feed(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        await server.settle()
        assert server.transport.take() == (
            b"HTTP/1.1 201 Created\r\nX-A: 1\r\nContent-Length: 5\r\n\r\nhello")
        assert not server.transport.closed and not server.conn.busy

    run(body())


def test_respond_close_adds_connection_close(run: Callable[[Awaitable[Any]], Any]) -> None:
    async def handler(request: Request, conn: ClientConnection) -> None:
        conn.respond(503, [], b"", close=True)

    async def body() -> None:
        server = Server(handler)
        server.feed(b"GET / HTTP/1.1\r\nHost: t\r\n\r\nGET /never HTTP/1.1\r\nHost: t\r\n\r\n")
        await server.settle()
        assert server.transport.take() == (
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        assert server.transport.closed and len(server.requests) == 1

    run(body())


def test_streamed_response_with_known_length(run: Callable[[Awaitable[Any]], Any]) -> None:
    async def handler(request: Request, conn: ClientConnection) -> None:
        conn.start_response(200, [b"X-A: 1\r\n"], 6)
        conn.write(b"abc")
        conn.write(b"")
        conn.write_many([b"d", b"ef"])
        conn.finish()

    async def body() -> None:
        server = Server(handler)
        server.feed(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        await server.settle()
        assert server.transport.take() == (
            b"HTTP/1.1 200 OK\r\nX-A: 1\r\nContent-Length: 6\r\n\r\nabcdef")
        assert not server.transport.closed

    run(body())


def test_streamed_response_chunked_for_http11(run: Callable[[Awaitable[Any]], Any]) -> None:
    async def handler(request: Request, conn: ClientConnection) -> None:
        conn.start_response(200, [b"Content-Type: text/event-stream\r\n"], None)
        conn.write(b"data: 1\n\n")
        conn.write(b"")  # an empty write must not end the chunked body
        conn.write_many([b"data: 2\n\n", b"data: 3\n\n"])
        conn.write_many([b"", b""])
        conn.finish()

    async def body() -> None:
        server = Server(handler)
        server.feed(b"GET /s HTTP/1.1\r\nHost: t\r\n\r\nGET /next HTTP/1.1\r\nHost: t\r\n\r\n")
        for _ in range(50):
            await asyncio.sleep(0.001)
            if len(server.requests) == 2 and not server.conn.busy:
                break
        data = server.transport.take()
        assert data.startswith(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                               b"Transfer-Encoding: chunked\r\n\r\n"
                               b"9\r\ndata: 1\n\n\r\n"
                               b"12\r\ndata: 2\n\ndata: 3\n\n\r\n"
                               b"0\r\n\r\n")
        first, second = parse(data)
        assert first.complete and first.body == b"data: 1\n\ndata: 2\n\ndata: 3\n\n"
        assert second.status == 200 and second.complete
        assert not server.transport.closed

    run(body())


def test_streamed_response_close_delimited_for_http10(
    run: Callable[[Awaitable[Any]], Any],
) -> None:
    async def handler(request: Request, conn: ClientConnection) -> None:
        conn.start_response(200, [], None)
        conn.write(b"raw ")
        conn.write(b"bytes")
        conn.finish()

    async def body() -> None:
        # Keep-alive asked for, but with no length the end can only be the close.
        server = Server(handler)
        server.feed(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        await server.settle()
        assert server.transport.take() == (
            b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nraw bytes")
        assert server.transport.closed
        assert server.transport.late == []

    run(body())


def test_no_body_status_is_not_chunked(run: Callable[[Awaitable[Any]], Any]) -> None:
    async def handler(request: Request, conn: ClientConnection) -> None:
        conn.start_response(304, [b"ETag: x\r\n"], None)
        conn.finish()

    async def body() -> None:
        server = Server(handler)
        server.feed(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        await server.settle()
        data = server.transport.take()
        assert data.startswith(b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n")
        assert b"Transfer-Encoding" not in data and data.endswith(b"\r\n\r\n")

    run(body())


@pytest.mark.parametrize("status", [204, 304, 200])
def test_bodyless_response_has_no_framing_and_keeps_the_connection(
    run: Callable[[Awaitable[Any]], Any], status: int,
) -> None:
    async def handler(request: Request, conn: ClientConnection) -> None:
        if request.target == b"/next":
            await echo(request, conn)
            return
        # 200 stands for the answer to a HEAD: the upstream's length passes as a header.
        extra = [b"Content-Length: 1234\r\n"] if status == 200 else []
        conn.start_response(status, [b"X-A: 1\r\n", *extra], None, bodyless=True)
        conn.finish()

    async def body() -> None:
        server = Server(handler)
        server.feed(b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\nGET /next HTTP/1.1\r\nHost: t\r\n\r\n")
        for _ in range(50):
            await asyncio.sleep(0.001)
            if len(server.requests) == 2 and not server.conn.busy:
                break
        data = server.transport.take()
        head, rest = data.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        assert lines[1] == b"X-A: 1"
        assert [line for line in lines if line.lower().startswith(b"content-length")] == (
            [b"Content-Length: 1234"] if status == 200 else [])
        assert not any(line.lower().startswith(b"transfer-encoding") for line in lines)
        assert rest.startswith(b"HTTP/1.1 200 OK\r\n")  # the next answer follows at once
        assert not server.transport.closed

    run(body())


def test_handler_errors_become_error_responses(run: Callable[[Awaitable[Any]], Any]) -> None:
    async def handler(request: Request, conn: ClientConnection) -> None:
        if request.target == b"/gateway":
            raise errors.bad_gateway("upstream said no")
        if request.target == b"/bug":
            raise RuntimeError("boom")
        await echo(request, conn)

    async def body() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda loop, context: None)  # the bug's task error
        server = Server(handler)
        server.feed(b"GET /gateway HTTP/1.1\r\nHost: t\r\n\r\nGET /bug HTTP/1.1\r\nHost: t\r\n\r\nGET /ok HTTP/1.1\r\nHost: t\r\n\r\n")
        for _ in range(50):
            await asyncio.sleep(0.001)
            if len(server.requests) == 3 and not server.conn.busy:
                break
        first, second, third = parse(server.transport.take())
        assert first.status == 502
        assert json.loads(first.body)["error"]["message"] == "upstream said no"
        assert second.status == 500
        assert json.loads(second.body)["error"]["type"] == "server_error"
        assert "boom" not in second.body.decode()
        assert third.status == 200

    run(body())


def test_failure_after_the_head_aborts(run: Callable[[Awaitable[Any]], Any]) -> None:
    async def handler(request: Request, conn: ClientConnection) -> None:
        conn.start_response(200, [], None)
        conn.write(b"partial")
        raise errors.bad_gateway("reset")

    async def body() -> None:
        server = Server(handler)
        server.feed(b"GET / HTTP/1.1\r\nHost: t\r\n\r\nGET /never HTTP/1.1\r\nHost: t\r\n\r\n")
        await server.settle()
        (response,) = parse(server.transport.take())
        assert response.status == 200 and not response.complete
        assert server.transport.aborted
        assert len(server.requests) == 1

    run(body())


def test_hold_then_abort_still_sends_what_was_held(run: Callable[[Awaitable[Any]], Any]) -> None:
    """A head and body collected for one upstream read, then a failure in the
    same read: the client must see the head and the cut, not a bare close."""
    async def handler(request: Request, conn: ClientConnection) -> None:
        conn.hold()
        conn.start_response(200, [], None)
        conn.write(b"partial")
        conn.abort()

    async def body() -> None:
        server = Server(handler)
        server.feed(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        await server.settle()
        (response,) = parse(server.transport.take())
        assert response.status == 200 and response.body == b"partial"
        assert not response.complete and server.transport.aborted

    run(body())


def test_respond_after_the_client_left_writes_nothing(
    run: Callable[[Awaitable[Any]], Any],
) -> None:
    async def body() -> None:
        gate = asyncio.Event()

        async def handler(request: Request, conn: ClientConnection) -> None:
            await gate.wait()
            conn.start_response(200, [], None)
            conn.write(b"x")
            conn.finish()

        server = Server(handler)
        server.feed(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        await server.settle()
        server.transport.closed = True
        server.conn.connection_lost(None)
        gate.set()
        await server.settle()
        assert server.transport.out == b"" and server.transport.late == []
        assert server.registry == set()

    run(body())


# --------------------------------------------------------------- flow control


def test_write_buffer_limits_are_set(run: Callable[[Awaitable[Any]], Any]) -> None:
    async def body() -> None:
        server = Server()
        assert server.transport.limits == (WRITE_HIGH_WATER, WRITE_LOW_WATER)
        assert server.registry == {server.conn}

    run(body())


def test_pause_writing_pauses_the_producer_and_drain_waits(
    run: Callable[[Awaitable[Any]], Any],
) -> None:
    async def body() -> None:
        server = Server()
        conn = server.conn
        flow = Flow()
        conn.flow = flow
        await conn.drain()  # not paused: returns at once
        conn.pause_writing()
        assert flow.calls == ["pause"] and conn.writing_paused
        waiters = [asyncio.ensure_future(conn.drain()) for _ in range(2)]
        await server.settle()
        assert not any(w.done() for w in waiters)
        conn.resume_writing()
        await server.settle()
        assert all(w.done() for w in waiters)
        assert flow.calls == ["pause", "resume"] and not conn.writing_paused

    run(body())


def test_connection_lost_wakes_everyone(run: Callable[[Awaitable[Any]], Any]) -> None:
    async def body() -> None:
        server = Server()
        conn = server.conn
        flow = Flow()
        lost: list[int] = []
        conn.flow = flow
        conn.on_lost = lambda: lost.append(1)
        conn.pause_writing()
        waiter = asyncio.ensure_future(conn.drain())
        await server.settle()
        conn.connection_lost(ConnectionResetError())
        await server.settle()
        assert waiter.done() and waiter.exception() is None
        assert flow.calls == ["pause", "resume"]  # the producer must not stay paused
        assert lost == [1]
        assert conn.is_lost and server.registry == set()
        await conn.drain()  # after the loss: never blocks
        conn.connection_lost(None)  # a second report does not call on_lost again
        assert lost == [1]

    run(body())


def test_flow_is_detached_after_each_response(run: Callable[[Awaitable[Any]], Any]) -> None:
    async def handler(request: Request, conn: ClientConnection) -> None:
        conn.flow = Flow()
        conn.on_lost = lambda: None
        await echo(request, conn)

    async def body() -> None:
        server = Server(handler)
        server.feed(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        await server.settle()
        assert server.conn.flow is None and server.conn.on_lost is None

    run(body())


# --------------------------------------------------------------- timers and shutdown


def test_header_timeout_closes_a_silent_connection(run: Callable[[Awaitable[Any]], Any]) -> None:
    async def body() -> None:
        server = Server(limits=ConnectionLimits(1000, 2048, 0.05, 5.0))
        server.feed(b"GET / HTTP/1.1\r\nHost: t\r\nHo")
        await asyncio.sleep(0.15)
        assert server.transport.closed and server.transport.out == b""

    run(body())


def test_idle_timeout_after_a_response(run: Callable[[Awaitable[Any]], Any]) -> None:
    async def body() -> None:
        server = Server(limits=ConnectionLimits(1000, 2048, 5.0, 0.05))
        server.feed(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        await server.settle()
        assert not server.transport.closed
        await asyncio.sleep(0.15)
        assert server.transport.closed
        assert server.transport.late == []

    run(body())


def test_timers_do_not_cut_a_busy_request(run: Callable[[Awaitable[Any]], Any]) -> None:
    async def slow(request: Request, conn: ClientConnection) -> None:
        await asyncio.sleep(0.15)
        await echo(request, conn)

    async def body() -> None:
        server = Server(slow, limits=ConnectionLimits(1000, 2048, 0.05, 0.05))
        server.feed(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        await asyncio.sleep(0.2)
        assert parse(server.transport.take())[0].status == 200

    run(body())


def test_eof_while_idle_closes_and_while_busy_finishes_first(
    run: Callable[[Awaitable[Any]], Any],
) -> None:
    async def body() -> None:
        idle = Server()
        assert not idle.conn.eof_received()

        gate = asyncio.Event()

        async def handler(request: Request, conn: ClientConnection) -> None:
            await gate.wait()
            await echo(request, conn)

        busy = Server(handler)
        busy.feed(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        await busy.settle()
        assert busy.conn.eof_received()  # keep the half-open socket for the answer
        gate.set()
        await busy.settle()
        assert parse(busy.transport.take())[0].status == 200
        assert busy.transport.closed
        assert busy.transport.late == []

    run(body())


def test_shutdown_closes_idle_at_once_and_busy_after_the_response(
    run: Callable[[Awaitable[Any]], Any],
) -> None:
    async def body() -> None:
        idle = Server()
        idle.conn.shutdown()
        assert idle.transport.closed

        gate = asyncio.Event()

        async def handler(request: Request, conn: ClientConnection) -> None:
            await gate.wait()
            await echo(request, conn)

        busy = Server(handler)
        busy.feed(b"GET / HTTP/1.1\r\nHost: t\r\n\r\nGET /queued HTTP/1.1\r\nHost: t\r\n\r\n")
        await busy.settle()
        busy.conn.shutdown()
        assert not busy.transport.closed
        gate.set()
        await busy.settle()
        (response,) = parse(busy.transport.take())
        assert response.header(b"connection") == b"close"
        assert busy.transport.closed and len(busy.requests) == 1

    run(body())


# --------------------------------------------------------------- states


def test_transition_tables() -> None:
    def allowed(table: tuple[int, ...], states: Any) -> dict[str, set[str]]:
        return {old.name: {new.name for new in states if table[old] >> new & 1} for old in states}

    assert allowed(CONN_MOVES, ConnState) == {
        "OPEN": {"IDLE", "CLOSING", "HALF_CLOSED", "CLOSED"},
        "IDLE": {"OPEN", "CLOSING", "HALF_CLOSED", "CLOSED"},
        "CLOSING": {"HALF_CLOSED", "CLOSED"},
        "HALF_CLOSED": {"CLOSED"},
        "CLOSED": set(),
    }
    assert allowed(READ_MOVES, ReadState) == {
        "AWAIT": {"HEAD"},
        "HEAD": {"BODY", "CONTINUE", "UPGRADE"},
        "BODY": {"AWAIT"},
        "CONTINUE": {"BODY", "AWAIT"},
        "UPGRADE": {"AWAIT"},
    }
    assert allowed(ANSWER_MOVES, AnswerState) == {
        "NONE": {"PENDING"},
        "PENDING": {"BODY", "CHUNKED", "NONE"},
        "BODY": {"NONE"},
        "CHUNKED": {"NONE"},
    }


def test_illegal_transitions_raise(run: Callable[[Awaitable[Any]], Any]) -> None:
    async def body() -> None:
        server = Server()
        conn = server.conn
        assert conn.state is ConnState.OPEN
        with pytest.raises(ProtocolStateError, match="answer state NONE -> BODY"):
            conn._set_answer(AnswerState.BODY)
        with pytest.raises(ProtocolStateError, match="read state AWAIT -> BODY"):
            conn._set_read(ReadState.BODY)
        with pytest.raises(ProtocolStateError):
            conn.respond(200, [], b"")  # nothing is being answered
        conn.connection_lost(None)
        assert conn.state is ConnState.CLOSED
        with pytest.raises(ProtocolStateError, match="connection state CLOSED -> OPEN"):
            conn._set_state(ConnState.OPEN)
        assert conn.state is ConnState.CLOSED

    run(body())


def test_a_second_response_head_is_refused(run: Callable[[Awaitable[Any]], Any]) -> None:
    errors_seen: list[BaseException] = []

    async def handler(request: Request, conn: ClientConnection) -> None:
        conn.start_response(200, [], 2)
        try:
            conn.start_response(200, [], 2)
        except ProtocolStateError as exc:
            errors_seen.append(exc)
        conn.write(b"ok")
        conn.finish()

    async def body() -> None:
        server = Server(handler)
        server.feed(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        await server.settle()
        assert len(errors_seen) == 1
        assert server.transport.take() == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    run(body())


def test_eof_before_the_answer_counts_as_gone(run: Callable[[Awaitable[Any]], Any]) -> None:
    seen: list[tuple[bool, bool]] = []
    gate = asyncio.Event()

    async def handler(request: Request, conn: ClientConnection) -> None:
        await gate.wait()
        before = conn.is_lost
        if request.target == b"/answer":
            conn.start_response(200, [], 2)
            seen.append((before, conn.is_lost))
            conn.write(b"ok")
            conn.finish()
        else:
            seen.append((before, conn.is_lost))  # gone: answers nothing, as the pipeline does

    async def body() -> None:
        gone = Server(handler)
        gone.feed(b"GET /gone HTTP/1.1\r\nHost: t\r\n\r\n")
        await gone.settle()
        assert not gone.conn.is_lost
        assert gone.conn.eof_received()
        assert gone.conn.state is ConnState.HALF_CLOSED
        answered = Server(handler)
        answered.feed(b"GET /answer HTTP/1.1\r\nHost: t\r\n\r\n")
        await answered.settle()
        answered.conn.eof_received()
        gate.set()
        await gone.settle()
        await answered.settle()
        assert seen == [(True, True), (True, False)]
        assert gone.transport.out == b"" and gone.transport.closed  # closed, nothing written
        assert parse(answered.transport.take())[0].body == b"ok"  # started: written out
        assert answered.transport.closed

    run(body())


@pytest.mark.parametrize("bytewise", [False, True])
@pytest.mark.parametrize(
    "good",
    [
        b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n",
        b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc",
        b"POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2;x=y\r\nab\r\n1\r\nc\r\n0\r\nX-T: 1\r\n\r\n",
    ],
)
@pytest.mark.parametrize(
    ("bad", "status"),
    [
        (b"GET  /b HTTP/1.1\r\nHost: t\r\n\r\n", 400),
        (b"GET /b\r\n", 400),
        (b"GET /b HTTP/2.0\r\nHost: t\r\n\r\n", 505),
    ],
)
def test_every_pipelined_request_line_is_checked(
    run: Callable[[Awaitable[Any]], Any], bytewise: bool, good: bytes, bad: bytes, status: int,
) -> None:
    async def body() -> None:
        server = Server()
        server.feed(good + good + bad, bytewise=bytewise)
        await server.settle()
        responses = parse(server.transport.take())
        assert [r.status for r in responses] == [200, 200, status]
        assert len(server.requests) == 2 and server.transport.closed

    run(body())
