"""The contract's "Bad input" rules, through real sockets on both loops:
malformed or ambiguous requests are answered by relay itself (OpenAI error
shape, connection closed) and never reach the upstream; limits and timeouts
hold against clients that send too much or too slowly."""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

from relay.testing import ThreadedFakeUpstream
from tests.support import RelayThread

if TYPE_CHECKING:
    from tests.conftest import RawClient, RelayFactory, Response

MAX_HEADER = 4096
MAX_BODY = 1000
SECRET = b"Bearer sk-bad-input-secret-0123456789"
ANSWER_TIMEOUT = 30.0  # generous: the machine may be busy


def error_of(response: Response, status: int) -> dict[str, str]:
    """Assert a relay-made error: status, JSON type, OpenAI shape; its fields."""
    assert response.complete, "the error response must be complete"
    assert response.status == status
    assert response.header("content-type") == "application/json"
    doc = json.loads(response.body)
    assert set(doc) == {"error"}
    error = doc["error"]
    assert {"message", "type", "code"} <= set(error)
    assert all(isinstance(error[k], str) and error[k] for k in ("message", "type", "code"))
    assert SECRET.decode() not in response.body.decode()
    return error


class Untouched:
    """Proof the upstream saw nothing: no request and no connection since creation."""

    def __init__(self, upstream: ThreadedFakeUpstream) -> None:
        self.upstream = upstream
        self.requests = len(upstream.requests)
        self.connections = upstream.connections_opened

    def check(self) -> None:
        assert len(self.upstream.requests) == self.requests, "request was forwarded"
        assert self.upstream.connections_opened == self.connections


@pytest.fixture
def relay(relay_factory: RelayFactory, fake_upstream: ThreadedFakeUpstream) -> RelayThread:
    return relay_factory(
        fake_upstream.url,
        server={"max_header_bytes": MAX_HEADER, "max_body_bytes": MAX_BODY},
    )


def rejected(
    relay: RelayThread,
    upstream: ThreadedFakeUpstream,
    connect: Callable[[int], RawClient],
    data: bytes,
    status: int,
) -> dict[str, str]:
    """Send *data*; expect a relay-made *status*, a close, and nothing forwarded."""
    untouched = Untouched(upstream)
    client = connect(relay.port)
    client.send(data)
    error = error_of(client.response(), status)
    client.wait_closed()
    untouched.check()
    return error


def send_until_answered(client: RawClient, pieces: list[bytes], enough: int) -> int:
    """Send *pieces* one by one until *enough* bytes are out, then wait for the answer.

    *enough* is the point by which the server must have answered; nothing
    more is sent after it, so an answer proves the server refused without
    reading on (a server that waits for more never answers, and the test
    fails on the client's timeout). Sending stops as soon as the server has
    answered: writing into a socket it is closing could reset the answer
    away. Returns the bytes sent.
    """
    sent = 0
    answered = False
    for piece in pieces:
        answered = bool(select.select([client.sock], [], [], 0)[0])
        if answered or sent >= enough:
            break
        try:
            client.send(piece)
        except (BrokenPipeError, ConnectionResetError):
            break
        sent += len(piece)
    assert answered or sent >= enough, "ran out of pieces before the server had to answer"
    readable, _, _ = select.select([client.sock], [], [], ANSWER_TIMEOUT)
    assert readable, f"no answer within {ANSWER_TIMEOUT} s after {sent} bytes"
    return sent


# --------------------------------------------------------------- malformed


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"NOT A REQUEST\r\n\r\n", id="garbage-line"),
        pytest.param(b"GET / HTTP/1.1 extra\r\nHost: x\r\n\r\n", id="extra-token"),
        pytest.param(b"GET /\x00x HTTP/1.1\r\nHost: x\r\n\r\n", id="nul-in-target"),
        pytest.param(b"GET / HTTP/1.1\nHost: x\n\n", id="bare-lf"),
        pytest.param(b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n", id="space-in-name"),
        pytest.param(b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", id="space-before-colon"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n folded\r\n\r\n", id="obs-fold"),
        pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", id="tls-hello"),
    ],
)
def test_malformed_request_is_400_and_closed(
    relay: RelayThread, fake_upstream: ThreadedFakeUpstream, connect: Callable[[int], RawClient],
    data: bytes,
) -> None:
    error = rejected(relay, fake_upstream, connect, data, 400)
    assert error["type"] == "invalid_request_error"


