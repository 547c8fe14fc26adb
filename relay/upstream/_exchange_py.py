"""One proxied exchange: the upstream response relayed to the client as it arrives.

:class:`ProxyExchange` is the :class:`~relay.upstream.protocol.ResponseSink`
of an upstream connection. Bytes go from the upstream parser's ``on_body``
straight to the client transport; the features that need to see them
(cache recording, usage from the SSE events, followers of a coalesced miss)
look at the same ``bytes`` objects without copying them. A stream goes as
the whole events the SSE splitter cuts; a read that holds exactly one event,
the usual case, is that same object, and only reads holding several events
or a part of one are copied.

Flow control: when the client's write buffer is above its high-water mark
the client connection pauses this upstream connection's reading, so a slow
reader holds back the upstream instead of filling relay's memory.

Content coding: relay asks upstreams for ``identity``; a body that comes
encoded anyway (``gzip``/``deflate``, a CDN that compresses regardless) is
decoded here, incrementally, before anything else looks at it, so usage,
cost, the cache and every client see identity bytes. A coding relay cannot
decode is refused (502) before any byte reaches the client.

A stream is forwarded event by event (whole events only), so when the
upstream breaks off mid-way the client can be sent one clean SSE error
event before its connection is cut: SDKs raise instead of returning a
silently truncated answer.
"""

from __future__ import annotations

import asyncio
import json
import re
import zlib
from collections.abc import Callable
from typing import Protocol

from .. import debug
from ..accounting.usage import ANTHROPIC, StreamUsage, provider_for_path
from ..features.cache import shared_headers
from ..http.protocol import ClientConnection
from ..http.sse import SSESplitter, event_fields, split_events
from .protocol import UpstreamConnection, UpstreamError

__all__ = [
    "ACCEPT_IDENTITY",
    "ExchangeObserver",
    "Outcome",
    "ProxyExchange",
    "stream_cut_event",
]

_DEBUG = debug.ENABLED
_EVENT_STREAM = b"text/event-stream"
_JSON = b"json"

# Sent upstream in place of the client's Accept-Encoding (see module doc).
ACCEPT_IDENTITY = b"Accept-Encoding: identity\r\n"
_GZIP = frozenset({b"gzip", b"x-gzip"})
_DEFLATE = b"deflate"

_CUT_MESSAGE = "The upstream connection broke off before the response was complete"
_OPENAI_CUT_EVENT = b"data: " + json.dumps(
    {"error": {"message": _CUT_MESSAGE, "type": "upstream_error", "code": "upstream_incomplete"}},
    separators=(",", ":"),
).encode() + b"\n\n"
_ANTHROPIC_CUT_EVENT = b"event: error\ndata: " + json.dumps(
    {"type": "error", "error": {"type": "api_error", "message": _CUT_MESSAGE}},
    separators=(",", ":"),
).encode() + b"\n\n"


def stream_cut_event(path: bytes, content_type: bytes | None) -> bytes | None:
    """The SSE error event that ends a stream cut mid-way, None for other bodies.

    In the shape the client's SDK raises on: Anthropic's ``event: error`` on
    the Messages API, OpenAI's ``data: {"error": ...}`` elsewhere.
    """
    if content_type is None or not content_type.startswith(_EVENT_STREAM):
        return None
    return _ANTHROPIC_CUT_EVENT if provider_for_path(path) == ANTHROPIC else _OPENAI_CUT_EVENT


class _Decoder:
    """Incremental gzip / deflate decoding of one response body."""

    __slots__ = ("_z", "_gzip", "_started")

    def __init__(self, gzip: bool) -> None:
        self._gzip = gzip
        self._started = False
        # gzip: header and trailer checked (wbits 16 + 15). deflate: chosen
        # on the first bytes, since servers send both the zlib format the
        # RFC means and bare deflate.
        self._z = zlib.decompressobj(31) if gzip else None

    def feed(self, data: bytes) -> bytes:
        self._started = True
        z = self._z
        if z is None:
            zlib_header = len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
            z = self._z = zlib.decompressobj(15 if zlib_header else -15)
        out = z.decompress(data)
        while self._gzip and z.eof and z.unused_data:
            # Another gzip member follows (concatenated gzip is valid gzip).
            rest = z.unused_data
            z = self._z = zlib.decompressobj(31)
            out += z.decompress(rest)
        return out

    def finish(self) -> bytes | None:
        """The last decoded bytes; None when the coded body ended early."""
        z = self._z
        if z is None or not self._started:
            return b""  # an empty body: nothing was coded
        out = z.flush()
        return out if z.eof else None


