"""Fixtures shared by the proxy tests: one fake upstream per session, relays
on both event loops, and a raw HTTP/1.1 client that reads responses with
httptools so framing (complete or cut) is checked, not guessed."""

from __future__ import annotations

import os

# Debug mode is chosen once, when relay.debug is first imported: before any
# relay module is (relays started as subprocesses inherit it too).
os.environ["RELAY_DEBUG"] = "1"

import socket
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import httptools
import pytest

import relay._fast as fast
from relay.config import Config
from relay.testing import ThreadedFakeUpstream
from tests.redis_server import ClusterSetup, RedisServer, SentinelSetup
from tests.support import RelayThread, compiled_or_skip, make_config, run_on

pytest_plugins = ["tests.leakcheck", "pytester"]

TIMEOUT = 5.0


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """Runs a coroutine on a fresh loop of each kind (bounded); modules may override."""
    import asyncio

    import uvloop

    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop
    return lambda coro: run_on(factory, coro)


@pytest.fixture(scope="session")
def fake_upstream() -> Iterator[ThreadedFakeUpstream]:
    with ThreadedFakeUpstream() as upstream:
        yield upstream


RelayFactory = Callable[..., RelayThread]


@pytest.fixture(params=["uvloop", "asyncio"])
def relay_factory(request: pytest.FixtureRequest) -> Iterator[RelayFactory]:
    """``make(target, **sections)`` starts a relay on this test's loop.

    The breaker is off and the drain short unless a test says otherwise, so
    one test's failures never leak into another's answers or teardown time.
    """
    started: list[RelayThread] = []

    def make(target: str, **sections: Any) -> RelayThread:
        sections.setdefault("circuit_breaker", {"enabled": False})
        server = dict(sections.get("server", {}))
        server.setdefault("shutdown_timeout", 1)
        sections["server"] = server
        relay = RelayThread(make_config(target, **sections), loop=request.param)
        relay.start()
        started.append(relay)
        return relay

    yield make
    for relay in started:
        relay.stop()


@pytest.fixture(scope="module", params=["pure", "compiled"])
def impl(request: pytest.FixtureRequest) -> fast.Implementation:
    """Each twin of relay._fast in turn (the compiled one skipped when not built)."""
    return fast.pure if request.param == "pure" else compiled_or_skip()


@pytest.fixture(scope="module")
def both() -> tuple[fast.Implementation, fast.Implementation]:
    """(pure, compiled), for tests that compare the twins."""
    return fast.pure, compiled_or_skip()


RelayPair = Callable[[Config], tuple[RelayThread, RelayThread]]


@pytest.fixture
def relay_pair() -> Iterator[RelayPair]:
    """``make(config)``: two relay instances of one config (so of one Redis),
    one on each event loop (uvloop, asyncio); all stopped after the test."""
    started: list[RelayThread] = []

    def make(config: Config) -> tuple[RelayThread, RelayThread]:
        for loop in ("uvloop", "asyncio"):
            relay = RelayThread(config, loop=loop)
            relay.start()
            started.append(relay)
        return started[-2], started[-1]

    yield make
    for relay in started:
        relay.stop()


class Response:
    def __init__(self) -> None:
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.body = b""
        self.complete = False

    @property
    def close_delimited(self) -> bool:
        framed = self.header("content-length") or self.header("transfer-encoding")
        return framed is None and self.status not in (204, 304)

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k == name), None)


class RawClient:
    """One client socket; responses are parsed as they arrive, pipelined ones too."""

    def __init__(self, port: int, timeout: float = TIMEOUT) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.closed = False
        self._done: list[Response] = []
        self._current: Response | None = None
        self._parser = httptools.HttpResponseParser(self)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._current = Response()

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self._current is not None
        self._current.headers.append((name.decode().lower(), value.decode()))

    def on_headers_complete(self) -> None:
        assert self._current is not None
        self._current.status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        assert self._current is not None
        self._current.body += body

    def on_message_complete(self) -> None:
        assert self._current is not None
        self._current.complete = True
        self._done.append(self._current)
        self._current = None

    # API
    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _recv(self) -> bool:
        """Read once and parse; False on EOF or reset."""
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.closed = True
            current = self._current
            if current is not None and current.status and current.close_delimited:
                # httptools has no EOF signal: a body without length ends here.
                self.on_message_complete()
            return False
        self._parser.feed_data(data)
        return True

    def response(self) -> Response:
        """The next response, complete or (when the server closed mid-way) cut."""
        while not self._done and not self.closed:
            self._recv()
        if self._done:
            return self._done.pop(0)
        if self._current is not None:
            cut, self._current = self._current, None
            return cut
        raise AssertionError("connection closed before any response byte")

    @property
    def pending(self) -> int:
        """Responses read off the socket but not yet taken with response()."""
        return len(self._done) + (self._current is not None)

    def wait_closed(self, timeout: float = TIMEOUT) -> float:
        """Seconds until the server closed; fails if it sends data or stays open."""
        start = time.monotonic()
        self.sock.settimeout(timeout)
        while not self.closed:
            if self._recv():
                raise AssertionError("expected the connection to close, got data")
        return time.monotonic() - start

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def connect() -> Iterator[Callable[[int], RawClient]]:
    clients: list[RawClient] = []

    def make(port: int) -> RawClient:
        client = RawClient(port)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


# --------------------------------------------------------------------------- #
# Redis topologies, started once per session (a few seconds each) and only
# when a test asks for one; see tests/redis_server.py.
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="session")
def standalone_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def sentinel_setup() -> Iterator[SentinelSetup]:
    with SentinelSetup() as setup:
        yield setup


@pytest.fixture(scope="session")
def cluster_setup() -> Iterator[ClusterSetup]:
    with ClusterSetup() as setup:
        yield setup
