"""Client side: one :class:`ClientConnection` per accepted socket.

httptools (llhttp) parses; this module adds what llhttp leaves to its user:
limits on head and body size, timeouts for a slow head and an idle
keep-alive, the refusal of framing that could be read two ways, pipelining
(requests queued and answered strictly in order), and flow control in both
directions.

This one source is both twins: imported as is it is the pure
implementation, and setup.py compiles it unchanged into ``_client_c`` with
the declarations of ``_client_c.pxd`` (a ``cdef class`` whose states,
offsets and sizes are C ints). ``relay.http.protocol`` says which one runs.

State is explicit and kept apart (as uvicorn's httptools protocol does): one
:class:`ConnState` per connection, and per request a :class:`ReadState`
(the request being parsed) and an :class:`AnswerState` (the request being
answered, the head of the pipeline). Every change goes through a setter that
refuses a transition the tables in ``states`` do not list (asyncpg's
``_set_state``): a bug shows as an error at the faulty call instead of as
bytes in the wrong place. Two rules follow from the states rather than from
care at each call site: an interim ``100 Continue`` is written only while
its request is the next to be answered (never inside a pipelined
predecessor's response), and nothing is written once the connection is
``CLOSED``.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, cast

import httptools

from .. import debug
from .._fast import BAD_TRANSFER_ENCODING, DUPLICATE_HOST, request_head, request_line
from . import errors
from .flow import FlowControl, FlowListener
from .request import Request

# Star import on purpose: the compiled twin declares the short state names
# (_OPEN, _AWAIT, ...) as a C enum in _client_c.pxd, and Cython refuses a
# named import that would assign them.
from .states import *  # noqa: F403
from .states import (
    ANSWER_MOVES,
    CONN_MOVES,
    READ_MOVES,
    AnswerState,
    ConnState,
    ReadState,
    refused,
)

# ruff: noqa: F405  (the short state names come from the star import)

__all__ = ["ClientConnection", "ConnectionLimits", "Handler"]

MAX_HEADERS = 128            # aiohttp's default; AI SDKs send ~20
MAX_PIPELINED = 32           # queued requests before the socket stops being read
WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024

_CRLF = b"\r\n"
_CHUNK_END = b"0\r\n\r\n"
_CHUNKED = b"Transfer-Encoding: chunked\r\n"
_CONN_CLOSE = b"Connection: close\r\n"
_INTERIM_100 = b"HTTP/1.1 100 Continue\r\n\r\n"
_JSON_TYPE = b"Content-Type: application/json\r\n"
_HTTP11 = b"HTTP/1.1"
_HTTP10 = b"HTTP/1.0"
_AFTER_HEAD = -2


def _line_error(data: bytes, start: int, end: int) -> errors.GatewayError | None:
    """What is wrong with the request line ``data[start:end]`` (CRLF excluded).

    llhttp skips extra spaces, takes ``GET /`` (HTTP/0.9) as the start of a
    head and accepts ``HTTP/2.0``; RFC 9112 3 wants ``method SP target SP
    HTTP/1.x``. Checked once per request, without copying the line.
    """
    first = data.find(b" ", start, end)
    last = data.rfind(b" ", start, end)
    if first < 0:
        return errors.bad_request("Malformed request line")
    if first == last:
        return errors.bad_request("HTTP/0.9 requests are not supported: a request line needs a version")
    if last == first + 1 or data.find(b" ", first + 1, last) >= 0:
        return errors.bad_request("Malformed request line: method, target and version take one space each")
    if end - last == 9 and (data.startswith(_HTTP11, last + 1) or data.startswith(_HTTP10, last + 1)):
        return None
    if data.startswith(b"HTTP/", last + 1, end):
        return errors.version_not_supported()
    return errors.bad_request("Malformed request line: no HTTP version")


# Answers a request: at once (returns None, the response is written), or
# returns the coroutine that answers it, which runs as the request's task.
Handler = Callable[[Request, "ClientConnection"], Coroutine[Any, Any, None] | None]


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


class ClientConnection:
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
        # None once the connection is lost (see connection_lost).
        self._parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self._client_ip = ""
        self._state = _OPEN
        self._flow = FlowControl(loop)
        self._queue: collections.deque[Request | _Rejected] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = 0.0
        self._deadline: float | None = None
        self._head_raw = 0             # bytes read while a head was incomplete
        # Where request lines are in the bytes being parsed, so each is
        # checked once (see _line_error): the bytes of this read, the offset
        # of the next request's first byte in them (-1: not known), the start
        # of a line whose end has not arrived yet.
        self._data = b""
        self._line_at = -1
        self._line_part: bytes | None = None

        # -- per request (being read) --
        self._read = _AWAIT
        self._url = b""
        self._minor = -1               # HTTP/1.x minor version, -1: not read from the line
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._body: list[bytes] = []
        self._body_size = 0
        self._length = -1              # Content-Length; -1 for a chunked body
        self._head_at = -1             # offset after its request line in this read
        # Offset after its last byte in this read; -1 not known, _AFTER_HEAD:
        # its head's end plus _length, found only if another request follows.
        self._end_at = -1
        self._req: Request | None = None

        # -- per request (being answered) --
        self._answer = _NONE
        self._current: Request | _Rejected | None = None
        self._task: asyncio.Task[None] | None = None
        self._close_after = False
        self._held: list[bytes] | None = None   # writes collected by hold()
        self.on_lost: Callable[[], None] | None = None

    # ------------------------------------------------------------------ #
    # states
    # ------------------------------------------------------------------ #
    def _set_state(self, new: int) -> None:
        old = self._state
        if not CONN_MOVES[old] >> new & 1:
            raise refused("connection", old, new)
        self._state = new

    def _set_read(self, new: int) -> None:
        old = self._read
        if not READ_MOVES[old] >> new & 1:
            raise refused("read", old, new)
        self._read = new

    def _set_answer(self, new: int) -> None:
        old = self._answer
        if not ANSWER_MOVES[old] >> new & 1:
            raise refused("answer", old, new)
        self._answer = new

    def _stop_reading_requests(self) -> None:
        """No new request from here on (answers already in hand still go out)."""
        if self._state < _CLOSING:
            self._set_state(_CLOSING)

    @property
    def state(self) -> ConnState:
        return ConnState(self._state)

    def __repr__(self) -> str:
        return (
            f"<ClientConnection {self._client_ip or '-'} {ConnState(self._state).name} "
            f"read={ReadState(self._read).name} answer={AnswerState(self._answer).name} "
            f"queued={len(self._queue)}>"
        )

    def _debug_buffers(self) -> dict[str, int]:
        """What this connection holds, for relay.debug's snapshot."""
        transport = self._transport
        return {
            "client_queued_requests": len(self._queue),
            "client_body_bytes": sum(map(len, self._body)),
            "client_held_bytes": sum(map(len, self._held)) if self._held else 0,
            "client_write_buffer_bytes": (
                transport.get_write_buffer_size()
                if transport is not None and self._state != _CLOSED
                else 0
            ),
        }

    # ------------------------------------------------------------------ #
    # asyncio.Protocol
    # ------------------------------------------------------------------ #
    @debug.opens("client_connections")
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        self._flow.attach(transport)
        # uvloop's default low-water mark is 16 bytes: set both marks.
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        peer = transport.get_extra_info("peername")
        if peer:
            self._client_ip = peer[0]
        self._registry.add(self)
        self._arm_timer(self._limits.header_timeout)

    @debug.closes("client_connections")
    def connection_lost(self, exc: Exception | None) -> None:
        if self._state == _CLOSED:
            return
        self._set_state(_CLOSED)
        self._registry.discard(self)
        self._stop_timer()
        self._queue.clear()
        self._line_part = None
        # The parser holds this connection's bound callbacks: a cycle that,
        # left in place, keeps every closed connection (its parser, transport
        # and buffers) alive until a full collection, which the tuned
        # thresholds make rare. Nothing parses after the close.
        self._parser = None
        # Wake the producers: whatever they write now would be dropped.
        self._flow.lost_connection()
        callback = self.on_lost
        self.on_lost = None
        if callback is not None:
            callback()

    def data_received(self, data: bytes) -> None:
        if self._state >= _CLOSING:
            return
        read = self._read
        if read <= _HEAD:
            self._head_raw += len(data)
            if self._state == _IDLE:
                # First bytes of a new request on an idle keep-alive connection.
                self._set_state(_OPEN)
                self._arm_timer(self._limits.header_timeout)
            if read == _AWAIT:
                self._line_at = 0
            elif self._line_part is not None:
                if not self._line_ended(data):
                    return
            else:
                self._head_at = -1  # the line was in an earlier read
        else:
            # A body that began in an earlier read: with a length, it ends here.
            self._end_at = self._length - self._body_size if self._length >= 0 else -1
        self._data = data
        parser = self._parser
        assert parser is not None  # a lost connection (CLOSED) returned above
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            if self._read != _UPGRADE:
                self._reject(errors.bad_request("Protocol upgrades are not supported"))
                return
            # An h2c offer relay declined: the request was an ordinary one,
            # and the parser resumes on the bytes after it.
            self._set_read(_AWAIT)
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
            if str(exc) == "Invalid HTTP version":  # e.g. HTTP/1.2, HTTP/3.0
                self._reject(errors.version_not_supported())
            else:
                self._reject(errors.bad_request(f"Malformed HTTP request: {exc}"))
            return
        finally:
            self._data = b""
        if self._read <= _HEAD and self._head_raw > 2 * self._limits.max_header_bytes:
            # llhttp buffers an unfinished header value itself: stop it here.
            self._reject(errors.headers_too_large(self._limits.max_header_bytes))

    def _check_line(self, data: bytes, start: int) -> None:
        """Check the request line beginning at *start*; keep it if it is cut."""
        size = len(data)
        while start < size and data[start] in b"\r\n":  # empty lines before a request
            start += 1
        end = data.find(b"\r\n", start)
        if end < 0:
            self._line_part = data[start:]
            self._head_at = -1
            return
        error = _line_error(data, start, end)
        if error is not None:
            raise error
        self._head_at = end + 2

    def _previous_end(self) -> int:
        """Where the request just completed in this read ends (the next begins)."""
        data = self._data
        end = data.find(b"\r\n\r\n", self._head_at - 2)
        if end < 0:
            return -1
        pos = end + 4
        if self._length >= 0:
            return pos + self._length
        # A chunked body llhttp has accepted: size[;ext] CRLF data CRLF ...
        # 0 CRLF, trailer lines, CRLF.
        try:
            while True:
                eol = data.find(b"\r\n", pos)
                size = int(data[pos:eol].partition(b";")[0], 16)
                pos = eol + 2
                if not size:
                    break
                pos += size + 2
        except ValueError:
            return -1
        while True:
            eol = data.find(b"\r\n", pos)
            if eol < 0:
                return -1
            if eol == pos:
                return pos + 2
            pos = eol + 2

    def _line_ended(self, data: bytes) -> bool:
        """The rest of a cut request line arrived (or not yet): check it first."""
        part = self._line_part
        assert part is not None
        line = part + data
        end = line.find(b"\r\n")
        if end < 0:
            # Bounded: llhttp counts the target into the head's size limit.
            self._line_part = line if len(line) <= self._limits.max_header_bytes else None
            return True
        self._line_part = None
        error = _line_error(line, 0, end)
        if error is not None:
            self._reject(error)
            return False
        self._head_at = end + 2 - len(part)
        return True

    def eof_received(self) -> bool | None:
        # A half-closed client still gets the answers relay makes itself; a
        # request not yet answered counts as gone (is_lost) for upstream work.
        if self._state < _HALF_CLOSED:
            self._set_state(_HALF_CLOSED)
        if self._current is None and not self._queue:
            return False
        return True

    def pause_writing(self) -> None:
        self._flow.pause_writing()

    def resume_writing(self) -> None:
        self._flow.resume_writing()

    async def drain(self) -> None:
        """Wait while the client's write buffer is above its high-water mark."""
        await self._flow.drain()

    @property
    def flow(self) -> FlowListener | None:
        """Whoever feeds the response (an upstream connection): paused with it."""
        return self._flow.listener

    @flow.setter
    def flow(self, listener: FlowListener | None) -> None:
        self._flow.listener = listener

    # ------------------------------------------------------------------ #
    # httptools callbacks
    # ------------------------------------------------------------------ #
    def on_message_begin(self) -> None:
        self._set_read(_HEAD)
        self._url = b""
        self._headers = []
        self._header_bytes = 0
        self._body = []
        self._body_size = 0
        self._end_at = -1
        self._minor = -1
        start = self._line_at
        if start == _AFTER_HEAD:  # pipelined behind a request in this same read
            start = self._previous_end()
        if start >= 0:
            self._line_at = -1
            data = self._data
            # The common line in one compiled look (one request per read),
            # its version read too (llhttp's own formats a string); anything
            # unusual takes _check_line.
            end, minor = request_line(data, start)
            if minor >= 0:
                self._minor = minor
                self._head_at = end + 2
                return
            self._check_line(data, start)
        else:
            # Behind a request whose end in this read is not known (its head
            # or chunked body began in an earlier read): llhttp's own checks
            # and the version check in on_headers_complete still apply.
            self._head_at = -1

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
        assert parser is not None  # called from its feed_data
        upgrade = parser.should_upgrade()
        if upgrade:
            # llhttp ends an upgrade request at its head (it skips any body)
            # and hands the rest of the stream over. relay speaks HTTP/1.1
            # only: an h2c offer without a body is ignored, as RFC 9110 lets
            # a server do; anything else (WebSocket, CONNECT) is refused
            # before it can reach an upstream.
            if not self._ignorable_upgrade():
                raise errors.bad_request("Protocol upgrades are not supported")
        minor = self._minor
        if minor < 0:
            version = parser.get_http_version()
            if version == "1.1":
                minor = 1
            elif version == "1.0":
                minor = 0
            else:
                raise errors.version_not_supported()
        method = parser.get_method()
        keep_alive = parser.should_keep_alive()
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
        (
            problem,
            forward,
            credentials,
            request.authorization,
            request.api_key,
            request.cache_control,
            length_value,
            chunked,
            host_seen,
            request.forwarded_for,
            request.varying,
            expect_continue,
        ) = request_head(self._headers)
        if problem:
            if problem == BAD_TRANSFER_ENCODING:
                # llhttp accepts "gzip, chunked"; relay would have to forward
                # a body coded in a way it cannot frame faithfully: refuse.
                raise errors.bad_request("Unsupported Transfer-Encoding")
            if problem == DUPLICATE_HOST:
                raise errors.bad_request("Duplicate Host header")
            raise errors.GatewayError(
                417, "Unsupported Expect", "invalid_request_error",
                "expectation_failed", close=True,
            )
        if minor and not host_seen:
            raise errors.bad_request("Missing Host header: HTTP/1.1 requests must carry one")
        request.forward_headers = forward
        request.credential_headers = credentials
        # llhttp validated the digits and that the header is not repeated.
        content_length = -1 if length_value is None else int(length_value)
        if content_length > self._limits.max_body_bytes:
            raise errors.body_too_large(self._limits.max_body_bytes)
        self._req = request
        self._head_raw = 0
        self._length = -1 if chunked else content_length if content_length > 0 else 0
        if self._head_at >= 0:
            self._end_at = _AFTER_HEAD  # located if a pipelined request follows
        if upgrade:
            self._set_read(_UPGRADE)
        elif expect_continue and content_length != 0:
            if self._answer == _NONE:
                # This request is the next to be answered: curl waits for
                # this before sending large bodies.
                self._set_read(_BODY)
                assert self._transport is not None
                self._transport.write(_INTERIM_100)
            else:
                # A pipelined predecessor is being answered: its response
                # must not be cut by an interim one. _next() writes it.
                self._set_read(_CONTINUE)
        else:
            self._set_read(_BODY)
        # The head is in; the body gets the idle timeout to arrive whole.
        self._arm_timer(self._limits.idle_timeout)

    def _ignorable_upgrade(self) -> bool:
        parser = self._parser
        assert parser is not None  # called from its feed_data
        if parser.get_method() == b"CONNECT":
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
        if self._read == _CONTINUE:
            self._set_read(_BODY)  # the client did not wait for 100 Continue
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
        if self._read != _UPGRADE:  # data_received resumes after the upgrade
            self._set_read(_AWAIT)
        self._line_at = self._end_at
        if self._answer == _NONE:
            if self._state >= _CLOSING:
                # A request answered at once closed the connection while
                # this read was parsed: what follows it is never answered.
                return
            self._cancel_timer()
            self._dispatch(request)
        else:
            self._queue.append(request)
            if len(self._queue) >= MAX_PIPELINED:
                self._flow.pause_reading()

    # ------------------------------------------------------------------ #
    # request dispatch
    # ------------------------------------------------------------------ #
    def _reject(self, error: errors.GatewayError) -> None:
        """Answer a refused request in its turn, then close."""
        if self._answer == _NONE and self._state >= _CLOSING:
            return  # closing after a complete answer: nothing more is read
        self._stop_reading_requests()
        self._flow.pause_reading()
        self._line_part = None
        if self._answer == _NONE:
            self._cancel_timer()
            self._set_answer(_PENDING)
            self._current = _Rejected(error)
            self.send_error(error)
        else:
            self._queue.append(_Rejected(error))

    def _dispatch(self, request: Request) -> None:
        self._begin(request)
        self._run(request)

    def _begin(self, request: Request) -> None:
        """*request* is the one being answered from now on."""
        self._set_answer(_PENDING)
        if self._state == _IDLE:
            self._set_state(_OPEN)
        self._current = request
        # Once no new request is read, close after the last one queued.
        self._close_after = not request.keep_alive or (self._state >= _CLOSING and not self._queue)

    def _run(self, request: Request) -> None:
        # Most answers (a cache hit, relay's own refusals) need no await:
        # the handler writes them here, without a task.
        try:
            work = self._handler(request, self)
        except Exception as exc:
            if not isinstance(exc, errors.GatewayError):  # a bug: reported, as a task's would be
                self._loop.call_exception_handler({
                    "message": "Unhandled error answering a request",
                    "exception": exc,
                    "protocol": self,
                })
            self._failed(request, exc)
            return
        if work is None:
            self._answered(request)
            return
        task = self._task = self._loop.create_task(self._serve(request, work))
        tasks = self._tasks
        if tasks is not None:
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    def _run_queued(self, request: Request) -> None:
        """A pipelined request's turn (run soon after its predecessor's last
        byte, so that one is counted before this one is answered)."""
        if self._current is not request:
            return
        if self._state == _CLOSED:
            self._set_answer(_NONE)
            self._current = None
            return
        self._run(request)

    @debug.during("requests")
    async def _serve(self, request: Request, work: Coroutine[Any, Any, None]) -> None:
        try:
            try:
                await work
            finally:
                finished = request.on_finished
                if finished is not None:
                    finished()
        except asyncio.CancelledError:
            if self._state != _CLOSED:
                self.abort()
            raise
        except Exception as exc:  # a bug must cost one request, not the process
            self._failed(request, exc)
            if not isinstance(exc, errors.GatewayError):
                raise
        else:
            self._answered(request)

    def _failed(self, request: Request, exc: Exception) -> None:
        """The handler raised: relay's error answer, unless a response began."""
        if self._current is not request:
            return
        if self._answer != _PENDING:
            self.abort()
        elif isinstance(exc, errors.GatewayError):
            self.send_error(exc)
        else:
            self.send_error(
                errors.GatewayError(500, "Internal error in relay", "server_error", "internal_error")
            )

    def _answered(self, request: Request) -> None:
        """The handler returned: close if it wrote nothing."""
        if self._current is request and self._answer == _PENDING and self._state != _CLOSED:
            # Not answered: the client was gone (half-closed) before
            # relay sent its request on. Nothing will be written: close.
            self._stop_reading_requests()
            assert self._transport is not None
            self._transport.close()

    def _next(self) -> None:
        """The current response is complete: close, or serve the next request."""
        self._set_answer(_NONE)
        self._current = None
        tasked = self._task is not None
        self._task = None
        self._flow.listener = None
        self.on_lost = None
        if self._state == _CLOSED:
            return
        transport = self._transport
        assert transport is not None
        if self._close_after:
            self._stop_reading_requests()
            transport.close()
            return
        if self._queue:
            item = self._queue.popleft()
            if len(self._queue) < MAX_PIPELINED // 2 and self._state < _CLOSING:
                self._flow.resume_reading()
            if isinstance(item, _Rejected):
                self._set_answer(_PENDING)
                self._current = item
                self.send_error(item.error)
            else:
                # Not answered from inside this call: the response just
                # finished is counted (request log, usage, its cache entry)
                # before the next. A task's finish is woken after this
                # call, so its successor waits one more turn of the loop.
                self._begin(item)
                if tasked:
                    self._loop.call_soon(self._loop.call_soon, self._run_queued, item)
                else:
                    self._loop.call_soon(self._run_queued, item)
            return
        if self._state >= _CLOSING:
            transport.close()
            return
        self._set_state(_IDLE)
        self._arm_timer(self._limits.idle_timeout)
        if self._read == _CONTINUE:
            # Its turn has come: invite the body it held back.
            self._set_read(_BODY)
            transport.write(_INTERIM_100)

    # ------------------------------------------------------------------ #
    # response API (used by the pipeline for the current request)
    # ------------------------------------------------------------------ #
    @property
    def is_lost(self) -> bool:
        """The client cannot take this request's answer: gone before it began.

        The connection is lost, or the client closed its side (EOF) before
        any byte of this response was written; such a request must not be
        sent upstream (nginx, too, takes a client's EOF as an abort).
        """
        state = self._state
        return state == _CLOSED or (state == _HALF_CLOSED and self._answer == _PENDING)

    @property
    def writing_paused(self) -> bool:
        return self._flow.writing_paused

    @property
    def response_started(self) -> bool:
        return self._answer > _PENDING

    def respond(
        self,
        status: int,
        headers: Iterable[bytes],
        body: bytes,
        *,
        close: bool = False,
    ) -> None:
        """Send a complete response; *headers* are rendered ``Name: value\\r\\n`` lines."""
        if self._state == _CLOSED:
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
        framing = _STREAMING
        if bodyless:
            pass
        elif length is not None:
            head.append(b"Content-Length: %d\r\n" % length)
        elif request.http_minor >= 1 and status not in (204, 304) and status >= 200:
            head.append(_CHUNKED)
            framing = _CHUNKING
        else:
            self._close_after = True
        if self._close_after:
            head.append(_CONN_CLOSE)
        head.append(_CRLF)
        self._set_answer(framing)
        self._emit(head)

    def write(self, chunk: bytes) -> None:
        """Send a piece of the body as it arrived (no copy for known lengths)."""
        if chunk:
            self._emit((b"%x\r\n" % len(chunk), chunk, _CRLF) if self._answer == _CHUNKING
                       else (chunk,))

    def write_many(self, chunks: list[bytes]) -> None:
        """Send several pieces as one chunk / one vectored write."""
        if self._state == _CLOSED or not chunks:
            return
        size = sum(map(len, chunks))
        if not size:
            return
        if self._answer == _CHUNKING:
            self._emit([b"%x\r\n" % size, *chunks, _CRLF])
        else:
            self._emit(chunks)

    def finish(self) -> None:
        """The body is complete."""
        if self._answer == _CHUNKING:
            self._emit((_CHUNK_END,))
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
            if held and self._state != _CLOSED:
                assert self._transport is not None
                self._transport.writelines(held)

    def _emit(self, parts: Iterable[bytes]) -> None:
        if self._state == _CLOSED:
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
        self._queue.clear()
        if self._state == _CLOSED:
            return
        self._stop_reading_requests()
        if self._transport is not None:
            self._transport.abort()

    def shutdown(self) -> None:
        """Graceful stop: finish the current response, then close."""
        if self._state == _CLOSED:
            return
        self._stop_reading_requests()
        self._close_after = True
        if self._current is None and self._transport is not None:
            self._transport.close()

    @property
    def busy(self) -> bool:
        return self._current is not None

    # ------------------------------------------------------------------ #
    # timers
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
        if deadline is None or self._state == _CLOSED:
            return
        if self._loop.time() < deadline:
            self._timer = self._loop.call_at(deadline, self._on_timer)
            self._timer_when = deadline
            return
        self._deadline = None
        self._on_timeout()

    def _on_timeout(self) -> None:
        if self._current is not None or self._state == _CLOSED:
            return
        # A slow head, a body that stopped, or an idle keep-alive: close.
        self._stop_reading_requests()
        if self._transport is not None:
            self._transport.close()
