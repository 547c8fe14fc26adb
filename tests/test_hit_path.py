"""Cache hits answered at once: no request task, the same bytes, the limiter
charged once, whichever way a request goes (at once, or on in a task when
a stage has to await).

The task count comes from debug mode (on for the test suite): every request
served by a task is counted as a ``requests`` object opened.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import time
from typing import Any

import pytest

from relay import debug
from relay.features.cache import USAGE_HEADER, CacheEntry
from relay.http import errors
from relay.testing import ThreadedFakeUpstream
from tests.support import RelayThread

CHAT_PATH = "/v1/chat/completions"
CREDENTIAL = b"sk-test-hit-path"
TIMEOUT = 10.0
CACHE = {"enabled": True, "ttl": 60}
# Five tokens and (practically) no refill: X-RateLimit-Remaining counts the
# acquires exactly.
LIMIT = {"enabled": True, "requests_per_second": 0.0001, "burst": 5, "key": "api_key"}


def request_bytes(body: bytes, *, extra: bytes = b"", credential: bytes = CREDENTIAL) -> bytes:
    return (
        b"POST " + CHAT_PATH.encode() + b" HTTP/1.1\r\nHost: relay\r\n"
        b"Authorization: Bearer " + credential + b"\r\n"
        b"Content-Type: application/json\r\n" + extra
        + b"Content-Length: %d\r\n\r\n" % len(body)
    ) + body


def chat(content: str = "say hello to the hit path", **extra: Any) -> bytes:
    return json.dumps(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], **extra}
    ).encode()


class Wire:
    """One client socket that reads whole responses as raw bytes."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buffer += data
        return bool(data)

    def response(self) -> bytes:
        """The next response, exactly as sent (Content-Length or chunked)."""
        while b"\r\n\r\n" not in self.buffer:
            assert self._fill(), "closed before a response head"
        end = self.buffer.index(b"\r\n\r\n") + 4
        head = self.buffer[:end].lower()
        if b"transfer-encoding: chunked" in head:
            while b"\r\n0\r\n\r\n" not in self.buffer[end - 2:]:
                assert self._fill(), "closed inside a chunked body"
            end = self.buffer.index(b"\r\n0\r\n\r\n", end - 2) + 7
        else:
            length = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
            while len(self.buffer) < end + length:
                assert self._fill(), "closed inside a body"
            end += length
        response, self.buffer = self.buffer[:end], self.buffer[end:]
        return response

    def exchange(self, data: bytes) -> bytes:
        self.sock.sendall(data)
        return self.response()

    def closed(self) -> bool:
        """True once the server closed the connection (and sent nothing more)."""
        self.sock.settimeout(TIMEOUT)
        return not self._fill()


def header(response: bytes, name: bytes) -> bytes | None:
    head = response.split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b": ")
        if key.lower() == name.lower():
            return value
    return None


def tasks_opened() -> int:
    """Requests served by a task so far, in this process."""
    return debug.counters.opened["requests"]


def stored_entries(relay: RelayThread) -> list[CacheEntry]:
    def read() -> list[CacheEntry]:
        assert relay.gateway is not None
        cache = relay.gateway.pipeline._cache
        return cache.entries()

    return relay.call(read)


def miss(relay: RelayThread, wire: Wire, body: bytes, credential: bytes = CREDENTIAL) -> bytes:
    """Send *body* (not cached yet); returns once its entry is stored (just
    after the response: a request on a socket finds it, a look from this
    thread may come first)."""
    stored = len(stored_entries(relay))
    response = wire.exchange(request_bytes(body, credential=credential))
    assert header(response, b"X-Relay-Cache") == b"MISS"
    deadline = time.monotonic() + TIMEOUT
    while len(stored_entries(relay)) == stored:
        assert time.monotonic() < deadline, "the entry was never stored"
        time.sleep(0.01)
    return response


def rendered_per_hit(entry: CacheEntry) -> bytes:
    """The header lines as relay rendered them for every hit before entries
    kept them rendered."""
    return b"".join(b"%s: %s\r\n" % pair for pair in entry.headers if pair[0] != USAGE_HEADER)


@pytest.fixture(autouse=True)
def _debug_on() -> None:
    if not debug.ENABLED:
        pytest.skip("needs RELAY_DEBUG=1 (set by the test suite's conftest)")


