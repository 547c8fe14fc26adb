"""The two twins of each connection class behave the same, byte for byte.

``relay.http._client_py`` is the source and ``relay.http._client_c`` the same
source compiled with typed state (``_client_c.pxd``); likewise
``relay.upstream._conn_py`` and ``_conn_c``. Both are fed the same byte
streams, cut into reads at arbitrary points: the client twins must write the
same bytes, end in the same states and refuse the same transitions; the
upstream twins must hand their sink the same events.
"""

from __future__ import annotations

import asyncio
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.http import _client_py
from relay.http.request import Request
from relay.http.states import AnswerState, ConnState, ProtocolStateError, ReadState
from relay.upstream import _conn_py
from relay.upstream.sink import UpstreamError
from tests.support import compiled_twin_or_skip


@pytest.fixture(scope="module")
def compiled() -> ModuleType:
    return compiled_twin_or_skip("relay.http._client_c")


class _Transport:
    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False
        self.aborted = False
        self.reading = True

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.out += data

    def writelines(self, parts: Any) -> None:
        for part in parts:
            self.write(part)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("10.0.0.1", 5000) if name == "peername" else default

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass


def _answer(request: Request, conn: Any) -> None:
    """Answered at once (no task): the method, target and body echoed."""
    conn.respond(200, [b"X-Method: %s\r\n" % request.method], request.target + b"|" + request.body)


def _serve(module: ModuleType, reads: list[bytes], loop: asyncio.AbstractEventLoop) -> tuple:
    limits = module.ConnectionLimits(
        max_body_bytes=64, max_header_bytes=512, header_timeout=5.0, idle_timeout=5.0
    )
    conn = module.ClientConnection(_answer, limits, set(), loop)
    transport = _Transport()
    conn.connection_made(transport)
    for data in reads:
        conn.data_received(data)
        # Pipelined requests are answered on later turns of the loop.
        for _ in range(4):
            loop.run_until_complete(asyncio.sleep(0))
    result = (bytes(transport.out), transport.closed, transport.aborted, conn.state, conn.busy)
    conn.connection_lost(None)
    return result


# Requests of every shape the contract names: keep-alive, close, HTTP/1.0,
# a chunked body, 100-continue, an h2c offer, and refusals (bad line, bad
# version, too large, smuggling-prone framing, upgrade).
REQUESTS = [
    b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=1\r\nde\r\n0\r\n\r\n",
    b"POST /d HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok",
    b"GET /e HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
    b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n",
    b"GET /f HTTP/1.0\r\n\r\n",
    b"GET /g HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET  /h HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /i HTTP/2.0\r\nHost: x\r\n\r\n",
    b"GET /j\r\n\r\n",
    b"POST /k HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n",
    b"POST /l HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    b"GET /m HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"GET /n HTTP/1.1\r\n\r\n",
    b"GET /o HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * 600 + b"\r\n\r\n",
    b"\r\nGET /p HTTP/1.1\r\nHost: x\r\n\r\n",
]


def _cut(stream: bytes, points: list[int]) -> list[bytes]:
    cuts = sorted({p % (len(stream) + 1) for p in points})
    edges = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in zip(edges, edges[1:], strict=False) if b > a]


@settings(max_examples=150, deadline=None)
@given(
    picks=st.lists(st.integers(0, len(REQUESTS) - 1), min_size=1, max_size=5),
    points=st.lists(st.integers(0, 10_000), max_size=6),
)
def test_twins_write_the_same_bytes(
    compiled: ModuleType, picks: list[int], points: list[int]
) -> None:
    stream = b"".join(REQUESTS[i] for i in picks)
    reads = _cut(stream, points)
    loop = asyncio.new_event_loop()
    try:
        pure = _serve(_client_py, reads, loop)
        by_compiled = _serve(compiled, reads, loop)
    finally:
        loop.close()
    assert by_compiled == pure