def _without_null_usage(event: bytes) -> bytes:
    """Drop the ``"usage":null`` OpenAI adds to every chunk once usage is on.

    Only called when relay asked for usage itself: the client then sees the
    chunks exactly as they are without ``include_usage``. A quote inside a
    JSON string is escaped, so the pattern cannot match inside content.
    """
    if event.endswith(_NULL_USAGE_TAIL):  # OpenAI's own layout: the last key
        return event[: -len(_NULL_USAGE_TAIL)] + _STRIPPED_TAIL
    if b'"usage":null' in event:
        return event.replace(b',"usage":null', b"").replace(b'"usage":null,', b"")
    if b'"usage"' in event:
        # Compatible servers that write JSON with spaces.
        return _SPACED_NULL_USAGE.sub(b"", event)
    return event


def _text_chunk_run(span: bytes) -> int:
    """Length of the leading run of events in *span* (whole events, no
    ``\\r``) that each end in ``,"usage":null}`` and name usage nowhere else:
    OpenAI's text chunks once usage is on. 0 when there is none.

    Before the cut, every line end belongs to a :data:`_NULL_USAGE_TAIL` (two
    per tail) and so does every ``"usage"``: each event there is one line
    ending in one tail."""
    cut = span.rfind(_NULL_USAGE_TAIL)
    if cut < 0:
        return 0
    cut += len(_NULL_USAGE_TAIL)
    tails = span.count(_NULL_USAGE_TAIL, 0, cut)
    if span.count(b"\n", 0, cut) != 2 * tails or span.count(b'"usage"', 0, cut) != tails:
        return 0
    return cut


def _without_usage_object(event: bytes) -> bytes:
    """A chunk carrying both ``choices`` and the usage relay asked for, without
    the usage (rare: OpenAI itself sends usage in a chunk of its own)."""
    _, data = event_fields(event)
    try:
        doc = json.loads(data or b"")
    except (ValueError, UnicodeDecodeError):
        return event
    if not isinstance(doc, dict):
        return event
    doc.pop("usage", None)
    return b"data: " + json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


_NULL_USAGE_TAIL = b',"usage":null}\n\n'
_STRIPPED_TAIL = b"}\n\n"  # what a text chunk ends in without it
_SPACED_NULL_USAGE = re.compile(rb',\s*"usage"\s*:\s*null(?=\s*[,}])|"usage"\s*:\s*null\s*,\s*')


