"""A fake OpenAI / Anthropic upstream: a real HTTP/1.1 server for tests,
benchmarks and demos.

It speaks HTTP/1.1 over asyncio (uvloop or the default loop) with an
``httptools`` parser: keep-alive, pipelining answered in order,
Content-Length and chunked request bodies. Replies are memoized per distinct
request, so a benchmark measures the gateway, not this server.

Endpoints (shapes as the real APIs; content rules in
:mod:`relay.testing.responses`)::

    POST /v1/chat/completions      JSON, or SSE with "stream": true
                                   (stream_options.include_usage honoured)
    POST /v1/completions           JSON or SSE
    POST /v1/responses             Responses API JSON, or its named-event SSE
                                   (usage in response.completed)
    POST /v1/embeddings            float or base64 vectors
    GET  /v1/models[/ID]           OpenAI list, Anthropic list when the
                                   request carries anthropic-version
    POST /v1/messages              Anthropic JSON or SSE (event: lines)
    POST /v1/messages/count_tokens
    anything else                  404 in the OpenAI error shape

Fault injection and shaping, by request header (an unknown ``x-fake-*``
header or a bad value is answered with 400, so typos do not pass silently)::

    x-fake-status: N          answer with status N and an error body in the
                              API's shape (Anthropic shape on /v1/messages)
    x-fake-body: TEXT         answer with exactly TEXT as a JSON body
                              (status 200, or x-fake-status)
    x-fake-delay: S           wait S seconds before the response head
    x-fake-event-delay: S     wait S seconds between SSE events
    x-fake-events: N          N content events in a stream (default 5); the
                              reply grows to N words when N > 5
    x-fake-cached-tokens: N   N cached prompt tokens in the usage
    x-fake-cache-write-tokens: N  N Anthropic cache-write tokens
                              (cache_creation_input_tokens)
    x-fake-reasoning-tokens: N    N reasoning tokens on top of the output
    x-fake-usage-on-last-chunk: 1 chat stream usage on the last chunk that
                              has choices, not a usage-only chunk
    x-fake-no-usage: 1        no usage in JSON bodies nor in streams
    x-fake-reset-after: N     send the head and N body bytes, then reset the
                              connection (RST, SO_LINGER 0)
    x-fake-truncate: 1        Content-Length 1024 larger than the body sent
                              (streams: last event and final chunk left out),
                              then close
    x-fake-silence: 1         read the request, never answer (nor any later
                              request on that connection)
    x-fake-garbage: 1         send bytes that are not HTTP, then close
    x-fake-body-bytes: N      a 200 JSON body of exactly N bytes, written
                              lazily under flow control (never whole in memory)
    x-fake-chunked: 1         with x-fake-body-bytes: chunked framing
    x-fake-close: 1           "connection: close" and close after the response
    x-fake-encoding: CODING   body sent with Content-Encoding CODING (gzip or
                              deflate, one flush per SSE event; br is a label
                              only), whatever the request's Accept-Encoding
                              says, like a CDN that compresses regardless
    x-fake-set-cookie: VALUE  a "set-cookie: VALUE" response header
    x-fake-close-delimited: 1 no Content-Length nor chunks: the body ends
                              when the connection closes (with
                              x-fake-reset-after: ended by a reset instead)
    x-fake-retry-after: S     a Retry-After: S header on the response (with
                              x-fake-status: 429 or 503, as providers send)
    x-fake-drop: 1            read the request, then reset the connection
                              (RST) without any answer
    x-fake-drop-reused: 1     the same, but only for a request that is not
                              the first on its connection (a stale keep-alive)

Boolean headers take 1/true/yes or 0/false/no. Garbage, then silence, win
over everything else; the other headers combine (a delayed 503, a stream
reset after N bytes with gaps between events, ...). Responses to requests
without x-fake-* headers are byte-identical for identical requests (ids
derive from the body), which cache tests can rely on.

Server-wide faults: ``set_faults({"x-fake-status": 503})`` applies those
headers to every request this server reads (a request's own x-fake-*
headers win), so one of several upstreams behind relay can misbehave while
the others do not; ``set_faults(..., count=N)`` to the next N requests
only; ``set_faults({})`` clears them.

Observability: ``requests`` (list of :class:`RecordedRequest`, recorded when
a request has been read, before it is answered, with ``received_at`` on the
``time.monotonic()`` clock), ``connections_opened``, ``active_connections``,
``reset_stats()``.

Run it::

    python -m relay.testing.fake_upstream --host 127.0.0.1 --port 9000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import threading
import time
from typing import Any

from relay.testing._protocol import FLUSH_TIMEOUT, Connection, RecordedRequest, Request
from relay.testing._wire import GARBAGE, Canned, parse_faults
from relay.testing.responses import DEFAULT_EVENTS, ContentOptions, build_reply

__all__ = ["FakeUpstream", "RecordedRequest", "ThreadedFakeUpstream", "main"]

_MEMO_LIMIT = 4096  # distinct requests whose encoded replies are kept
_DEFAULT_CONTENT = ContentOptions()


class FakeUpstream:
    """The fake upstream server on the running event loop.

    ``record=False`` keeps no request log (for long benchmark runs).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, record: bool = True,
                 backlog: int = 1024) -> None:
        self.host = host
        self.port = port
        self.record = record
        self.backlog = backlog
        self.requests: list[RecordedRequest] = []
        self.connections_opened = 0
        self.active_connections = 0
        self._server: asyncio.Server | None = None
        self._connections: set[Connection] = set()
        self._memo: dict[tuple[Any, ...], Canned] = {}
        self._created = 0
        self.faults: dict[bytes, bytes] = {}
        self.faults_left: int | None = None  # requests the faults still apply to (None: all)

    def set_faults(self, faults: dict[str, object], count: int | None = None) -> None:
        """x-fake-* headers applied to every request from now on ({} = none),
        or to the next *count* requests only."""
        self.faults_left = count
        self.faults = {name.lower().encode(): str(value).encode() for name, value in faults.items()}

    def _server_faults(self) -> dict[bytes, bytes] | None:
        faults = self.faults
        if not faults:
            return None
        left = self.faults_left
        if left is not None:
            if left <= 0:
                return None
            self.faults_left = left - 1
        return faults

    @property
    def url(self) -> str:
        host = self.host or "127.0.0.1"
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._created = int(time.time())
        self._server = await loop.create_server(
            lambda: Connection(self), self.host or None, self.port,
            backlog=self.backlog, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for conn in list(self._connections):
            conn.abort()  # silent connections would otherwise hold stop() forever
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(server.wait_closed(), FLUSH_TIMEOUT)

    async def __aenter__(self) -> FakeUpstream:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def reset_stats(self) -> None:
        """Forget recorded requests and the connection count (not live connections)."""
        self.requests.clear()
        self.connections_opened = 0

    # ------------------------------------------------------------ called by connections

    def _connection_made(self, conn: Connection) -> None:
        self.connections_opened += 1
        self.active_connections += 1
        self._connections.add(conn)

    def _connection_lost(self, conn: Connection) -> None:
        if conn in self._connections:
            self._connections.discard(conn)
            self.active_connections -= 1

    def _record(self, request: RecordedRequest) -> None:
        self.requests.append(request)

    def _canned(self, req: Request, content: ContentOptions) -> Canned:
        key: tuple[Any, ...] = (req.method, req.url, req.body, req.anthropic)
        if content is not _DEFAULT_CONTENT:
            key += (content,)  # hashing the options costs; the common case skips it
        canned = self._memo.get(key)
        if canned is None:
            path = req.url.split(b"?", 1)[0].decode("latin-1")
            reply = build_reply(req.method, path, req.body, content,
                                anthropic_client=req.anthropic, created=self._created)
            if len(self._memo) >= _MEMO_LIMIT:
                self._memo.clear()
            canned = self._memo[key] = Canned(reply)
        return canned

    def _answer(self, conn: Connection, req: Request) -> Any:
        """Write the answer now, or return a coroutine that will."""
        close = not req.keep_alive
        if req.fake is None:
            conn.write(self._canned(req, _DEFAULT_CONTENT).wire(close), close)
            return None
        try:
            content, faults = parse_faults(req.fake, DEFAULT_EVENTS)
        except ValueError as exc:
            conn.write(Canned.error(400, str(exc)).wire(close), close)
            return None
        if faults.garbage:
            conn.write_and_close(GARBAGE)
            return None
        if faults.silence:
            conn.go_silent()
            return None
        if faults.drop or (faults.drop_reused and conn.requests_read > 1):
            conn.drop()
            return None
        close = close or faults.close
        canned = None if faults.body_bytes is not None else self._canned(req, content)
        if canned is not None and not faults.needs_task:
            conn.write(canned.wire(close), close)
            return None
        return conn.send_slow(canned, faults, close)


class ThreadedFakeUpstream:
    """A :class:`FakeUpstream` on its own thread and event loop, for sync tests.

    Use as a context manager. Attributes mirror the async server's; read them
    after the requests of interest have completed.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, record: bool = True,
                 use_uvloop: bool = False, timeout: float = 5.0) -> None:
        self.upstream = FakeUpstream(host, port, record=record)
        self._use_uvloop = use_uvloop
        self._timeout = timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> ThreadedFakeUpstream:
        self._thread = threading.Thread(target=self._main, name="fake-upstream", daemon=True)
        self._thread.start()
        if not self._ready.wait(self._timeout):
            raise TimeoutError("fake upstream did not start in time")
        if self._error is not None:
            raise RuntimeError("fake upstream failed to start") from self._error
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(RuntimeError):  # loop already closed
            loop.call_soon_threadsafe(loop.stop)
        thread.join(self._timeout * 2)
        self._thread = None

    def __enter__(self) -> ThreadedFakeUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _main(self) -> None:
        if self._use_uvloop:
            import uvloop
            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        else:
            loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self.upstream.start())
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(asyncio.wait_for(self.upstream.stop(), self._timeout))
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.wait(pending, timeout=self._timeout))
            loop.close()

    @property
    def url(self) -> str:
        return self.upstream.url

    @property
    def port(self) -> int:
        return self.upstream.port

    @property
    def requests(self) -> list[RecordedRequest]:
        return self.upstream.requests

    def set_faults(self, faults: dict[str, object], count: int | None = None) -> None:
        """See :meth:`FakeUpstream.set_faults` (applied on the server's loop)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            self.upstream.set_faults(faults, count)
            return
        done = threading.Event()

        def apply() -> None:
            self.upstream.set_faults(faults, count)
            done.set()

        loop.call_soon_threadsafe(apply)
        done.wait(self._timeout)

    @property
    def connections_opened(self) -> int:
        return self.upstream.connections_opened

    @property
    def active_connections(self) -> int:
        return self.upstream.active_connections

    def reset_stats(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            self.upstream.reset_stats()
            return
        done = threading.Event()

        def reset() -> None:
            self.upstream.reset_stats()
            done.set()

        loop.call_soon_threadsafe(reset)
        done.wait(self._timeout)


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m relay.testing.fake_upstream",
                                     description="Fake OpenAI/Anthropic upstream.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--record", action="store_true",
                        help="keep every request in memory (off: benchmarks run long)")
    args = parser.parse_args(argv)

    async def serve() -> None:
        upstream = FakeUpstream(args.host, args.port, record=args.record)
        await upstream.start()
        print(f"fake upstream listening on {upstream.url}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await upstream.stop()

    if args.loop == "uvloop":
        import uvloop
        uvloop.run(serve())
    else:
        asyncio.run(serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