@pytest.fixture
def wires() -> Any:
    opened: list[Wire] = []

    def make(port: int) -> Wire:
        wire = Wire(port)
        opened.append(wire)
        return wire

    yield make
    for wire in opened:
        wire.close()


def test_a_hit_is_answered_without_a_task(relay_factory, fake_upstream: ThreadedFakeUpstream, wires):
    relay = relay_factory(fake_upstream.url, cache=CACHE)
    body = chat("no task for a hit")
    wire = wires(relay.port)
    before = tasks_opened()
    first = miss(relay, wire, body)
    assert tasks_opened() == before + 1  # a miss goes upstream in a task
    for _ in range(5):
        hit = wire.exchange(request_bytes(body))
        assert hit.startswith(b"HTTP/1.1 200 OK\r\n")
        assert header(hit, b"X-Relay-Cache") == b"HIT"
        assert hit.split(b"\r\n\r\n", 1)[1] == first.split(b"\r\n\r\n", 1)[1]
    other = wires(relay.port)  # a new connection's first request, too
    assert header(other.exchange(request_bytes(body)), b"X-Relay-Cache") == b"HIT"
    assert tasks_opened() == before + 1


def test_the_next_request_hits(relay_factory, fake_upstream: ThreadedFakeUpstream, wires):
    relay = relay_factory(fake_upstream.url, cache=CACHE)
    wire = wires(relay.port)
    for n in range(5):  # sent as soon as the miss's response is in
        body = chat(f"at once {n}")
        assert header(wire.exchange(request_bytes(body)), b"X-Relay-Cache") == b"MISS"
        assert header(wire.exchange(request_bytes(body)), b"X-Relay-Cache") == b"HIT"
    assert len(stored_entries(relay)) == 5


@pytest.mark.parametrize("stream", [False, True])
def test_hit_bytes_are_those_of_the_entry_rendered_per_hit(
    relay_factory, fake_upstream: ThreadedFakeUpstream, wires, stream: bool
):
    relay = relay_factory(fake_upstream.url, cache=CACHE, ratelimit=LIMIT)
    body = chat(f"exact bytes {stream}", stream=stream)
    wire = wires(relay.port)
    miss(relay, wire, body)
    hit = wire.exchange(request_bytes(body))
    (entry,) = stored_entries(relay)
    assert entry.streamed is stream
    assert entry.head == rendered_per_hit(entry)
    assert any(name == USAGE_HEADER for name, _ in entry.headers)  # kept, never sent
    limit_lines = b"X-RateLimit-Limit: 5\r\nX-RateLimit-Remaining: 3\r\n"
    if stream:
        framed = b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (
            len(entry.body), entry.body,
        )
    else:
        framed = b"Content-Length: %d\r\n\r\n%s" % (len(entry.body), entry.body)
    assert hit == (
        b"HTTP/1.1 200 OK\r\n" + rendered_per_hit(entry) + limit_lines
        + b"X-Relay-Cache: HIT\r\n" + framed
    )
    assert b"x-relay-usage" not in hit.lower()


def test_the_limiter_is_charged_once_at_once_and_in_a_task(
    relay_factory, fake_upstream: ThreadedFakeUpstream, wires
):
    relay = relay_factory(fake_upstream.url, cache=CACHE, ratelimit=LIMIT)
    body = chat("charged once")
    wire = wires(relay.port)
    before = tasks_opened()
    remaining = []
    fast_hit = b""
    remaining.append(header(miss(relay, wire, body), b"X-RateLimit-Remaining"))
    for _ in range(2):  # the miss went on in a task, after the limiter; hits at once
        fast_hit = wire.exchange(request_bytes(body))
        remaining.append(header(fast_hit, b"X-RateLimit-Remaining"))
    assert tasks_opened() == before + 1

    def await_the_cache() -> None:
        # As a shared cache does: the lookup awaits, so the hit is served
        # by the task that goes on after the limiter.
        assert relay.gateway is not None
        relay.gateway.pipeline._cache_now = None

    relay.call(await_the_cache)
    task_hit = wire.exchange(request_bytes(body))
    remaining.append(header(task_hit, b"X-RateLimit-Remaining"))
    assert tasks_opened() == before + 2
    assert remaining == [b"4", b"3", b"2", b"1"]
    assert header(task_hit, b"X-Relay-Cache") == b"HIT"
    assert task_hit.replace(b"Remaining: 1", b"Remaining: 2") == fast_hit
    wire.exchange(request_bytes(body))
    refused = wire.exchange(request_bytes(body))
    assert refused.startswith(b"HTTP/1.1 429 ")
    assert header(refused, b"X-RateLimit-Remaining") == b"0"
    assert header(refused, b"X-Relay-Cache") == b"BYPASS"