def test_malformed_request_fed_byte_by_byte(
    relay: RelayThread, fake_upstream: ThreadedFakeUpstream, connect: Callable[[int], RawClient],
) -> None:
    untouched = Untouched(fake_upstream)
    client = connect(relay.port)
    client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    head = b"GET / HTTP/1.1\r\nHo\x01st: x\r\n\r\n"
    # The bad byte is all relay needs to refuse: it gets no byte after it.
    sent = send_until_answered(client, [bytes([b]) for b in head], head.index(b"\x01") + 1)
    assert sent < len(head)  # refused mid-head
    error_of(client.response(), 400)
    client.wait_closed()
    untouched.check()


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"GET /v1/realtime HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                     b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n", id="websocket"),
        pytest.param(b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n\r\n",
                     id="connect"),
    ],
)
def test_upgrade_is_refused_with_one_answer(
    relay: RelayThread, fake_upstream: ThreadedFakeUpstream, connect: Callable[[int], RawClient],
    data: bytes,
) -> None:
    """One request, one answer: relay cannot switch protocols, so it must
    refuse instead of forwarding a stripped request and then also sending a 400."""
    rejected(relay, fake_upstream, connect, data, 400)


def test_error_never_echoes_credentials(
    relay: RelayThread, fake_upstream: ThreadedFakeUpstream, connect: Callable[[int], RawClient],
) -> None:
    data = b"POST /v1/chat/completions HTTP/1.1\r\nAuthorization: " + SECRET + b"\r\nBad\x01: 1\r\n\r\n"
    error = rejected(relay, fake_upstream, connect, data, 400)
    assert "sk-" not in error["message"]


# --------------------------------------------------------------- request line


@pytest.mark.parametrize(
    ("data", "status"),
    [
        pytest.param(b"GET /\r\n", 400, id="http09"),
        pytest.param(b"GET /v1/models\r\n", 400, id="http09-path"),
        pytest.param(b"GET  /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", 400, id="two-spaces-before-target"),
        pytest.param(b"GET /v1/models  HTTP/1.1\r\nHost: x\r\n\r\n", 400, id="two-spaces-before-version"),
        pytest.param(b"GET  /  HTTP/1.1\r\nHost: x\r\n\r\n", 400, id="spaces-everywhere"),
        pytest.param(b"GET /v1/models HTTP/2.0\r\nHost: x\r\n\r\n", 505, id="http2"),
        pytest.param(b"GET /v1/models HTTP/1.2\r\nHost: x\r\n\r\n", 505, id="http12"),
        pytest.param(b"GET /v1/models HTTP/3.0\r\nHost: x\r\n\r\n", 505, id="http3"),
        pytest.param(b"GET /v1/models HTTP/0.9\r\nHost: x\r\n\r\n", 505, id="http09-versioned"),
        pytest.param(b"GET /v1/models HTTP/1.1\r\n\r\n", 400, id="http11-without-host"),
        pytest.param(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", 400,
                     id="http11-post-without-host"),
    ],
)
def test_request_line_hygiene(
    relay: RelayThread, fake_upstream: ThreadedFakeUpstream, connect: Callable[[int], RawClient],
    data: bytes, status: int,
) -> None:
    """Answered at once (the client's 5 s read timeout is below the 10 s head
    timeout: a held connection fails here), closed, and never forwarded."""
    error = rejected(relay, fake_upstream, connect, data, status)
    assert error["type"] == "invalid_request_error"
    if status == 505:
        assert error["code"] == "http_version_not_supported"


