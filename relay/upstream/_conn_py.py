"""Upstream side: one :class:`UpstreamConnection` per pooled socket.

The response is parsed with httptools and handed to a :class:`ResponseSink`
piece by piece, in the parser's callbacks: nothing is buffered here, so the
sink (the exchange that writes to the client) decides what to keep. The
connection can be paused by the client side when the client reads slowly;
a read timeout measures upstream silence only while it is not paused.

This one source is both twins: imported as is it is the pure
implementation, and setup.py compiles it unchanged into ``_conn_c`` with
the declarations of ``_conn_c.pxd`` (a ``cdef class`` with typed fields).
``relay.upstream.protocol`` says which one runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import httptools

from .. import debug
from .._fast import response_head
from ..http.flow import FlowControl
from .sink import UpstreamError

if TYPE_CHECKING:
    from .._fast._heads_py import ResponseHead
    from .sink import ResponseSink

__all__ = ["UpstreamConnection"]

_NO_HEAD: ResponseHead = ((), b"", None, None, None, False, False)

WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024


class UpstreamConnection:
    """A keep-alive connection to one upstream, one exchange at a time."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        read_timeout: float,
        on_closed: Callable[[], None] | None = None,
    ) -> None:
        # -- per connection --
        self._loop = loop
        self._read_timeout = read_timeout
        self._on_closed = on_closed  # the pool's slot count
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.lost = False
        self.reusable = False        # true between a complete response and reuse
        self.idle_since = 0.0
        self.exchanges = 0
        self._flow = FlowControl(loop)
        # One timer handle per connection, moved lazily (as the client
        # side's): a send only moves the deadlines; the handle fires at most
        # once per timeout period and re-arms itself for what is left.
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = 0.0
        self._last_activity = 0.0

        # -- per exchange --
        self._sink: ResponseSink | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        # The response head as relay reads it (relay._fast.response_head):
        # its headers for the client, rendered, content type, coding, framing.
        self.head: ResponseHead = _NO_HEAD
        self._status = 0
        self._length: int | None = None
        self._close_delimited = False
        self._head_done = False
        self._head_only = False
        self._received_any = False
        self._head_deadline = 0.0

    # ------------------------------------------------------------------ #
    # exchange API (used by the pool's caller)
    # ------------------------------------------------------------------ #
    def send(
        self,
        parts: list[bytes],
        sink: ResponseSink,
        *,
        head_only: bool = False,
        first_byte_timeout: float = 0.0,
    ) -> None:
        """Write a request (one vectored write) and route its response to *sink*.

        *first_byte_timeout* (0: only the read timeout) bounds the wait for the
        response head; it shares the read timeout's one timer.
        """
        assert self.transport is not None and self._sink is None
        self.reusable = False
        self.exchanges += 1
        self._sink = sink
        self._headers = []
        self._status = 0
        self._length = None
        self._close_delimited = False
        self._head_done = False
        self._head_only = head_only
        self._received_any = False
        now = self._last_activity = self._loop.time()
        self.transport.writelines(parts)
        if 0.0 < first_byte_timeout < self._read_timeout:
            self._head_deadline = deadline = now + first_byte_timeout
        else:
            self._head_deadline = 0.0
            deadline = now + self._read_timeout
        timer = self._timer
        if timer is None or self._timer_when > deadline:
            if timer is not None:
                timer.cancel()
            self._arm(deadline)

    def __repr__(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport is not None else None
        busy = "busy" if self._sink is not None else "idle"
        return f"<UpstreamConnection {peer} {busy} lost={self.lost} exchanges={self.exchanges}>"

    def _debug_buffers(self) -> dict[str, int]:
        """What this connection holds, for relay.debug's snapshot."""
        transport = self.transport
        size = transport.get_write_buffer_size() if transport is not None and not self.lost else 0
        return {"upstream_write_buffer_bytes": size}

    @property
    def received_any(self) -> bool:
        """Whether any byte of the current response arrived (retry safety)."""
        return self._received_any

    def detach(self) -> None:
        """The sink is gone (client left): drop the connection, never reuse it."""
        self._sink = None
        self.close()

    def close(self) -> None:
        self.reusable = False
        self._cancel_timer()
        if self.transport is not None and not self.lost:
            self.transport.abort()

    def pause_reading(self) -> None:
        """The client reads slowly: hold the upstream back (its silence is not ours)."""
        self._flow.pause_reading()

    def resume_reading(self) -> None:
        if self._flow.resume_reading():
            self._last_activity = self._loop.time()

    # ------------------------------------------------------------------ #
    # asyncio.Protocol
    # ------------------------------------------------------------------ #
    @debug.opens("upstream_connections")
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self._flow.attach(transport)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)

    def pause_writing(self) -> None:
        self._flow.pause_writing()

    def resume_writing(self) -> None:
        self._flow.resume_writing()

    def data_received(self, data: bytes) -> None:
        if self._sink is None:
            # Bytes on an idle connection: it is out of step, never reuse it.
            self.close()
            return
        self._received_any = True
        self._last_activity = self._loop.time()
        sink = self._sink
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            self._fail(UpstreamError("Upstream response could not be relayed"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"Invalid HTTP response from upstream: {exc}"))
        sink.on_read_end()

    def eof_received(self) -> bool | None:
        return False

    @debug.closes("upstream_connections")
    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.reusable = False
        self._cancel_timer()
        self._flow.lost_connection()
        on_closed, self._on_closed = self._on_closed, None
        if on_closed is not None:
            on_closed()
        sink = self._sink
        if sink is None:
            return
        if self._head_done and self._close_delimited and exc is None:
            # A response without length ends when the connection does, but
            # only a clean close (FIN) proves the end: a reset may have cut it.
            self._sink = None
            sink.on_complete()
        else:
            self._fail(UpstreamError("Upstream closed the connection before the response was complete"))

    # ------------------------------------------------------------------ #
    # httptools callbacks
    # ------------------------------------------------------------------ #
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            # An interim response (e.g. 103 Early Hints): wait for the real one.
            self._headers = []
            return
        self._status = status
        head = self.head = response_head(self._headers)
        length_value = head[4]
        chunked = head[5]
        # llhttp validated the digits (and refused conflicting repeats).
        length = None if length_value is None else int(length_value)
        if chunked:
            length = None
        no_body = self._head_only or status in (204, 304)
        if no_body:
            length = 0
        self._close_delimited = length is None and not chunked and not no_body
        self._head_done = True
        sink = self._sink
        assert sink is not None
        sink.on_head(status, self._headers, length)
        if self._head_only:
            # llhttp cannot be told the request was HEAD: finish here and do
            # not reuse a connection whose parser expects a body.
            self._sink = None
            self.close()
            sink.on_complete()

    def on_body(self, body: bytes) -> None:
        sink = self._sink
        if sink is not None:
            sink.on_body(body)

    def on_message_complete(self) -> None:
        sink = self._sink
        if sink is None or not self._head_done:
            return
        self._sink = None
        # The timer stays armed: it finds no exchange when it fires and
        # stops, unless the next send has moved the deadlines meanwhile.
        self.reusable = self._parser.should_keep_alive() and not self.lost
        self.idle_since = self._loop.time()
        sink.on_complete()

    # ------------------------------------------------------------------ #
    # internals
    # ------------------------------------------------------------------ #
    def _fail(self, error: UpstreamError) -> None:
        sink = self._sink
        self._sink = None
        self.close()
        if sink is not None:
            sink.on_error(error)

    def _check_timeout(self) -> None:
        self._timer = None
        if self._sink is None or self.lost:
            return
        now = self._loop.time()
        if self._flow.reading_paused:
            # The client is slow, not the upstream.
            self._arm(now + self._read_timeout)
            return
        head_deadline = self._head_deadline
        if head_deadline and not self._head_done:
            if now >= head_deadline:
                self._fail(
                    UpstreamError("Upstream sent no response head in time", timeout=True)
                )
                return
            remaining = min(head_deadline, self._last_activity + self._read_timeout) - now
        else:
            remaining = self._last_activity + self._read_timeout - now
        if remaining > 0:
            self._arm(now + remaining)
            return
        self._fail(UpstreamError("Upstream read timed out", timeout=True))

    def _arm(self, when: float) -> None:
        self._timer = self._loop.call_at(when, self._check_timeout)
        self._timer_when = when

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
