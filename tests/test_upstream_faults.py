"""Upstream faults, through real sockets on both loops: what the upstream
says passes unchanged, and when it fails (refuses, stalls, resets, lies
about lengths, speaks garbage) the client gets a 502/504 in the error shape
or a visibly cut stream, and relay keeps serving."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest

from relay.testing import ThreadedFakeUpstream
from tests.support import RelayThread, free_port, unanswered_port

if TYPE_CHECKING:
    from tests.conftest import RawClient, RelayFactory, Response

READ_TIMEOUT = 0.3
OK_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
CHAT_STREAM = json.dumps(
    {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "one two three"}]}
).encode()


def error_of(response: Response, status: int) -> dict[str, str]:
    """Assert a relay-made error (status, JSON, OpenAI shape); return its fields."""
    assert response.complete
    assert response.status == status
    assert response.header("content-type") == "application/json"
    error = json.loads(response.body)["error"]
    assert all(isinstance(error[k], str) and error[k] for k in ("message", "type", "code"))
    return error


def get(path: str = "/v1/models", *headers: str, close: bool = False) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: relay", *headers]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def post(path: str, body: bytes, *headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: relay", "Content-Type: application/json",
             f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def wait_for(predicate: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@pytest.fixture
def relay(relay_factory: RelayFactory, fake_upstream: ThreadedFakeUpstream) -> RelayThread:
    return relay_factory(fake_upstream.url, proxy={"read_timeout": READ_TIMEOUT})


@pytest.fixture
def own_upstream() -> Iterator[ThreadedFakeUpstream]:
    """A fake upstream for one test, so its connection counts are exact."""
    with ThreadedFakeUpstream() as upstream:
        yield upstream


class CannedUpstream:
    """A tiny upstream that answers every request head with the same raw bytes.

    For what the fake upstream cannot say: arbitrary headers, interim
    responses, close-delimited bodies.
    """

    def __init__(self, response: bytes, *, close: bool = False,
                 answers: int | None = None) -> None:
        self.response = response
        self.close = close
        self.answers = answers  # per connection; the next request is met with a close
        self.heads: list[bytes] = []
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(0.05)
        buffer = b""
        answered = 0
        with conn:
            while not self._stop.is_set():
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                buffer += data
                while b"\r\n\r\n" in buffer:  # bodiless requests only
                    head, buffer = buffer.split(b"\r\n\r\n", 1)
                    self.heads.append(head)
                    if self.answers is not None and answered >= self.answers:
                        return
                    conn.sendall(self.response)
                    answered += 1
                    if self.close:
                        return

    def stop(self) -> None:
        self._stop.set()
        self._listener.close()
        for thread in self._threads:
            thread.join(2)


@pytest.fixture
def canned() -> Iterator[Callable[..., CannedUpstream]]:
    servers: list[CannedUpstream] = []

    def make(response: bytes, *, close: bool = False, answers: int | None = None) -> CannedUpstream:
        server = CannedUpstream(response, close=close, answers=answers)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


# --------------------------------------------------------------- pass-through


@pytest.mark.parametrize("status", [400, 401, 404, 429, 500, 503])
def test_upstream_error_status_and_body_pass_unchanged(
    relay: RelayThread, fake_upstream: ThreadedFakeUpstream, connect: Callable[[int], RawClient],
    status: int,
) -> None:
    request = post("/v1/chat/completions", b'{"model":"gpt-4o","messages":[]}',
                   f"x-fake-status: {status}")
    direct = connect(fake_upstream.port)
    direct.send(request)
    expected = direct.response()
    client = connect(relay.port)
    client.send(request)
    got = client.response()
    assert got.complete and expected.complete
    assert got.status == expected.status == status
    assert got.body == expected.body
    assert got.header("content-type") == expected.header("content-type")
    # An upstream error is not a reason to drop the client's keep-alive.
    client.send(get("/healthz"))
    assert client.response().status == 200


def test_upstream_headers_pass_unchanged_and_hop_by_hop_dropped(
    relay_factory: RelayFactory, canned: Callable[..., CannedUpstream],
    connect: Callable[[int], RawClient],
) -> None:
    body = b'{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}'
    upstream = canned(
        b"HTTP/1.1 429 Too Many Requests\r\n"
        b"Content-Type: application/json; charset=utf-8\r\n"
        b"Retry-After: 7\r\n"
        b"x-ratelimit-remaining-requests: 0\r\n"
        b"X-Request-ID: req_abc123\r\n"
        b"Set-Cookie: a=1\r\n"
        b"Set-Cookie: b=2\r\n"
        b"Connection: keep-alive, X-Hop\r\n"
        b"X-Hop: secret-hop\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    relay = relay_factory(upstream.url)
    client = connect(relay.port)
    client.send(get())
    response = client.response()
    assert response.status == 429 and response.body == body
    names = [name for name, _ in response.headers]
    assert response.header("retry-after") == "7"
    assert response.header("x-ratelimit-remaining-requests") == "0"
    assert response.header("x-request-id") == "req_abc123"
    assert response.header("content-type") == "application/json; charset=utf-8"
    assert [v for k, v in response.headers if k == "set-cookie"] == ["a=1", "b=2"]
    assert "x-hop" not in names and "keep-alive" not in names and "connection" not in names
    # Upstream order is kept for what passes.
    passed = [n for n in names if n in ("retry-after", "x-request-id", "set-cookie")]
    assert passed == ["retry-after", "x-request-id", "set-cookie", "set-cookie"]


def test_interim_response_is_not_relayed_as_the_answer(
    relay_factory: RelayFactory, canned: Callable[..., CannedUpstream],
    connect: Callable[[int], RawClient],
) -> None:
    upstream = canned(b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n"
                      b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 2\r\n\r\n{}")
    relay = relay_factory(upstream.url)
    client = connect(relay.port)
    client.send(get())
    response = client.response()
    assert response.status == 200 and response.body == b"{}"
    client.send(get("/healthz"))
    assert client.response().status == 200


def test_close_delimited_upstream_body_reaches_client_whole(
    relay_factory: RelayFactory, canned: Callable[..., CannedUpstream],
    connect: Callable[[int], RawClient],
) -> None:
    body = b'{"data":"' + b"z" * 5000 + b'"}'
    upstream = canned(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                      b"Connection: close\r\n\r\n" + body, close=True)
    relay = relay_factory(upstream.url)
    client = connect(relay.port)
    for _ in range(2):  # the second needs a new upstream connection
        client.send(get())
        response = client.response()
        assert response.complete and response.status == 200
        assert response.body == body
    assert upstream.connections == 2


def test_no_content_response_carries_no_content_length(
    relay_factory: RelayFactory, canned: Callable[..., CannedUpstream],
    connect: Callable[[int], RawClient],
) -> None:
    # RFC 9110 8.6: a server MUST NOT send Content-Length in a 204.
    upstream = canned(b"HTTP/1.1 204 No Content\r\nX-Id: 1\r\n\r\n")
    relay = relay_factory(upstream.url)
    client = connect(relay.port)
    client.send(get())
    response = client.response()
    assert response.status == 204 and response.body == b""
    assert response.header("content-length") is None
    assert response.header("transfer-encoding") is None


def test_head_response_keeps_the_upstream_content_length(
    relay_factory: RelayFactory, canned: Callable[..., CannedUpstream],
    connect: Callable[[int], RawClient],
) -> None:
    # RFC 9110 9.3.2: a HEAD answer describes the GET answer; "0" would be a lie.
    upstream = canned(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1234\r\n\r\n")
    relay = relay_factory(upstream.url)
    client = connect(relay.port)
    client.sock.sendall(b"HEAD /v1/models HTTP/1.1\r\nHost: relay\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        data = client.sock.recv(65536)
        assert data
        head += data
    assert head.endswith(b"\r\n\r\n"), "a HEAD answer has no body"
    lines = head.lower().split(b"\r\n")
    assert lines[0].startswith(b"http/1.1 200")
    assert b"content-length: 1234" in lines
    assert upstream.heads[0].startswith(b"HEAD /v1/models HTTP/1.1")


# --------------------------------------------------------------- failures before the head


def test_connect_refused_is_502(
    relay_factory: RelayFactory, connect: Callable[[int], RawClient],
) -> None:
    relay = relay_factory(f"http://127.0.0.1:{free_port()}")
    client = connect(relay.port)
    for _ in range(2):  # the client connection survives an upstream failure
        client.send(get())
        error = error_of(client.response(), 502)
        assert error["code"] == "bad_gateway"
    client.send(get("/healthz"))
    assert client.response().status == 200


def test_delay_beyond_read_timeout_is_504(
    relay: RelayThread, connect: Callable[[int], RawClient],
) -> None:
    client = connect(relay.port)
    start = time.monotonic()
    client.send(get("/v1/models", "x-fake-delay: 2"))
    error = error_of(client.response(), 504)
    assert error["code"] == "gateway_timeout"
    assert READ_TIMEOUT * 0.8 <= time.monotonic() - start < 1.5
    client.send(get())  # and the next request on the same connection is served
    assert client.response().status == 200


def test_delay_within_read_timeout_is_served(
    relay: RelayThread, connect: Callable[[int], RawClient],
) -> None:
    client = connect(relay.port)
    client.send(get("/v1/models", "x-fake-delay: 0.1"))
    assert client.response().status == 200


def test_silent_upstream_is_504(
    relay: RelayThread, connect: Callable[[int], RawClient],
) -> None:
    client = connect(relay.port)
    start = time.monotonic()
    client.send(get("/v1/models", "x-fake-silence: 1"))
    error_of(client.response(), 504)
    assert READ_TIMEOUT * 0.8 <= time.monotonic() - start < 1.5


def test_garbage_from_upstream_is_502(
    relay: RelayThread, connect: Callable[[int], RawClient],
) -> None:
    client = connect(relay.port)
    client.send(get("/v1/models", "x-fake-garbage: 1"))
    error_of(client.response(), 502)
    client.send(get())
    assert client.response().status == 200


def test_garbage_after_a_good_head_is_a_cut_stream(
    relay_factory: RelayFactory, canned: Callable[..., CannedUpstream],
    connect: Callable[[int], RawClient],
) -> None:
    upstream = canned(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"5\r\nhello\r\nnot-hex\r\n", close=True)
    relay = relay_factory(upstream.url)
    client = connect(relay.port)
    client.send(get())
    # Head, body and garbage arrive in one read. Either answer is honest: a
    # 502 (nothing was sent yet) or the head and "hello" then a cut. A close
    # with no answer at all is not.
    response = client.response()
    if response.status == 502:
        error_of(response, 502)
    else:
        assert response.status == 200 and not response.complete
        assert response.body == b"hello"
        assert client.closed


def test_connect_timeout_is_504(
    relay_factory: RelayFactory, connect: Callable[[int], RawClient],
) -> None:
    with unanswered_port() as port:
        relay = relay_factory(f"http://127.0.0.1:{port}", proxy={"connect_timeout": 0.3})
        client = connect(relay.port)
        start = time.monotonic()
        client.send(get())
        error = error_of(client.response(), 504)
        assert "timed out" in error["message"]
        assert 0.2 <= time.monotonic() - start < 2.0


# --------------------------------------------------------------- failures mid-body


def test_reset_mid_body_cuts_the_client_response(
    relay: RelayThread, connect: Callable[[int], RawClient],
) -> None:
    client = connect(relay.port)
    client.send(get("/v1/models", "x-fake-body-bytes: 200000", "x-fake-reset-after: 50000"))
    response = client.response()
    assert response.status == 200 and not response.complete
    assert response.header("content-length") == "200000"
    assert 0 < len(response.body) <= 50000
    assert client.closed
    # relay itself is fine: a new connection is served.
    fresh = connect(relay.port)
    fresh.send(get())
    assert fresh.response().status == 200


def test_reset_mid_stream_cuts_the_client_stream(
    relay: RelayThread, connect: Callable[[int], RawClient],
) -> None:
    client = connect(relay.port)
    client.send(post("/v1/chat/completions", CHAT_STREAM, "x-fake-reset-after: 1000",
                     "x-fake-event-delay: 0.02"))
    response = client.response()
    assert response.status == 200 and not response.complete
    assert response.header("transfer-encoding") == "chunked"
    assert response.body.startswith(b"data: ")
    assert b"[DONE]" not in response.body
    fresh = connect(relay.port)
    fresh.send(post("/v1/chat/completions", CHAT_STREAM))
    whole = fresh.response()
    assert whole.complete and b"data: [DONE]" in whole.body


def test_truncated_body_is_not_passed_off_as_complete(
    relay: RelayThread, connect: Callable[[int], RawClient],
) -> None:
    client = connect(relay.port)
    client.send(post("/v1/chat/completions", b'{"model":"gpt-4o","messages":[]}',
                     "x-fake-truncate: 1"))
    response = client.response()
    assert response.status == 200 and not response.complete
    assert len(response.body) < int(response.header("content-length") or 0)
    assert client.closed


def test_truncated_stream_is_not_passed_off_as_complete(
    relay: RelayThread, connect: Callable[[int], RawClient],
) -> None:
    client = connect(relay.port)
    client.send(post("/v1/chat/completions", CHAT_STREAM, "x-fake-truncate: 1"))
    response = client.response()
    assert response.status == 200 and not response.complete
    assert b"[DONE]" not in response.body
    assert client.closed


def test_pipelined_request_behind_a_broken_one_is_not_answered_out_of_turn(
    relay: RelayThread, fake_upstream: ThreadedFakeUpstream, connect: Callable[[int], RawClient],
) -> None:
    """After a cut response the connection closes: the request pipelined
    behind it must not be answered on a stream the client cannot frame."""
    client = connect(relay.port)
    client.send(get("/v1/models", "x-fake-body-bytes: 100000", "x-fake-reset-after: 1000")
                + get("/v1/models", "x-marker: behind"))
    first = client.response()
    assert not first.complete
    assert client.closed and client.pending == 0


# --------------------------------------------------------------- connections


def test_client_leaving_mid_stream_closes_the_upstream_connection(
    relay_factory: RelayFactory, own_upstream: ThreadedFakeUpstream,
) -> None:
    relay = relay_factory(own_upstream.url)
    sock = socket.create_connection(("127.0.0.1", relay.port), timeout=5)
    try:
        sock.sendall(post("/v1/chat/completions", CHAT_STREAM, "x-fake-events: 100",
                          "x-fake-event-delay: 0.05"))
        received = b""
        while b"data: " not in received:
            data = sock.recv(65536)
            assert data, "relay closed before the stream started"
            received += data
        assert own_upstream.active_connections == 1
    finally:
        sock.close()
    assert wait_for(lambda: own_upstream.active_connections == 0), \
        "the upstream request outlived the client"
    # The dropped connection is never handed out again: a new one is opened.
    with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as again:
        again.sendall(get(close=True))
        assert again.recv(100).startswith(b"HTTP/1.1 200")
    assert own_upstream.connections_opened == 2


def test_upstream_keep_alive_is_reused(
    relay_factory: RelayFactory, own_upstream: ThreadedFakeUpstream,
    connect: Callable[[int], RawClient],
) -> None:
    relay = relay_factory(own_upstream.url)
    for _ in range(3):
        client = connect(relay.port)  # separate clients share the pooled socket
        client.send(get())
        assert client.response().status == 200
    assert own_upstream.connections_opened == 1


def test_upstream_connection_close_means_a_new_connection_next_time(
    relay_factory: RelayFactory, own_upstream: ThreadedFakeUpstream,
    connect: Callable[[int], RawClient],
) -> None:
    relay = relay_factory(own_upstream.url)
    client = connect(relay.port)
    for _ in range(3):
        client.send(get("/v1/models", "x-fake-close: 1"))
        response = client.response()
        assert response.status == 200
        assert response.header("connection") is None  # the upstream's hop, not ours
    assert own_upstream.connections_opened == 3
    assert not client.closed


def test_upstream_failure_does_not_poison_the_pool(
    relay_factory: RelayFactory, own_upstream: ThreadedFakeUpstream,
    connect: Callable[[int], RawClient],
) -> None:
    relay = relay_factory(own_upstream.url, proxy={"read_timeout": READ_TIMEOUT})
    client = connect(relay.port)
    client.send(get())
    assert client.response().status == 200
    client.send(get("/v1/models", "x-fake-silence: 1"))
    error_of(client.response(), 504)
    assert wait_for(lambda: own_upstream.active_connections == 0)
    client.send(get())
    assert client.response().status == 200
    assert own_upstream.connections_opened == 2


def test_reused_socket_closed_without_answer_is_retried_once(
    relay_factory: RelayFactory, canned: Callable[..., CannedUpstream],
    connect: Callable[[int], RawClient],
) -> None:
    """The upstream's keep-alive ended just as relay reused the socket: no
    byte came back, so one retry on a fresh connection is what a client wants."""
    upstream = canned(OK_RESPONSE, answers=1)
    relay = relay_factory(upstream.url)
    client = connect(relay.port)
    for _ in range(2):
        client.send(get())
        response = client.response()
        assert response.status == 200 and response.body == b"{}"
    assert upstream.connections == 2
    assert len(upstream.heads) == 3


def test_fresh_socket_closed_without_answer_is_502_not_retried(
    relay_factory: RelayFactory, canned: Callable[..., CannedUpstream],
    connect: Callable[[int], RawClient],
) -> None:
    upstream = canned(OK_RESPONSE, answers=0)
    relay = relay_factory(upstream.url)
    client = connect(relay.port)
    client.send(get())
    error_of(client.response(), 502)
    assert len(upstream.heads) == 1


# --------------------------------------------------------------- circuit breaker


def test_breaker_opens_after_consecutive_failures(
    relay_factory: RelayFactory, canned: Callable[..., CannedUpstream],
    connect: Callable[[int], RawClient],
) -> None:
    upstream = canned(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 2\r\n\r\n{}")
    relay = relay_factory(upstream.url, circuit_breaker={
        "enabled": True, "failure_threshold": 2, "recovery_timeout": 30})
    client = connect(relay.port)
    for _ in range(2):
        client.send(get())
        assert client.response().status == 500  # passed through, and counted
    client.send(get())
    error = error_of(client.response(), 503)
    assert error["code"] == "circuit_breaker_open"
    assert len(upstream.heads) == 2  # the third never reached the upstream
    client.send(get("/readyz"))
    assert client.response().status == 503