def test_pipelined_hits_are_answered_in_order(relay_factory, fake_upstream: ThreadedFakeUpstream, wires):
    relay = relay_factory(fake_upstream.url, cache=CACHE, ratelimit=LIMIT)
    first, second = chat("pipelined one"), chat("pipelined two")
    wire = wires(relay.port)
    miss(relay, wire, first)
    miss(relay, wire, second)
    before = tasks_opened()
    # Hit, a miss (a task) in the middle, hits behind it; one write.
    third = chat("pipelined three")
    wire.sock.sendall(
        request_bytes(first) + request_bytes(third) + request_bytes(second) + request_bytes(first)
    )
    answers = [wire.response() for _ in range(4)]
    assert [header(a, b"X-Relay-Cache") for a in answers] == [b"HIT", b"MISS", b"HIT", b"BYPASS"]
    assert [header(a, b"X-RateLimit-Remaining") for a in answers] == [b"2", b"1", b"0", b"0"]
    assert answers[3].startswith(b"HTTP/1.1 429 ")  # the bucket was empty by then
    assert tasks_opened() == before + 1


def test_a_hit_that_closes_ends_the_read(relay_factory, fake_upstream: ThreadedFakeUpstream, wires):
    relay = relay_factory(fake_upstream.url, cache=CACHE)
    body = chat("close after the hit")
    wire = wires(relay.port)
    miss(relay, wire, body)
    # Answered at once, in the middle of parsing this read: what follows
    # the request that asked to close is never answered.
    wire.sock.sendall(
        request_bytes(body) + request_bytes(body, extra=b"Connection: close\r\n")
        + request_bytes(body)
    )
    first, last = wire.response(), wire.response()
    assert header(first, b"X-Relay-Cache") == b"HIT"
    assert header(last, b"X-Relay-Cache") == b"HIT"
    assert header(last, b"Connection") == b"close"
    assert wire.closed()
    assert wire.buffer == b""


def test_a_hit_after_expect_continue(relay_factory, fake_upstream: ThreadedFakeUpstream, wires):
    relay = relay_factory(fake_upstream.url, cache=CACHE)
    body = chat("expect a hit")
    wire = wires(relay.port)
    miss(relay, wire, body)
    full = request_bytes(body, extra=b"Expect: 100-continue\r\n")
    head, _, rest = full.partition(b"\r\n\r\n")
    wire.sock.sendall(head + b"\r\n\r\n")
    deadline = time.monotonic() + TIMEOUT
    while b"\r\n\r\n" not in wire.buffer and time.monotonic() < deadline:
        assert wire._fill()
    assert wire.buffer == b"HTTP/1.1 100 Continue\r\n\r\n"
    wire.buffer = b""
    assert header(wire.exchange(rest), b"X-Relay-Cache") == b"HIT"


