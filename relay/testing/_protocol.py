"""The fake upstream's connection protocol: httptools parsing, in-order
answers for pipelined requests, flow control and the slow/faulty write paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol, cast

import httptools

from relay.testing._wire import (
    BAD_REQUEST,
    Canned,
    Faults,
    filler,
    frame_slow,
    head,
    reset_transport,
    unsent_bytes,
)

_WRITE_HIGH = 256 * 1024
_WRITE_LOW = 64 * 1024
FLUSH_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request as the fake upstream received it."""

    method: str
    path: str  # request-target: path and query
    headers: list[tuple[str, str]]  # names lowercased, in arrival order
    body: bytes
    received_at: float = 0.0  # time.monotonic() when the request was read whole

    def header(self, name: str) -> str | None:
        """The first value of a header, by case-insensitive name."""
        name = name.lower()
        return next((v for k, v in self.headers if k == name), None)

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


class Request:
    __slots__ = ("method", "url", "body", "fake", "keep_alive", "anthropic")

    def __init__(self, method: str, url: bytes, body: bytes, fake: dict[bytes, bytes] | None,
                 keep_alive: bool, anthropic: bool) -> None:
        self.method = method
        self.url = url
        self.body = body
        self.fake = fake
        self.keep_alive = keep_alive
        self.anthropic = anthropic


class Owner(Protocol):
    """What a connection needs of its server (the FakeUpstream): the answers,
    the faults it injects, and where requests and connections are counted."""

    record: bool

    def _connection_made(self, conn: Connection) -> None: ...

    def _connection_lost(self, conn: Connection) -> None: ...

    def _record(self, request: RecordedRequest) -> None: ...

    def _server_faults(self) -> dict[bytes, bytes] | None: ...

    def _answer(self, conn: Connection, req: Request) -> Any: ...


