"""The client side's turns, through real sockets on both loops: a client gone
before its request is sent upstream is never sent and never billed (499),
and an interim ``100 Continue`` waits for its request's turn in a pipeline."""

from __future__ import annotations

import http.client
import io
import json
import socket
import time
from collections.abc import Callable
from typing import Any

import httptools

from relay.testing import ThreadedFakeUpstream
from tests.conftest import RelayFactory
from tests.support import RelayThread

TIMEOUT = 10.0
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "the client turns away"}]}
KEY = "Bearer sk-client-turns"


def wait_until(check: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def get(relay: RelayThread, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=TIMEOUT)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        assert resp.status == 200
        return resp.read()
    finally:
        conn.close()


def chat_request(headers: dict[str, str], body: dict[str, Any] = CHAT) -> bytes:
    data = json.dumps(body).encode()
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
    for name, value in headers.items():
        head += f"{name}: {value}\r\n".encode()
    return head + b"Content-Length: %d\r\n\r\n" % len(data) + data


class Parsed:
    def __init__(self) -> None:
        self.status = 0
        self.body = b""
        self.complete = False


class ResponseStream:
    """Every response on one socket, parsed as the bytes come (a framing error raises)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.raw = b""
        self.responses: list[Parsed] = []
        self._parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self.responses.append(Parsed())

    def on_headers_complete(self) -> None:
        self.responses[-1].status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.responses[-1].body += body

    def on_message_complete(self) -> None:
        self.responses[-1].complete = True

    def read_until(self, check: Callable[[], bool]) -> None:
        self.sock.settimeout(TIMEOUT)
        while not check():
            data = self.sock.recv(65536)
            assert data, "relay closed the connection"
            self.raw += data
            self._parser.feed_data(data)

    def completed(self, n: int) -> bool:
        return sum(r.complete for r in self.responses) >= n


# --------------------------------------------------------------- client gone


def test_follower_whose_client_left_is_never_sent_nor_billed(
    relay_factory: RelayFactory, fake_upstream: ThreadedFakeUpstream,
) -> None:
    """A coalesced follower's client closes while the leader waits on a slow
    upstream that then fails: the follower would go upstream on its own, but
    its client is gone. Fault headers are not part of the cache key, so the
    follower asks for a plain 200 that would be billed if it were sent."""
    relay = relay_factory(fake_upstream.url, cache={"enabled": True}, log={"requests": True})
    runtime = relay.gateway.runtime  # type: ignore[union-attr]
    log = io.StringIO()

    def capture_log() -> None:
        runtime.request_log.stream = log

    relay.call(capture_log)
    before = len(fake_upstream.requests)
    usage_before = json.loads(get(relay, "/relay/usage"))["totals"]

    def followers() -> int:
        return sum(f.joined for f in runtime.coalescer._flights.values())

    leader = socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT)
    follower = socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT)
    try:
        leader.sendall(chat_request(
            {"Authorization": KEY, "x-fake-delay": "1.0", "x-fake-status": "500"}))
        wait_until(lambda: len(fake_upstream.requests) == before + 1, "the leader upstream")
        follower.sendall(chat_request({"Authorization": KEY}))
        wait_until(lambda: relay.call(followers) == 1, "the follower to join")
        follower.close()  # gone while the leader is still waiting
        stream = ResponseStream(leader)
        stream.read_until(lambda: stream.completed(1))
        assert stream.responses[0].status == 500  # the leader's own answer, passed on
    finally:
        leader.close()
        follower.close()

    def logged() -> list[dict[str, Any]]:
        return [json.loads(line) for line in log.getvalue().splitlines()]

    wait_until(lambda: len(logged()) == 2, "both requests in the request log")
    assert sorted(e["status"] for e in logged()) == [499, 500]
    gone = next(e for e in logged() if e["status"] == 499)
    assert (gone["prompt_tokens"], gone["completion_tokens"], gone["cost_usd"]) == (0, 0, 0.0)
    time.sleep(0.2)  # anything sent late would show up now
    assert len(fake_upstream.requests) == before + 1  # the leader only
    assert json.loads(get(relay, "/relay/usage"))["totals"] == usage_before
    metrics = get(relay, "/metrics").decode()
    assert any(
        line.startswith("relay_requests_total{") and 'status="499"' in line and line.endswith(" 1.0")
        for line in metrics.splitlines()
    ), metrics


def test_client_gone_before_the_send_frees_the_pooled_connection(
    relay_factory: RelayFactory, fake_upstream: ThreadedFakeUpstream,
) -> None:
    """The check sits right before the send, whichever connection the gone
    client got (the leader's, released to the pool, or a fresh one): it goes
    back to the pool unused and the next caller is served on it."""
    relay = relay_factory(fake_upstream.url, cache={"enabled": True})
    runtime = relay.gateway.runtime  # type: ignore[union-attr]
    conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=TIMEOUT)
    try:
        conn.request("GET", "/v1/models", headers={"Authorization": KEY})
        assert conn.getresponse().read()  # one idle pooled upstream connection now
    finally:
        conn.close()
    opened = fake_upstream.connections_opened
    before = len(fake_upstream.requests)
    leader = socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT)
    follower = socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT)
    try:
        leader.sendall(chat_request(
            {"Authorization": KEY, "x-fake-delay": "0.5", "x-fake-status": "500"}))
        wait_until(lambda: len(fake_upstream.requests) == before + 1, "the leader upstream")
        follower.sendall(chat_request({"Authorization": KEY}))
        wait_until(
            lambda: relay.call(lambda: sum(f.joined for f in runtime.coalescer._flights.values())) == 1,
            "the follower to join",
        )
        follower.close()
        stream = ResponseStream(leader)
        stream.read_until(lambda: stream.completed(1))
    finally:
        leader.close()
        follower.close()
    time.sleep(0.2)
    assert len(fake_upstream.requests) == before + 1
    conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=TIMEOUT)
    try:
        conn.request("GET", "/v1/models", headers={"Authorization": KEY})
        assert conn.getresponse().status == 200
    finally:
        conn.close()
    # at most the one connection opened for the gone client, and kept: none per caller
    assert fake_upstream.connections_opened - opened <= 1


# --------------------------------------------------------------- 100 Continue


def test_pipelined_expect_continue_waits_for_the_streamed_response_before_it(
    relay_factory: RelayFactory, fake_upstream: ThreadedFakeUpstream,
) -> None:
    relay = relay_factory(fake_upstream.url)
    stream_body = {**CHAT, "stream": True}
    second = json.dumps(CHAT).encode()
    sock = socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(chat_request(
            {"x-fake-events": "6", "x-fake-event-delay": "0.1"}, stream_body))
        stream = ResponseStream(sock)
        stream.read_until(lambda: b"data: " in stream.raw)  # the chunked stream has begun
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
            b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(second)
        )
        # The body is held back until relay invites it, as curl does.
        stream.read_until(lambda: len(stream.responses) >= 2 and stream.responses[1].complete)
        first, interim = stream.responses
        assert first.status == 200 and first.complete
        assert first.body.endswith(b"data: [DONE]\n\n")
        assert interim.status == 100
        sock.sendall(second)
        stream.read_until(lambda: stream.completed(3))
    finally:
        sock.close()
    final = stream.responses[2]
    assert final.status == 200 and json.loads(final.body)["object"] == "chat.completion"
    assert stream.raw.count(b"HTTP/1.1 100 Continue\r\n\r\n") == 1