def test_errors_raised_while_answering_at_once(
    relay_factory, fake_upstream: ThreadedFakeUpstream, wires
):
    relay = relay_factory(fake_upstream.url, cache=CACHE)
    body = chat("errors at once")
    wire = wires(relay.port)
    miss(relay, wire, body)
    seen: list[dict[str, Any]] = []

    class Refusing:
        def get_nowait(self, key: bytes) -> CacheEntry | None:
            raise errors.GatewayError(418, "refused at once", "invalid_request_error", "teapot")

    class Broken:
        def get_nowait(self, key: bytes) -> CacheEntry | None:
            raise RuntimeError("a bug in a lookup")

    refuse, broken = Refusing(), Broken()

    def install(lookup: Any) -> None:
        assert relay.gateway is not None and relay.loop is not None
        relay.gateway.pipeline._cache_now = lookup
        relay.loop.set_exception_handler(lambda loop, context: seen.append(context))

    before = tasks_opened()
    relay.call(lambda: install(refuse))
    refused = wire.exchange(request_bytes(body))
    assert refused.startswith(b"HTTP/1.1 418 ")
    assert json.loads(refused.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "teapot"
    assert seen == []  # relay's own error answer: nothing to report
    relay.call(lambda: install(broken))
    failed = wire.exchange(request_bytes(body))
    assert failed.startswith(b"HTTP/1.1 500 ")
    assert json.loads(failed.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "internal_error"
    assert [str(context["exception"]) for context in seen] == ["a bug in a lookup"]
    assert tasks_opened() == before
    relay.call(lambda: install(relay.gateway.pipeline._cache))  # type: ignore[union-attr]
    assert header(wire.exchange(request_bytes(body)), b"X-Relay-Cache") == b"HIT"


ADMIN = "admin-secret-for-hit-path"


def create_key(port: int, **fields: Any) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request(
            "POST", "/relay/admin/keys", json.dumps({"name": "hits", **fields}),
            {"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"},
        )
        reply = conn.getresponse()
        created = json.loads(reply.read())
    finally:
        conn.close()
    assert reply.status == 201, created
    return created["secret"].encode()


@pytest.mark.parametrize(
    ("limits", "hit_tasks"),
    [
        ({}, 0),
        ({"rpm": 1000}, 0),  # reserved from the process's allowance (50 requests)
        # An allowance of one request (a large reservation against the
        # budget): each hit waits for the store, in a task.
        ({"rpm": 1000, "budget_usd": 100.0}, 3),
    ],
)
def test_virtual_key_hits_are_admitted_at_once(
    relay_factory,
    fake_upstream: ThreadedFakeUpstream,
    wires,
    tmp_path: Any,
    limits: dict[str, Any],
    hit_tasks: int,
):
    relay = relay_factory(
        fake_upstream.url,
        cache=CACHE,
        ratelimit=LIMIT,
        keys={"enabled": True, "admin_key": ADMIN, "path": str(tmp_path / "keys.db")},
        models={"gpt-4o-mini": {"input": 1.0, "output": 2.0}},
    )
    secret = create_key(relay.port, **limits)
    body = chat(f"virtual key hits {sorted(limits)}")
    wire = wires(relay.port)
    before = tasks_opened()
    remaining = [header(miss(relay, wire, body, secret), b"X-RateLimit-Remaining")]
    # The first request waited for the store (the key's first allowance, or
    # it was created a moment ago); the hits are admitted from this process.
    first_tasks = tasks_opened() - before
    assert first_tasks == 1
    for _ in range(3):
        hit = wire.exchange(request_bytes(body, credential=secret))
        assert header(hit, b"X-Relay-Cache") == b"HIT"
        remaining.append(header(hit, b"X-RateLimit-Remaining"))
    assert remaining == [b"4", b"3", b"2", b"1"]  # charged once, either way
    assert tasks_opened() == before + 1 + hit_tasks
    refused = wire.exchange(request_bytes(body, credential=b"not-a-relay-key"))
    assert refused.startswith(b"HTTP/1.1 401 ")
    assert tasks_opened() == before + 1 + hit_tasks  # refused at once, too


def test_a_keyed_request_that_fails_in_its_task_gives_its_reservation_back(
    relay_factory, fake_upstream: ThreadedFakeUpstream, wires, tmp_path: Any
):
    relay = relay_factory(
        fake_upstream.url,
        cache=CACHE,
        keys={"enabled": True, "admin_key": ADMIN, "path": str(tmp_path / "keys.db")},
        models={"gpt-4o-mini": {"input": 1.0, "output": 2.0}},
    )
    secret = create_key(relay.port, rpm=1000)
    wire = wires(relay.port)
    miss(relay, wire, chat("a first allowance"), secret)  # later ones are admitted at once
    assert relay.gateway is not None and relay.loop is not None
    pipeline = relay.gateway.pipeline
    tickets: list[Any] = []

    async def broken_forward(request: Any, *args: Any) -> None:
        tickets.append(request.relay_key)
        await asyncio.sleep(0)  # on in the request's task
        raise RuntimeError("a bug on the way upstream")

    def install() -> None:
        pipeline._forward = broken_forward
        relay.loop.set_exception_handler(lambda loop, context: None)  # the bug is expected

    relay.call(install)
    failed = wire.exchange(request_bytes(chat("fails in its task"), credential=secret))
    assert failed.startswith(b"HTTP/1.1 500 ")
    [ticket] = tickets
    # Released when its task ended, though no step of the request settled it.
    assert relay.call(lambda: (ticket.settled, ticket.allowance.outstanding)) == (True, 0)