class Connection(asyncio.Protocol):
    """One client connection: parses requests, answers them in order."""

    def __init__(self, owner: Owner) -> None:
        self._owner = owner
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        # per-request state, reset in on_message_begin
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] | None = None
        self._body: list[bytes] = []
        self._fake: dict[bytes, bytes] | None = None
        self._anthropic = False
        # per-connection state
        self._queue: deque[Request | None] = deque()  # None = answer 400 and close
        self._worker: asyncio.Task[None] | None = None
        self._silent = False
        self._broken = False  # the parser failed: read nothing more
        self._closing = False
        self._lost = False
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None
        self.requests_read = 0  # on this connection, the current one included

    # ------------------------------------------------------------ transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance.
        self._transport = cast(asyncio.Transport, transport)
        # uvloop's default low-water mark is tiny; set both explicitly.
        self._transport.set_write_buffer_limits(high=_WRITE_HIGH, low=_WRITE_LOW)
        self._owner._connection_made(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._closing = True
        self._wake()
        if self._worker is not None:
            self._worker.cancel()
        self._owner._connection_lost(self)

    def pause_writing(self) -> None:
        self._write_paused = True
        # A peer that does not read must not make us buffer its pipelined flood.
        with contextlib.suppress(Exception):
            self._transport.pause_reading()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        self._write_paused = False
        if not self._closing and not self._broken:
            with contextlib.suppress(Exception):
                self._transport.resume_reading()  # type: ignore[union-attr]
        self._wake()

    def _wake(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None

    async def _writable(self, timeout: float | None = None) -> None:
        if self._write_paused and not self._lost:
            self._drained = self._loop.create_future()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._drained), timeout)

    def data_received(self, data: bytes) -> None:
        if self._closing or self._broken:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # the request itself was complete; the upgrade is ignored
        except httptools.HttpParserError:
            # Answer 400 after the responses already owed, then close.
            self._broken = True
            with contextlib.suppress(Exception):
                self._transport.pause_reading()  # type: ignore[union-attr]
            self._queue.append(None)
            self._dispatch()

    # ------------------------------------------------------------ parser callbacks

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = [] if self._owner.record else None
        self._body = []
        self._fake = None
        self._anthropic = False

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        lname = name.lower()
        if self._headers is not None:
            self._headers.append((lname, value))
        if lname.startswith(b"x-fake-"):
            if self._fake is None:
                self._fake = {}
            self._fake[lname] = value
        elif lname == b"anthropic-version":
            self._anthropic = True
        elif lname == b"expect" and value.lower() == b"100-continue":
            # Only when nothing is queued: an interim reply must not jump
            # ahead of earlier pipelined responses.
            if not self._queue and self._worker is None and not self._silent:
                self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # type: ignore[union-attr]

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self.requests_read += 1
        parser = self._parser
        body = b"".join(self._body)
        method = parser.get_method().decode("ascii")
        if self._headers is not None:
            self._owner._record(RecordedRequest(
                method, self._url.decode("latin-1"),
                [(k.decode("latin-1"), v.decode("latin-1")) for k, v in self._headers], body,
                time.monotonic()))
        fake = self._fake
        defaults = self._owner._server_faults()
        if defaults:
            # The server's own faults (set by a test for this upstream only);
            # a request's x-fake-* headers win over them.
            fake = {**defaults, **fake} if fake else dict(defaults)
        self._queue.append(Request(method, self._url, body, fake,
                                    parser.should_keep_alive(), self._anthropic))
        self._dispatch()

    # ------------------------------------------------------------ answering

    def _dispatch(self) -> None:
        """Answer queued requests in order; hand off to a task when one must wait."""
        while self._queue and self._worker is None and not self._closing and not self._silent:
            req = self._queue.popleft()
            if req is None:
                self.write_and_close(BAD_REQUEST)
                return
            job = self._owner._answer(self, req)
            if job is not None:
                self._worker = self._loop.create_task(self._run(job))

    async def _run(self, job: Any) -> None:
        try:
            await job
        finally:
            self._worker = None
        if not self._lost:
            self._dispatch()

    def write(self, data: bytes, close: bool) -> None:
        if close:
            self.write_and_close(data)
        else:
            self._transport.write(data)  # type: ignore[union-attr]

    def write_and_close(self, data: bytes) -> None:
        self._closing = True
        self._queue.clear()
        self._transport.write(data)  # type: ignore[union-attr]
        self._transport.close()  # type: ignore[union-attr]

    def go_silent(self) -> None:
        self._silent = True

    def drop(self) -> None:
        """Reset the connection at once: the request gets no answer at all."""
        self._closing = True
        self._queue.clear()
        if self._transport is not None and not self._lost:
            reset_transport(self._transport)

    async def send_slow(self, canned: Canned | None, faults: Faults, close: bool) -> None:
        """Write a response that needs waiting: delays, faults, big bodies."""
        transport = self._transport
        assert transport is not None
        if faults.delay:
            await asyncio.sleep(faults.delay)
            if self._lost:
                return
        if canned is None:  # x-fake-body-bytes
            n = faults.body_bytes or 0
            declared = None if faults.chunked else n + (1024 if faults.truncate else 0)
            content_type = "application/json" if n >= 10 else "text/plain"
            pieces: Iterable[bytes] = filler(n, faults.chunked, faults.truncate)
            transport.write(head(200, content_type, declared, close))
        else:
            head_bytes, pieces = frame_slow(canned.reply, close, faults.truncate, faults)
            transport.write(head_bytes)
        sent = 0
        limit = faults.reset_after
        gap = faults.event_delay
        for index, piece in enumerate(pieces):
            if gap and index:
                await asyncio.sleep(gap)
            if self._lost:
                return
            if limit is not None and sent + len(piece) >= limit:
                transport.write(piece[:limit - sent])
                await self._reset()
                return
            transport.write(piece)
            sent += len(piece)
            if self._write_paused:
                await self._writable()
            elif index % 16 == 15:
                await asyncio.sleep(0)  # let other connections in during big bodies
        if self._lost:
            return
        if limit is not None:  # asked to reset past the end of the body
            await self._reset()
        elif close or faults.truncate or faults.close_delimited:
            self.write_and_close(b"")

    async def _reset(self) -> None:
        """Let the bytes written so far reach the peer, then reset (RST)."""
        self._closing = True
        transport = self._transport
        assert transport is not None
        deadline = self._loop.time() + FLUSH_TIMEOUT
        while not self._lost and self._loop.time() < deadline:
            if self._write_paused:
                await self._writable(max(0.0, deadline - self._loop.time()))
            elif transport.get_write_buffer_size() or unsent_bytes(transport):
                await asyncio.sleep(0.001)
            else:
                break
        if not self._lost:
            reset_transport(transport)

    def abort(self) -> None:
        if self._transport is not None and not self._lost:
            self._transport.abort()