@pytest.mark.parametrize("index", range(len(REQUESTS)))
def test_twins_answer_each_request_alike(compiled: ModuleType, index: int) -> None:
    loop = asyncio.new_event_loop()
    try:
        pure = _serve(_client_py, [REQUESTS[index]], loop)
        by_compiled = _serve(compiled, [REQUESTS[index]], loop)
    finally:
        loop.close()
    assert by_compiled == pure
    assert pure[0].startswith(b"HTTP/1.1 ")  # every one is answered (or refused)


@pytest.mark.parametrize("module_name", ["pure", "compiled"])
def test_twins_share_states_and_refuse_the_same_transitions(
    request: pytest.FixtureRequest, module_name: str
) -> None:
    module = _client_py if module_name == "pure" else request.getfixturevalue("compiled")
    loop = asyncio.new_event_loop()
    try:
        limits = module.ConnectionLimits(64, 512, 5.0, 5.0)
        conn = module.ClientConnection(_answer, limits, set(), loop)
        conn.connection_made(_Transport())
        assert conn.state is ConnState.OPEN
        with pytest.raises(ProtocolStateError, match="answer state NONE -> BODY"):
            conn._set_answer(AnswerState.BODY)
        with pytest.raises(ProtocolStateError, match="read state AWAIT -> UPGRADE"):
            conn._set_read(ReadState.UPGRADE)
        conn.connection_lost(None)
        assert conn.state is ConnState.CLOSED
        with pytest.raises(ProtocolStateError, match="connection state CLOSED -> IDLE"):
            conn._set_state(ConnState.IDLE)
    finally:
        loop.close()


# -- the upstream connection ---------------------------------------------------


@pytest.fixture(scope="module")
def compiled_upstream() -> ModuleType:
    return compiled_twin_or_skip("relay.upstream._conn_c")


class _Sink:
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def on_head(self, status: int, headers: list[tuple[bytes, bytes]], length: int | None) -> None:
        self.events.append(("head", status, tuple(headers), length))

    def on_body(self, chunk: bytes) -> None:
        self.events.append(("body", chunk))

    def on_complete(self) -> None:
        self.events.append(("complete",))

    def on_error(self, error: UpstreamError) -> None:
        self.events.append(("error", error.reason, error.timeout))

    def on_read_end(self) -> None:
        self.events.append(("read_end",))


def _exchange(module: ModuleType, reads: list[bytes], head_only: bool, clean_close: bool) -> tuple:
    loop = asyncio.new_event_loop()
    try:
        closed: list[bool] = []
        conn = module.UpstreamConnection(loop, 30.0, lambda: closed.append(True))
        transport = _Transport()
        conn.connection_made(transport)
        sink = _Sink()
        conn.send([b"GET / HTTP/1.1\r\n\r\n"], sink, head_only=head_only)
        for data in reads:
            conn.data_received(data)
        reusable = conn.reusable
        conn.connection_lost(None if clean_close else ConnectionResetError())
        return (
            sink.events, reusable, conn.head, bytes(transport.out), transport.aborted,
            conn.received_any, closed,
        )
    finally:
        loop.close()


RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: 1\n\ndata: 2\n\n",
    b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 204 No Content\r\nX-A: b\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nConnection: close\r\n\r\nshort",
    b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Encoding: gzip\r\nSet-Cookie: a=b\r\n\r\nabc",
    b"HTTP/1.1 2x0 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA",
]


@settings(max_examples=150, deadline=None)
@given(
    index=st.integers(0, len(RESPONSES) - 1),
    points=st.lists(st.integers(0, 10_000), max_size=5),
    head_only=st.booleans(),
    clean_close=st.booleans(),
)
def test_upstream_twins_hand_on_the_same_events(
    compiled_upstream: ModuleType, index: int, points: list[int], head_only: bool, clean_close: bool
) -> None:
    reads = _cut(RESPONSES[index], points)
    pure = _exchange(_conn_py, reads, head_only, clean_close)
    assert _exchange(compiled_upstream, reads, head_only, clean_close) == pure
    assert pure[0]  # something reached the sink