class ExchangeObserver(Protocol):
    """Something else that wants the response as it passes: the leader of a
    coalesced miss (:class:`relay.features.coalescer.Leader`) publishing to its followers."""

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
    """How the exchange ended.

    FAILED means nothing reached the client (``response_started`` is False):
    the caller answers, and may try again elsewhere. Every other outcome
    means the response head was handed to the client.
    """

    OK = 0            # response relayed whole, its end proven
    FAILED = 1        # upstream failed (or sent an undecodable coding) before
                      # the response head: answer 502/504
    BROKEN = 2        # upstream failed mid-body (reset, early close, a coded
                      # body that ended early): the client response was
                      # aborted (a stream after an SSE error event); never
                      # cached, a breaker failure
    CLIENT_GONE = 3   # the client left first
    RETRY = 4         # a retryable answer (429, 5xx) held back: try again


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
        "shared_headers",
        "shared_lines",
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
        "_decoder",
        "_path",
        "_started",
        "_count_usage",
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
        count_usage: bool,
        observer: ExchangeObserver | None,
        loop: asyncio.AbstractEventLoop,
        head_only: bool = False,
        retry: RetryGate | None = None,
        path: bytes = b"",
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
        # The headers another caller may see (the cache's, the followers'):
        # set at the head when the response is recorded.
        self.shared_headers: tuple[tuple[bytes, bytes], ...] = ()
        # Those headers as "Name: value\r\n" lines when they are all the
        # client was sent (no per-caller header left out), else None: the
        # memory cache stores them as they are, rendered once.
        self.shared_lines: bytes | None = None
        self.content_type: bytes | None = None
        self.first_byte_at = 0.0
        self.recorded: list[bytes] | None = None
        self.recorded_size = 0
        # Made at the head, for a stream only: most responses are JSON.
        self.stream_usage: StreamUsage | None = None
        self._count_usage = count_usage
        self.splitter: SSESplitter | None = None
        self.json_body: list[bytes] | None = None
        self.outcome = -1
        self.error: UpstreamError | None = None
        self.bytes_sent = 0
        self._first_event_pending = True
        self._retry = retry
        self.discarded = False  # the response is read and dropped (a retry follows)
        self._decoder: _Decoder | None = None
        self._path = path  # the request's path: which usage and SSE error shapes a stream has
        self._started = False
        # Until the head arrives, a client that leaves must still close the
        # upstream request.
        client.on_lost = self._client_lost
        if _DEBUG:
            # Counted here, not by debug.opens: the compiled twin's __init__
            # is its type's init slot, which a decorator never wraps.
            debug.counters.open("exchanges", self)

    def __repr__(self) -> str:
        return (
            f"<ProxyExchange {self._path.decode('latin-1')} status={self.status} "
            f"outcome={self.outcome} upstream={self._upstream!r}>"
        )

    @property
    def upstream_latency(self) -> float:
        """Seconds from sending the request to the response head."""
        return self.first_byte_at - self._sent_at

    @property
    def response_started(self) -> bool:
        """True once the response head was handed to the client: from then on
        the answer is committed (no retry, no other target can take over)."""
        return self._started

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
        head = self._upstream.head
        kept = head[0]
        content_type = head[2]
        coding = head[3]
        bodyless = self._head_only or status == 204 or status == 304
        if coding is not None and not bodyless:
            if coding in _GZIP:
                self._decoder = _Decoder(gzip=True)
            elif coding == _DEFLATE:
                self._decoder = _Decoder(gzip=False)
            else:
                # br, zstd, stacked codings: relay asked for identity and has
                # no decoder for these, and must not pass on bytes it can
                # neither account for nor be sure the client accepts.
                self._upstream.detach()
                self.error = UpstreamError(
                    f"Upstream answered with Content-Encoding {coding.decode('latin-1')!r}, "
                    "which relay cannot decode (it asks upstreams for identity)"
                )
                # The flight stays open: the pipeline may try again for its
                # followers, and fails it itself when it gives up.
                self._settle(Outcome.FAILED)
                return
            length = None  # the decoded size is known only at the end
        self.status = status
        self.headers = kept
        self.content_type = content_type
        if content_type is not None and content_type.startswith(_EVENT_STREAM):
            self.splitter = SSESplitter()
            if self._count_usage:
                self.stream_usage = StreamUsage("", provider_for_path(self._path))
            else:
                self._strip_usage = False
        else:
            self._strip_usage = False
            if (
                self._json_limit
                and content_type is not None
                and content_type.find(_JSON) >= 0  # find: see Pipeline._forward
                and 200 <= status < 300
            ):
                self.json_body = []
        if self._strip_usage:
            length = None  # the body will be shorter than the upstream's
        if self._record_limit and (200 <= status < 300 or self._retry is not None) and (
            length is None or length <= self._record_limit
        ):
            # With an attempt chain the final answer goes to the coalesced
            # followers whatever its status (only 2xx is cached): they must not
            # each start a chain of their own against a failing upstream.
            self.recorded = []
            # Never handed to another caller (the cache, coalesced followers):
            # this caller's cookies or authentication state.
            if head[6]:  # a per-caller header is among them
                self.shared_headers = shared_headers(kept)
            else:
                self.shared_headers = kept
                self.shared_lines = head[1]
        client = self._client
        lines = [head[1], *self._extra_headers]
        if self._head_only and coding is None:
            # A HEAD response tells the size of what a GET would return.
            lines.extend(
                b"Content-Length: %s\r\n" % v for n, v in headers if n.lower() == b"content-length"
            )
        client.hold()
        client.start_response(status, lines, length, bodyless=bodyless)
        self._started = True
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
                self._observer.start(status, self.shared_headers)

    def on_body(self, chunk: bytes) -> None:
        if self.discarded:
            return
        # What one read brings (an upstream, or a proxy before it, may frame
        # it in many small chunks) leaves in one write at the read's end
        # (on_read_end), not in one write per chunk.
        self._client.hold()
        decoder = self._decoder
        if decoder is not None:
            try:
                chunk = decoder.feed(chunk)
            except zlib.error as exc:
                self._upstream.detach()  # nothing more of this body is wanted
                self.on_error(UpstreamError(f"Upstream's encoded body is corrupt: {exc}"))
                return
            if not chunk:
                return
        if self.splitter is None:
            self._forward(chunk)
        else:
            self._relay_stream(chunk)

    def on_body_decoded(self, chunk: bytes) -> None:
        """Identity bytes (the decoder's last output) on their way on."""
        if self.splitter is None:
            self._forward(chunk)
        else:
            self._relay_stream(chunk)

    def _relay_stream(self, chunk: bytes) -> None:
        splitter = self.splitter
        assert splitter is not None
        usage = self.stream_usage
        if usage is None:
            # Forwarded unchanged: only the event boundaries matter (a
            # partial event waits, so a cut stream ends on a whole one).
            span = splitter.feed_span(chunk)
            if span:
                self._forward(span)
                if self._first_event_pending:
                    self._first_event_out()
            return
        if self._first_event_pending and not splitter.pending:
            # A read of many events (an upstream that sends them at once):
            # the head and the first event leave before the others are even
            # cut, accounted, stripped and kept. The splitter cuts the same
            # events however the bytes are divided.
            end = chunk.find(b"\n\n") + 2
            if 1 < end < len(chunk):
                self._relay_events(splitter.feed(chunk[:end]))
                chunk = chunk[end:]
        if splitter.saw_cr or b"\r" in chunk:
            events = splitter.feed(chunk)
        else:
            # The events of a read as one piece: its leading run of text
            # chunks (every event of a stream but its last two) is accounted,
            # stripped and forwarded in bulk, without cutting it into events.
            span = splitter.feed_span(chunk)
            if not span:
                return
            run = _text_chunk_run(span)
            text = span if run == len(span) else span[:run]
            if run and usage.on_text_chunks(text):
                self._forward(text.replace(_NULL_USAGE_TAIL, _STRIPPED_TAIL) if self._strip_usage else text)
                if self._first_event_pending:
                    self._first_event_out()
                if text is span:
                    return
                span = span[run:]
            events = split_events(span)
        if events:
            self._relay_events(events)

    def _relay_events(self, events: list[bytes]) -> None:
        """Forward complete SSE events (a partial one waits in the splitter)."""
        usage = self.stream_usage
        if self._strip_usage:
            assert usage is not None
            out = []
            for event in events:
                if usage.on_event(event):
                    continue  # the usage-only chunk relay asked for
                if usage.usage_beside_text:
                    usage.usage_beside_text = False
                    event = _without_usage_object(event)
                out.append(_without_null_usage(event))
            if out:
                self._forward_many(out)
        else:
            if usage is not None:
                for event in events:
                    usage.on_event(event)
            if len(events) == 1:
                self._forward(events[0])  # the usual read: one event
            else:
                self._forward_many(events)
        if self._first_event_pending and self.bytes_sent:
            self._first_event_out()

    def _first_event_out(self) -> None:
        # The first event leaves now rather than with the rest of this
        # read: a stream's first token is what users wait for.
        self._first_event_pending = False
        self._client.release()
        self._client.hold()

    def on_complete(self) -> None:
        if self.discarded:
            self._release(self._upstream)
            self._settle(Outcome.RETRY)
            return
        decoder = self._decoder
        if decoder is not None:
            try:
                rest = decoder.finish()
            except zlib.error:
                rest = None
            if rest is None:
                # The framing ended but the coded body did not: cut.
                self._upstream.close()
                self.on_error(UpstreamError("Upstream's encoded body ended before its end"))
                return
            if rest:
                self.on_body_decoded(rest)
        splitter = self.splitter
        if splitter is not None:
            tail = splitter.flush()
            if tail:
                # A last event without its blank line: pass it on as it came
                # (unless it is the usage-only chunk relay asked for itself).
                usage = self.stream_usage
                dropped = usage is not None and usage.on_event(tail) and self._strip_usage
                if not dropped:
                    if self._strip_usage:
                        assert usage is not None
                        if usage.usage_beside_text:
                            tail = _without_usage_object(tail)
                        tail = _without_null_usage(tail)
                    self._forward(tail)
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
        if self._started and self._observer is not None:
            # Before the head the flight stays open: the pipeline may retry
            # for its followers, and fails it itself when it gives up.
            self._observer.fail()
        if self._started:
            # Part of the body is out: the only honest signal left is to cut
            # the client's stream (after an SSE error event, so SDKs raise).
            # A stream gets its error event; chosen only now, off the head's path.
            cut = stream_cut_event(self._path, self.content_type)
            if cut is not None:
                self._client.write(cut)
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
        if self.recorded is not None or self._observer is not None or self.json_body is not None:
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

    @debug.closes("exchanges")
    def _settle(self, outcome: int) -> None:
        if self.outcome < 0:
            self.outcome = outcome
            # Cancelled with its request's task (a drain that ran out of time)
            # before the client connection's loss settles it here.
            if not self.done.cancelled():
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
