"""One proxied exchange: the upstream response relayed to the client as it arrives.

:class:`ProxyExchange` is the :class:`~relay.upstream.protocol.ResponseSink`
of an upstream connection. Bytes go from the upstream parser's ``on_body``
straight to the client transport; the features that need to see them
(cache recording, usage from the SSE events, followers of a coalesced miss)
look at the same ``bytes`` objects without copying them. Only when relay
must remove the usage-only chunk it asked for does it forward whole events
instead of raw chunks.

Flow control: when the client's write buffer is above its high-water mark
the client connection pauses this upstream connection's reading, so a slow
reader holds back the upstream instead of filling relay's memory.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Protocol

from .http.protocol import HOP_BY_HOP, ClientConnection
from .sse import SSESplitter
from .upstream.protocol import UpstreamConnection, UpstreamError
from .usage import StreamUsage

__all__ = ["ExchangeObserver", "Outcome", "ProxyExchange"]

_EVENT_STREAM = b"text/event-stream"
# relay sets X-Relay-Cache on every response itself; one from an upstream
# (another relay in front of the origin) would make two, contradicting ones.
_NOT_RELAYED = HOP_BY_HOP | {b"x-relay-cache"}
_JSON = b"json"


def _without_null_usage(event: bytes) -> bytes:
    """Drop the ``"usage":null`` OpenAI adds to every chunk once usage is on.

    Only called when relay asked for usage itself: the client then sees the
    chunks exactly as they are without ``include_usage``. A quote inside a
    JSON string is escaped, so the pattern cannot match inside content.
    """
    if event.endswith(_NULL_USAGE_TAIL):  # OpenAI's own layout: the last key
        return event[: -len(_NULL_USAGE_TAIL)] + b"}\n\n"
    if b'"usage":null' in event:
        return event.replace(b',"usage":null', b"").replace(b'"usage":null,', b"")
    if b'"usage"' in event:
        # Compatible servers that write JSON with spaces.
        return _SPACED_NULL_USAGE.sub(b"", event)
    return event


_NULL_USAGE_TAIL = b',"usage":null}\n\n'
_SPACED_NULL_USAGE = re.compile(rb',\s*"usage"\s*:\s*null(?=\s*[,}])|"usage"\s*:\s*null\s*,\s*')


class ExchangeObserver(Protocol):
    """Something else that wants the response as it passes: the leader of a
    coalesced miss (:class:`relay.cache.Leader`) publishing to its followers."""

    @property
    def followers(self) -> int: ...
    def start(self, status: int, headers: tuple[tuple[bytes, bytes], ...]) -> None: ...
    def chunk(self, data: bytes) -> None: ...
    def finish(self) -> None: ...
    def fail(self) -> None: ...


class RetryGate(Protocol):
    """Asked once per response head: is this answer to be retried instead of
    relayed? True means nothing of it reaches the client (or the followers)."""

    def wants(self, status: int, headers: list[tuple[bytes, bytes]]) -> bool: ...


class Outcome:
    """How the exchange ended."""

    OK = 0            # response relayed whole
    FAILED = 1        # upstream failed before the response head: answer 502/504
    BROKEN = 2        # upstream failed mid-body: the client stream was cut
    CLIENT_GONE = 3   # the client left first
    RETRY = 4         # a retryable answer (429, 5xx) held back: try again


def response_headers(
    headers: list[tuple[bytes, bytes]],
) -> tuple[tuple[tuple[bytes, bytes], ...], bytes | None]:
    """End-to-end headers of an upstream response, and its content type."""
    drop: frozenset[bytes] | set[bytes] = _NOT_RELAYED
    content_type = None
    for name, value in headers:
        lname = name.lower()
        if lname == b"connection":
            # Headers named in Connection are hop-by-hop too (RFC 9110 7.6.1).
            drop = set(_NOT_RELAYED)
            drop.update(t.strip().lower() for t in value.split(b","))
        elif lname == b"content-type":
            content_type = value.lower()
    kept = tuple((n, v) for n, v in headers if n.lower() not in drop)
    return kept, content_type


class ProxyExchange:
    """Relays one upstream response to the client connection."""

    __slots__ = (
        "_client",
        "_upstream",
        "_release",
        "_extra_headers",
        "_record_limit",
        "_json_limit",
        "_strip_usage",
        "_observer",
        "_head_only",
        "_sent_at",
        "_loop",
        "done",
        "status",
        "headers",
        "content_type",
        "first_byte_at",
        "recorded",
        "recorded_size",
        "stream_usage",
        "splitter",
        "json_body",
        "outcome",
        "error",
        "bytes_sent",
        "_first_event_pending",
        "_retry",
        "discarded",
    )

    def __init__(
        self,
        client: ClientConnection,
        upstream: UpstreamConnection,
        release: Callable[[UpstreamConnection], None],
        extra_headers: list[bytes],
        *,
        record_limit: int,
        json_limit: int,
        strip_usage: bool,
        stream_usage: StreamUsage | None,
        observer: ExchangeObserver | None,
        loop: asyncio.AbstractEventLoop,
        head_only: bool = False,
        retry: RetryGate | None = None,
    ) -> None:
        self._client = client
        self._upstream = upstream
        self._release = release
        self._extra_headers = extra_headers
        self._record_limit = record_limit      # 0: do not record for the cache
        self._json_limit = json_limit          # JSON bodies kept for usage up to this
        self._strip_usage = strip_usage
        self._observer = observer
        self._head_only = head_only
        self._loop = loop
        self._sent_at = loop.time()
        self.done: asyncio.Future[int] = loop.create_future()
        self.status = 0
        self.headers: tuple[tuple[bytes, bytes], ...] = ()
        self.content_type: bytes | None = None
        self.first_byte_at = 0.0
        self.recorded: list[bytes] | None = None
        self.recorded_size = 0
        self.stream_usage = stream_usage
        self.splitter: SSESplitter | None = None
        self.json_body: list[bytes] | None = None
        self.outcome = -1
        self.error: UpstreamError | None = None
        self.bytes_sent = 0
        self._first_event_pending = True
        self._retry = retry
        self.discarded = False  # the response is read and dropped (a retry follows)
        # Until the head arrives, a client that leaves must still close the
        # upstream request.
        client.on_lost = self._client_lost

    @property
    def upstream_latency(self) -> float:
        """Seconds from sending the request to the response head."""
        return self.first_byte_at - self._sent_at

    # ------------------------------------------------------------------ #
    # ResponseSink
    # ------------------------------------------------------------------ #
    def on_head(self, status: int, headers: list[tuple[bytes, bytes]], length: int | None) -> None:
        self.first_byte_at = self._loop.time()
        retry = self._retry
        if retry is not None and retry.wants(status, headers):
            # Nothing of it goes out: read it to the end (the connection can
            # be reused) and let the pipeline try again.
            self.discarded = True
            self.status = status
            self.headers = tuple(headers)
            return
        self.status = status
        kept, content_type = response_headers(headers)
        self.headers = kept
        self.content_type = content_type
        is_stream = content_type is not None and content_type.startswith(_EVENT_STREAM)
        if is_stream and self.stream_usage is not None:
            self.splitter = SSESplitter()
        else:
            self._strip_usage = False
            self.stream_usage = None
            if content_type is not None and _JSON in content_type and 200 <= status < 300:
                self.json_body = []
        if self._strip_usage:
            length = None  # the body will be shorter than the upstream's
        if self._record_limit and 200 <= status < 300 and (
            length is None or length <= self._record_limit
        ):
            self.recorded = []
        client = self._client
        lines = [b"%s: %s\r\n" % pair for pair in kept]
        lines.extend(self._extra_headers)
        bodyless = self._head_only or status in (204, 304)
        if self._head_only:
            # A HEAD response tells the size of what a GET would return.
            lines.extend(
                b"Content-Length: %s\r\n" % v for n, v in headers if n.lower() == b"content-length"
            )
        client.hold()
        client.start_response(status, lines, length, bodyless=bodyless)
        client.flow = self._upstream
        client.on_lost = self._client_lost
        if client.writing_paused:
            self._upstream.pause_reading()
        if self._observer is not None:
            if self.recorded is None:
                # Not cacheable: followers make their own requests.
                self._observer.fail()
                self._observer = None
            else:
                self._observer.start(status, kept)

    def on_body(self, chunk: bytes) -> None:
        if self.discarded:
            return
        splitter = self.splitter
        if splitter is not None:
            events = splitter.feed(chunk)
            usage = self.stream_usage
            assert usage is not None
            if self._strip_usage:
                out = [_without_null_usage(e) for e in events if not usage.on_event(e)]
                if out:
                    self._forward_many(out)
            else:
                for event in events:
                    usage.on_event(event)
                self._forward(chunk)
            if self._first_event_pending and self.bytes_sent:
                # The first event leaves now rather than with the rest of
                # this read: a stream's first token is what users wait for.
                self._first_event_pending = False
                self._client.release()
                self._client.hold()
            return
        self._forward(chunk)

    def on_complete(self) -> None:
        if self.discarded:
            self._release(self._upstream)
            self._settle(Outcome.RETRY)
            return
        splitter = self.splitter
        if splitter is not None:
            rest = splitter.flush()
            if rest:
                if self._strip_usage:
                    self._forward(rest)
                else:
                    assert self.stream_usage is not None
                    self.stream_usage.on_event(rest)
        self._client.finish()
        self._release(self._upstream)
        if self._observer is not None:
            self._observer.finish()
        self._settle(Outcome.OK)

    def on_read_end(self) -> None:
        self._client.release()

    def on_error(self, error: UpstreamError) -> None:
        self.error = error
        if self.discarded:
            self._settle(Outcome.RETRY)
            return
        if self.status and self._observer is not None:
            # Before the head the flight stays open: the pipeline may retry
            # for its followers, and fails it itself when it gives up.
            self._observer.fail()
        if self.status:
            # Part of the body is out: the only honest signal left is to cut
            # the client's stream.
            self._client.abort()
            self._settle(Outcome.BROKEN)
        else:
            self._settle(Outcome.FAILED)

    # ------------------------------------------------------------------ #
    # internals
    # ------------------------------------------------------------------ #
    def _forward(self, chunk: bytes) -> None:
        self.bytes_sent += len(chunk)
        self._client.write(chunk)
        self._keep(chunk)

    def _forward_many(self, chunks: list[bytes]) -> None:
        self._client.write_many(chunks)
        for chunk in chunks:
            self.bytes_sent += len(chunk)
            self._keep(chunk)

    def _keep(self, chunk: bytes) -> None:
        recorded = self.recorded
        if recorded is not None:
            self.recorded_size += len(chunk)
            if self.recorded_size > self._record_limit:
                self.recorded = None  # too large to cache: stop holding it
            else:
                recorded.append(chunk)
        if self._observer is not None:
            # Past the cap the flight itself stops taking followers and keeps
            # only what the ones already relaying still need.
            self._observer.chunk(chunk)
        json_body = self.json_body
        if json_body is not None:
            if self.bytes_sent > self._json_limit:
                self.json_body = None
            else:
                json_body.append(chunk)

    def _client_lost(self) -> None:
        if self._observer is not None and self._observer.followers:
            # Coalesced followers are relaying this response to their own
            # clients: keep reading it for them (and the cache); writes to
            # the gone client are dropped.
            return
        self._upstream.detach()
        if self._observer is not None:
            self._observer.fail()
        self._settle(Outcome.CLIENT_GONE)

    def _settle(self, outcome: int) -> None:
        if self.outcome < 0:
            self.outcome = outcome
            self.done.set_result(outcome)

    def body(self) -> bytes:
        """The recorded body (cache) or the kept JSON body (usage)."""
        parts = self.recorded if self.recorded is not None else self.json_body
        if not parts:
            return b""
        if len(parts) > 1:
            # Asked for more than once after completion (estimate check,
            # usage, cache entry): join once and keep the result.
            parts[:] = [b"".join(parts)]
        return parts[0]