def test_http09_line_cut_across_reads_is_refused_at_once(
    relay: RelayThread, fake_upstream: ThreadedFakeUpstream, connect: Callable[[int], RawClient],
) -> None:
    untouched = Untouched(fake_upstream)
    client = connect(relay.port)
    client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for piece in (b"GE", b"T /v1/mo", b"dels", b"\r", b"\n"):
        client.send(piece)
        time.sleep(0.02)
    error_of(client.response(), 400)
    client.wait_closed()
    untouched.check()


def test_http10_without_host_is_served(
    relay: RelayThread, fake_upstream: ThreadedFakeUpstream, connect: Callable[[int], RawClient],
) -> None:
    before = len(fake_upstream.requests)
    client = connect(relay.port)
    client.send(b"GET /v1/models HTTP/1.0\r\n\r\n")
    response = client.response()
    assert response.status == 200 and json.loads(response.body)["object"] == "list"
    assert len(fake_upstream.requests) == before + 1


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(b"GET  /v1/models  HTTP/1.1\r\nHost: x\r\n\r\n", id="extra-spaces"),
        pytest.param(b"GET /v1/models\r\n", id="http09"),
        pytest.param(b"GET /v1/models HTTP/1.1\r\n\r\n", id="no-host"),
    ],
)
@pytest.mark.parametrize(
    "good",
    [
        pytest.param(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", id="get"),
        pytest.param(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 18\r\n\r\n{\"model\":\"gpt-4o\"}", id="post"),
        pytest.param(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n8;ext=1\r\n{\"model\"\r\nA\r\n:\"gpt-4o\"}\r\n"
                     b"0\r\nX-Trailer: 1\r\n\r\n", id="post-chunked"),
    ],
)
def test_bad_request_line_pipelined_in_the_same_packet_is_caught(
    relay: RelayThread, fake_upstream: ThreadedFakeUpstream, connect: Callable[[int], RawClient],
    good: bytes, bad: bytes,
) -> None:
    """The second request line starts mid-read: relay still finds and checks it."""
    before = len(fake_upstream.requests)
    client = connect(relay.port)
    client.send(good + b"\r\n" + good + bad)  # an empty line between requests is allowed
    for _ in range(2):
        assert client.response().status == 200
    error_of(client.response(), 400)
    client.wait_closed()
    assert len(fake_upstream.requests) == before + 2


# --------------------------------------------------------------- head limits


def test_head_larger_than_limit_is_431(
    relay: RelayThread, fake_upstream: ThreadedFakeUpstream, connect: Callable[[int], RawClient],
) -> None:
    headers = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"v" * 500) for i in range(10))
    data = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n"
    assert len(data) > MAX_HEADER
    error = rejected(relay, fake_upstream, connect, data, 431)
    assert error["code"] == "request_header_fields_too_large"


def test_long_request_target_is_431(
    relay: RelayThread, fake_upstream: ThreadedFakeUpstream, connect: Callable[[int], RawClient],
) -> None:
    data = b"GET /v1/models?q=" + b"a" * (MAX_HEADER + 10) + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    rejected(relay, fake_upstream, connect, data, 431)


def test_head_just_under_limit_is_served(
    relay: RelayThread, fake_upstream: ThreadedFakeUpstream, connect: Callable[[int], RawClient],
) -> None:
    # The limit refuses only what is above it: a big but legal head passes.
    headers = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"v" * 500) for i in range(6))
    client = connect(relay.port)
    client.send(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    response = client.response()
    assert response.status == 200 and response.complete
    assert fake_upstream.requests[-1].header("x-pad-5") == "v" * 500


def test_too_many_headers_is_431(
    relay: RelayThread, fake_upstream: ThreadedFakeUpstream, connect: Callable[[int], RawClient],
) -> None:
    headers = b"".join(b"X-H%d: 1\r\n" % i for i in range(200))
    data = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n"
    assert len(data) < MAX_HEADER  # the count, not the size, is what is refused
    rejected(relay, fake_upstream, connect, data, 431)


def test_slow_unfinished_header_value_is_431_without_reading_on(
    relay: RelayThread, fake_upstream: ThreadedFakeUpstream, connect: Callable[[int], RawClient],
) -> None:
    """One header value that never ends: llhttp would buffer it forever, relay
    must cut it off near twice the limit instead of reading on."""
    untouched = Untouched(fake_upstream)
    client = connect(relay.port)
    client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.send(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Huge: ")
    piece = b"a" * 512
    # Relay must cut the value off once the head passes twice the limit.
    sent = send_until_answered(client, [piece] * (6 * MAX_HEADER // len(piece)), 2 * MAX_HEADER + 1)
    error_of(client.response(), 431)
    assert sent < 4 * MAX_HEADER, f"relay read {sent} bytes of one header value"
    client.wait_closed()
    untouched.check()


# --------------------------------------------------------------- body limits


def test_content_length_above_limit_is_413_before_the_body(
    relay: RelayThread, fake_upstream: ThreadedFakeUpstream, connect: Callable[[int], RawClient],
) -> None:
    # No body byte is ever sent: relay must answer from the head alone.
    data = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1))
    error = rejected(relay, fake_upstream, connect, data, 413)
    assert error["code"] == "request_too_large"


def test_content_length_above_limit_with_expect_gets_no_100_continue(
    relay: RelayThread, fake_upstream: ThreadedFakeUpstream, connect: Callable[[int], RawClient],
) -> None:
    data = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: 50000000\r\n\r\n")
    client = connect(relay.port)
    client.send(data)
    response = client.response()
    assert response.status == 413  # not an interim 100 inviting the body
    client.wait_closed()


def test_body_at_limit_is_served(
    relay: RelayThread, fake_upstream: ThreadedFakeUpstream, connect: Callable[[int], RawClient],
) -> None:
    body = b'{"model":"gpt-4o","messages":[],"pad":"' + b"x" * (MAX_BODY - 45) + b'"}'
    assert len(body) <= MAX_BODY
    client = connect(relay.port)
    client.send(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    assert client.response().complete
    assert fake_upstream.requests[-1].body == body


def test_chunked_body_growing_past_limit_is_413(
    relay: RelayThread, fake_upstream: ThreadedFakeUpstream, connect: Callable[[int], RawClient],
) -> None:
    untouched = Untouched(fake_upstream)
    client = connect(relay.port)
    client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")
    piece = b"190\r\n" + b"x" * 400 + b"\r\n"
    # The body never ends: relay must refuse it once it passes the limit.
    sent = send_until_answered(client, [piece] * 20, MAX_BODY + 1)
    assert sent < 10 * len(piece)
    error_of(client.response(), 413)
    client.wait_closed()
    untouched.check()


# --------------------------------------------------------------- ambiguous framing


FRAMING = {
    "cl-and-te": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "te-and-cl": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                 b"Content-Length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "differing-cl": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                    b"Content-Length: 6\r\n\r\nhello!",
    "identical-cl": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                    b"Content-Length: 5\r\n\r\nhello",
    "cl-list": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\nhello",
    "cl-sign": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello",
    "cl-overflow": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                   b"Content-Length: 99999999999999999999999\r\n\r\n",
    "bad-chunk-size": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    "chunk-longer-than-size": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                              b"Transfer-Encoding: chunked\r\n\r\n3\r\nhello\r\n0\r\n\r\n",
    "te-gzip-chunked": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                       b"Transfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "te-chunked-gzip": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                       b"Transfer-Encoding: chunked, gzip\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "te-identity": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                   b"Transfer-Encoding: identity\r\n\r\nhello",
    "te-twice": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "duplicate-host": b"GET /v1/models HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
}


@pytest.mark.parametrize("data", FRAMING.values(), ids=FRAMING.keys())
def test_ambiguous_framing_is_400_and_never_forwarded(
    relay: RelayThread, fake_upstream: ThreadedFakeUpstream, connect: Callable[[int], RawClient],
    data: bytes,
) -> None:
    rejected(relay, fake_upstream, connect, data, 400)


def test_unsupported_expectation_is_417(
    relay: RelayThread, fake_upstream: ThreadedFakeUpstream, connect: Callable[[int], RawClient],
) -> None:
    data = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nExpect: something-else\r\n\r\n"
    rejected(relay, fake_upstream, connect, data, 417)


# --------------------------------------------------------------- pipelining


def test_good_then_bad_pipelined_answers_in_order_then_closes(
    relay: RelayThread, fake_upstream: ThreadedFakeUpstream, connect: Callable[[int], RawClient],
) -> None:
    before = len(fake_upstream.requests)
    client = connect(relay.port)
    client.send(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
                b"GET /v1/models HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
    first = client.response()
    assert first.status == 200 and first.complete
    assert json.loads(first.body)["object"] == "list"
    error_of(client.response(), 400)
    client.wait_closed()
    assert len(fake_upstream.requests) == before + 1


def test_bad_request_behind_a_slow_one_waits_its_turn(
    relay: RelayThread, fake_upstream: ThreadedFakeUpstream, connect: Callable[[int], RawClient],
) -> None:
    """The bad request is parsed while the first is still upstream: its 400
    must not jump ahead of the first response."""
    before = len(fake_upstream.requests)
    client = connect(relay.port)
    client.send(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nx-fake-delay: 0.2\r\n\r\n")
    time.sleep(0.05)
    client.send(b"BROKEN\x01\r\n\r\n")
    first = client.response()
    assert first.status == 200 and first.complete
    error_of(client.response(), 400)
    client.wait_closed()
    assert len(fake_upstream.requests) == before + 1


def test_keep_alive_serves_many_then_refuses_bad(
    relay: RelayThread, fake_upstream: ThreadedFakeUpstream, connect: Callable[[int], RawClient],
) -> None:
    client = connect(relay.port)
    for _ in range(3):
        client.send(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        assert client.response().status == 200
    client.send(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n")
    error_of(client.response(), 400)
    client.wait_closed()


# --------------------------------------------------------------- timeouts


@pytest.fixture
def quick(relay_factory: RelayFactory, fake_upstream: ThreadedFakeUpstream) -> RelayThread:
    return relay_factory(fake_upstream.url, server={"header_timeout": 0.3, "idle_timeout": 0.4})


def test_silent_connection_is_closed_after_header_timeout(
    quick: RelayThread, connect: Callable[[int], RawClient],
) -> None:
    client = connect(quick.port)
    waited = client.wait_closed(timeout=3)
    assert 0.2 <= waited < 2.0


def test_slow_head_is_closed_after_header_timeout(
    quick: RelayThread, fake_upstream: ThreadedFakeUpstream, connect: Callable[[int], RawClient],
) -> None:
    """A slowloris trickling bytes does not reset the head timer."""
    untouched = Untouched(fake_upstream)
    client = connect(quick.port)
    client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    start = time.monotonic()
    head = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
    for byte in head:
        try:
            client.send(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            break
        readable, _, _ = select.select([client.sock], [], [], 0.05)
        if readable or time.monotonic() - start > 3:
            break
    client.wait_closed(timeout=3)
    assert 0.2 <= time.monotonic() - start < 2.0
    untouched.check()


def test_idle_keep_alive_is_closed_after_idle_timeout(
    quick: RelayThread, connect: Callable[[int], RawClient],
) -> None:
    client = connect(quick.port)
    client.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    response = client.response()
    assert response.status == 200 and response.header("connection") is None
    waited = client.wait_closed(timeout=3)
    assert 0.3 <= waited < 2.0


def test_keep_alive_activity_restarts_the_idle_timer(
    quick: RelayThread, connect: Callable[[int], RawClient],
) -> None:
    # Five requests spread over more than one idle_timeout on one connection.
    client = connect(quick.port)
    for _ in range(5):
        client.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert client.response().status == 200
        time.sleep(0.15)
    assert not client.closed


def test_body_that_stops_arriving_is_closed(
    quick: RelayThread, fake_upstream: ThreadedFakeUpstream, connect: Callable[[int], RawClient],
) -> None:
    untouched = Untouched(fake_upstream)
    client = connect(quick.port)
    client.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    waited = client.wait_closed(timeout=3)
    assert waited < 2.0
    untouched.check()
