"""Client side: one :class:`ClientConnection` per accepted socket.

httptools (llhttp) parses; this module adds what llhttp leaves to its user:
limits on head and body size, timeouts for a slow head and an idle
keep-alive, the refusal of framing that could be read two ways, pipelining
(requests queued and answered strictly in order), and flow control in both
directions.

State is kept in two groups: per connection (transport, queue, timers, flow
flags) and per request (the head being parsed, the body so far).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, Protocol, cast

import httptools

from . import errors
from .request import VARYING_HEADERS, Request

__all__ = ["HOP_BY_HOP", "ClientConnection", "ConnectionLimits", "FlowListener", "Handler"]

# Headers that describe one hop, never forwarded (RFC 9110 7.6.1), plus the
# framing headers relay recomputes itself.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
    }
)

# Request headers relay does not pass upstream: hop-by-hop ones, and those it
# sets itself (Host, framing, X-Forwarded-*, Accept-Encoding: relay asks for
# identity, see relay/exchange.py), plus Expect (the body is read before
# forwarding, so upstream never needs to say 100 Continue).
NOT_FORWARDED = HOP_BY_HOP | {
    b"host", b"expect", b"x-forwarded-for", b"x-forwarded-proto", b"accept-encoding"
}

MAX_HEADERS = 128            # aiohttp's default; AI SDKs send ~20
MAX_PIPELINED = 32           # queued requests before the socket stops being read
WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024

_CRLF = b"\r\n"
_CHUNK_END = b"0\r\n\r\n"
_CHUNKED = b"Transfer-Encoding: chunked\r\n"
_CONN_CLOSE = b"Connection: close\r\n"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_JSON_TYPE = b"Content-Type: application/json\r\n"


class FlowListener(Protocol):
    """Whoever feeds the response (an upstream connection) is paused with it."""

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


Handler = Callable[[Request, "ClientConnection"], Coroutine[Any, Any, None]]


class ConnectionLimits:
    """The numbers a connection enforces, copied from ``server`` config once."""

    __slots__ = ("max_body_bytes", "max_header_bytes", "header_timeout", "idle_timeout")

    def __init__(
        self,
        max_body_bytes: int,
        max_header_bytes: int,
        header_timeout: float,
        idle_timeout: float,
    ) -> None:
        self.max_body_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout


class _Rejected:
    """A queued stand-in for a request the parser refused: answered in turn."""

    __slots__ = ("error",)

    def __init__(self, error: errors.GatewayError) -> None:
        self.error = error


class ClientConnection(asyncio.Protocol):
    """Serves one client socket; the pipeline answers through its response API."""

    def __init__(
        self,
        handler: Handler,
        limits: ConnectionLimits,
        registry: set[ClientConnection],
        loop: asyncio.AbstractEventLoop,
        tasks: set[asyncio.Task[None]] | None = None,
    ) -> None:
        # -- per connection --
        self._handler = handler
        self._limits = limits
        self._registry = registry
        # Request tasks outlive their response (accounting after the last
        # byte); the server's drain waits for them through this set.
        self._tasks = tasks
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._client_ip = ""
        self._queue: collections.deque[Request | _Rejected] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = 0.0
        self._deadline: float | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._closing = False          # no new requests: error, shutdown or close
        self._lost = False
        self._head_raw = 0             # bytes read while a head was incomplete
        self._idle = False             # the idle keep-alive timer is the armed one
        self._upgrade_ignored = False  # the request being parsed offered h2c

        # -- per request (being parsed) --
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._body: list[bytes] = []
        self._body_size = 0
        self._in_head = True
        self._req: Request | None = None

        # -- per request (being answered) --
        self._current: Request | _Rejected | None = None
        self._task: asyncio.Task[None] | None = None
        self._response_started = False
        self._chunked = False
        self._close_after = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._held: list[bytes] | None = None   # writes collected by hold()
        self.flow: FlowListener | None = None
        self.on_lost: Callable[[], None] | None = None

    # ------------------------------------------------------------------ #
    # asyncio.Protocol
    # ------------------------------------------------------------------ #
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        # uvloop's default low-water mark is 16 bytes: set both marks.
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        peer = transport.get_extra_info("peername")
        if peer:
            self._client_ip = peer[0]
        self._registry.add(self)
        self._arm_timer(self._limits.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._registry.discard(self)
        self._stop_timer()
        self._queue.clear()
        # Wake the producers: whatever they write now would be dropped.
        if self._writing_paused and self.flow is not None:
            self.flow.resume_reading()
        self._wake_drain()
        callback = self.on_lost
        self.on_lost = None
        if callback is not None:
            callback()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        if self._in_head:
            self._head_raw += len(data)
            if self._idle:
                # First bytes of a new request on an idle keep-alive connection.
                self._idle = False
                self._arm_timer(self._limits.header_timeout)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            if not self._upgrade_ignored:
                self._reject(errors.bad_request("Protocol upgrades are not supported"))
                return
            # An h2c offer relay declined: the request was an ordinary one,
            # and the parser resumes on the bytes after it.
            self._upgrade_ignored = False
            rest = data[exc.args[0]:] if exc.args else b""
            if rest:
                self.data_received(rest)
            return
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, errors.GatewayError):
                self._reject(cause)
            else:
                self._reject(errors.bad_request("Malformed HTTP request"))
            return
        except httptools.HttpParserError as exc:
            self._reject(errors.bad_request(f"Malformed HTTP request: {exc}"))
            return
        if self._in_head and self._head_raw > 2 * self._limits.max_header_bytes:
            # llhttp buffers an unfinished header value itself: stop it here.
            self._reject(errors.headers_too_large(self._limits.max_header_bytes))

    def eof_received(self) -> bool | None:
        # A half-closed client still gets its queued answers; then we close.
        self._closing = True
        if self._current is None and not self._queue:
            return False
        return True

    def pause_writing(self) -> None:
        self._writing_paused = True
        if self.flow is not None:
            self.flow.pause_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self.flow is not None:
            self.flow.resume_reading()
        self._wake_drain()

    def _wake_drain(self) -> None:
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def drain(self) -> None:
        """Wait while the client's write buffer is above its high-water mark."""
        if not self._writing_paused or self._lost:
            return
        if self._drain_waiter is None:
            self._drain_waiter = self._loop.create_future()
        await self._drain_waiter

    # ------------------------------------------------------------------ #
    # httptools callbacks
    # ------------------------------------------------------------------ #
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._header_bytes = 0
        self._body = []
        self._body_size = 0
        self._in_head = True

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._header_bytes += len(url)
        if self._header_bytes > self._limits.max_header_bytes:
            raise errors.headers_too_large(self._limits.max_header_bytes)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self._limits.max_header_bytes or len(self._headers) >= MAX_HEADERS:
            raise errors.headers_too_large(self._limits.max_header_bytes)
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        if parser.should_upgrade():
            # llhttp ends an upgrade request at its head (it skips any body)
            # and hands the rest of the stream over. relay speaks HTTP/1.1
            # only: an h2c offer without a body is ignored, as RFC 9110 lets
            # a server do; anything else (WebSocket, CONNECT) is refused
            # before it can reach an upstream.
            if not self._ignorable_upgrade():
                raise errors.bad_request("Protocol upgrades are not supported")
            self._upgrade_ignored = True
        method = parser.get_method()
        keep_alive = parser.should_keep_alive()
        minor = 1 if parser.get_http_version() == "1.1" else 0
        request = Request(
            method,
            self._url,
            self._headers,
            b"",
            keep_alive,
            minor,
            self._client_ip,
            self._loop.time(),
        )
        expect_continue = False
        host_seen = False
        content_length = -1
        forward: list[bytes] = []
        connection_tokens: set[bytes] | None = None
        for name, value in self._headers:
            lname = name.lower()
            if lname not in NOT_FORWARDED:
                forward.append(b"%s: %s\r\n" % (name, value))
            if lname == b"authorization":
                request.authorization = value
            elif lname == b"x-api-key":
                request.api_key = value
            elif lname == b"cache-control":
                request.cache_control = value.lower()
            elif lname == b"content-length":
                content_length = int(value)  # llhttp validated digits and uniqueness
            elif lname == b"transfer-encoding":
                # llhttp accepts "gzip, chunked"; relay would have to forward
                # a body coded in a way it cannot frame faithfully: refuse.
                if value.strip().lower() != b"chunked":
                    raise errors.bad_request("Unsupported Transfer-Encoding")
            elif lname == b"host":
                if host_seen:
                    raise errors.bad_request("Duplicate Host header")
                host_seen = True
            elif lname == b"x-forwarded-for":
                request.forwarded_for = value
            elif lname in VARYING_HEADERS:
                request.add_varying(lname, value)
            elif lname == b"connection":
                tokens = {t.strip().lower() for t in value.split(b",")}
                tokens -= {b"close", b"keep-alive", b""}
                if tokens:
                    connection_tokens = tokens
            elif lname == b"expect":
                if value.lower() != b"100-continue":
                    raise errors.GatewayError(
                        417, "Unsupported Expect", "invalid_request_error",
                        "expectation_failed", close=True,
                    )
                expect_continue = True
        if connection_tokens:
            # Headers named in Connection are hop-by-hop too (RFC 9110 7.6.1).
            forward = [
                line for line in forward
                if line[: line.index(b":")].lower() not in connection_tokens
            ]
        request.forward_headers = b"".join(forward)
        if content_length > self._limits.max_body_bytes:
            raise errors.body_too_large(self._limits.max_body_bytes)
        self._req = request
        self._in_head = False
        self._head_raw = 0
        if expect_continue and content_length != 0 and self._transport is not None:
            # curl waits for this before sending large bodies.
            self._transport.write(_CONTINUE)
        # The head is in; the body gets the idle timeout to arrive whole.
        self._arm_timer(self._limits.idle_timeout)

    def _ignorable_upgrade(self) -> bool:
        if self._parser.get_method() == b"CONNECT":
            return False
        offered = b""
        for name, value in self._headers:
            lname = name.lower()
            if lname == b"upgrade":
                offered = value.strip().lower()
            elif lname in (b"content-length", b"transfer-encoding") and value.strip() != b"0":
                return False
        return offered == b"h2c"

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self._limits.max_body_bytes:
            raise errors.body_too_large(self._limits.max_body_bytes)
        self._body.append(body)

    def on_message_complete(self) -> None:
        request = self._req
        assert request is not None
        self._req = None
        parts = self._body
        if parts:
            request.body = parts[0] if len(parts) == 1 else b"".join(parts)
            self._body = []
        self._in_head = True
        if self._current is None:
            self._cancel_timer()
            self._dispatch(request)
        else:
            self._queue.append(request)
            if len(self._queue) >= MAX_PIPELINED:
                self._pause_reading()

    # ------------------------------------------------------------------ #
    # request dispatch
    # ------------------------------------------------------------------ #
    def _reject(self, error: errors.GatewayError) -> None:
        """Answer a refused request in its turn, then close."""
        self._closing = True
        self._pause_reading()
        self._in_head = False
        if self._current is None:
            self._cancel_timer()
            self._current = _Rejected(error)
            self.send_error(error)
        else:
            self._queue.append(_Rejected(error))

    def _dispatch(self, request: Request) -> None:
        self._current = request
        self._response_started = False
        self._close_after = not request.keep_alive or self._closing
        task = self._task = self._loop.create_task(self._serve(request))
        tasks = self._tasks
        if tasks is not None:
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def _serve(self, request: Request) -> None:
        try:
            await self._handler(request, self)
        except asyncio.CancelledError:
            if not self._lost:
                self.abort()
            raise
        except errors.GatewayError as exc:
            if self._current is request:
                if self._response_started:
                    self.abort()
                else:
                    self.send_error(exc)
        except Exception:  # a bug must cost one request, not the process
            if self._current is request:
                if self._response_started:
                    self.abort()
                else:
                    self.send_error(
                        errors.GatewayError(
                            500, "Internal error in relay", "server_error", "internal_error"
                        )
                    )
            raise

    def _next(self) -> None:
        """The current response is complete: close, or serve the next request."""
        self._current = None
        self._task = None
        self.flow = None
        self.on_lost = None
        if self._lost:
            return
        transport = self._transport
        assert transport is not None
        if self._close_after:
            self._closing = True
            transport.close()
            return
        if self._queue:
            item = self._queue.popleft()
            if self._reading_paused and len(self._queue) < MAX_PIPELINED // 2 and not self._closing:
                self._resume_reading()
            if isinstance(item, _Rejected):
                self._current = item
                self.send_error(item.error)
            else:
                self._dispatch(item)
            return
        if self._closing:
            transport.close()
            return
        self._idle = True
        self._arm_timer(self._limits.idle_timeout)

    # ------------------------------------------------------------------ #
    # response API (used by the pipeline for the current request)
    # ------------------------------------------------------------------ #
    @property
    def is_lost(self) -> bool:
        return self._lost

    @property
    def writing_paused(self) -> bool:
        return self._writing_paused

    @property
    def response_started(self) -> bool:
        return self._response_started

    def respond(
        self,
        status: int,
        headers: Iterable[bytes],
        body: bytes,
        *,
        close: bool = False,
    ) -> None:
        """Send a complete response; *headers* are rendered ``Name: value\\r\\n`` lines."""
        if self._lost:
            self._next()
            return
        if close:
            self._close_after = True
        head = [errors.status_line(status)]
        head.extend(headers)
        head.append(b"Content-Length: %d\r\n" % len(body))
        if self._close_after:
            head.append(_CONN_CLOSE)
        head.append(_CRLF)
        head.append(body)
        self._response_started = True
        assert self._transport is not None
        self._transport.writelines(head)
        self._next()

    def send_error(self, error: errors.GatewayError, extra: Iterable[bytes] = ()) -> None:
        """Answer with relay's own OpenAI-shaped error."""
        lines = [_JSON_TYPE]
        lines.extend(b"%s: %s\r\n" % pair for pair in error.headers)
        lines.extend(extra)
        self.respond(error.status, lines, error.body(), close=error.close)

    def start_response(
        self,
        status: int,
        headers: Iterable[bytes],
        length: int | None,
        *,
        bodyless: bool = False,
    ) -> None:
        """Send the head of a streamed response.

        *length* None means the size is unknown: chunked for HTTP/1.1
        clients, close-delimited for HTTP/1.0 ones. *bodyless* is for
        responses that never have a body (to HEAD, 204, 304): no framing
        header is added; *headers* may carry the upstream's Content-Length.
        """
        request = self._current
        assert isinstance(request, Request)
        head = [errors.status_line(status)]
        head.extend(headers)
        if bodyless:
            self._chunked = False
        elif length is not None:
            head.append(b"Content-Length: %d\r\n" % length)
            self._chunked = False
        elif request.http_minor >= 1 and status not in (204, 304) and status >= 200:
            head.append(_CHUNKED)
            self._chunked = True
        else:
            self._chunked = False
            self._close_after = True
        if self._close_after:
            head.append(_CONN_CLOSE)
        head.append(_CRLF)
        self._response_started = True
        self._emit(head)

    def write(self, chunk: bytes) -> None:
        """Send a piece of the body as it arrived (no copy for known lengths)."""
        if self._lost or not chunk:
            return
        if self._chunked:
            self._emit((b"%x\r\n" % len(chunk), chunk, _CRLF))
        else:
            self._emit((chunk,))

    def write_many(self, chunks: list[bytes]) -> None:
        """Send several pieces as one chunk / one vectored write."""
        if self._lost or not chunks:
            return
        size = sum(map(len, chunks))
        if not size:
            return
        if self._chunked:
            self._emit([b"%x\r\n" % size, *chunks, _CRLF])
        else:
            self._emit(chunks)

    def finish(self) -> None:
        """The body is complete."""
        if self._chunked:
            self._emit((_CHUNK_END,))
        self._chunked = False
        self.release()
        self._next()

    def hold(self) -> None:
        """Collect writes until :meth:`release`.

        The upstream side calls this for the span of one read: a response
        head and the body bytes that came with it leave in one vectored
        write (one syscall) instead of one per piece.
        """
        if self._held is None:
            self._held = []

    def release(self) -> None:
        """Write what :meth:`hold` collected."""
        held = self._held
        if held is not None:
            self._held = None
            if held and not self._lost:
                assert self._transport is not None
                self._transport.writelines(held)

    def _emit(self, parts: Iterable[bytes]) -> None:
        if self._lost:
            return
        held = self._held
        if held is not None:
            held.extend(parts)
        else:
            assert self._transport is not None
            self._transport.writelines(parts)

    def abort(self) -> None:
        """Close at once: the response cannot be completed (upstream died mid-body)."""
        self.release()  # held bytes go out first: the client sees where the stream was cut
        self._closing = True
        self._queue.clear()
        if self._transport is not None and not self._lost:
            self._transport.abort()

    def shutdown(self) -> None:
        """Graceful stop: finish the current response, then close."""
        self._closing = True
        self._close_after = True
        if self._current is None and self._transport is not None:
            self._transport.close()

    @property
    def busy(self) -> bool:
        return self._current is not None

    # ------------------------------------------------------------------ #
    # timers and reading flow
    # ------------------------------------------------------------------ #
    # One timer handle per connection, re-armed lazily: a request only moves
    # the deadline; the handle fires at most once per timeout period and
    # re-arms itself for what is left. Creating and cancelling a handle per
    # request was a measurable part of the hot path.
    def _arm_timer(self, delay: float) -> None:
        deadline = self._loop.time() + delay
        self._deadline = deadline
        if self._timer is None or self._timer_when > deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(deadline, self._on_timer)
            self._timer_when = deadline

    def _cancel_timer(self) -> None:
        self._deadline = None

    def _stop_timer(self) -> None:
        self._deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None or self._lost:
            return
        if self._loop.time() < deadline:
            self._timer = self._loop.call_at(deadline, self._on_timer)
            self._timer_when = deadline
            return
        self._deadline = None
        self._on_timeout()

    def _on_timeout(self) -> None:
        if self._current is not None or self._lost:
            return
        # A slow head, a body that stopped, or an idle keep-alive: close.
        self._closing = True
        if self._transport is not None:
            self._transport.close()

    def _pause_reading(self) -> None:
        if not self._reading_paused and self._transport is not None and not self._lost:
            self._reading_paused = True
            self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self._transport is not None and not self._lost:
            self._reading_paused = False
            self._transport.resume_reading()
