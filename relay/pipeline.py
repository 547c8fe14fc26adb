"""The per-request decisions, in order, in one place.

    own endpoint? -> route -> rate limit -> cache (hit / coalesced / miss)
      -> circuit breaker -> usage injection -> upstream exchange
      -> breaker verdict, cache store, usage and cost, metrics, request log

A :class:`Pipeline` is built from one :class:`~relay.config.Config` and is
immutable afterwards: a hot reload builds a new one and swaps the reference,
so requests in flight finish with the settings they started with. The
long-lived things (sockets, caches, breakers, counters) belong to the
:class:`~relay.runtime.Runtime` and are shared between generations.
"""

from __future__ import annotations

import fnmatch
import math
import re
import time

from . import _fast
from .accounting import USAGE_HEADER, Accounting, stored_usage, with_usage
from .cache import CacheEntry, FlightAborted, Follower, Leader, replay_headers
from .config import Config
from .endpoints import own_endpoints
from .exchange import ACCEPT_IDENTITY, Outcome, ProxyExchange, stream_cut_event
from .http import errors
from .http.protocol import ClientConnection
from .http.request import Request
from .runtime import Runtime, Upstream
from .upstream.protocol import UpstreamConnection, UpstreamError
from .usage import Usage, inject_include_usage

__all__ = ["Pipeline"]

_HIT = b"X-Relay-Cache: HIT\r\n"
_MISS = b"X-Relay-Cache: MISS\r\n"
_BYPASS = b"X-Relay-Cache: BYPASS\r\n"
_PROTO_HTTP = b"X-Forwarded-Proto: http\r\n"
_CHAT_SUFFIX = b"/chat/completions"
_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})
# JSON bodies read for usage up to this size; beyond it, usage is estimated.
_JSON_USAGE_LIMIT = 8 * 1024 * 1024



class _Route:
    """One ``routes`` rule, compiled once."""

    __slots__ = ("model", "path", "upstream")

    def __init__(self, model: str | None, path: str | None, upstream: Upstream) -> None:
        self.model = re.compile(fnmatch.translate(model)).match if model else None
        self.path = path.encode() if path else None
        self.upstream = upstream


class Pipeline:
    """Everything one config generation decides per request."""

    def __init__(self, config: Config, runtime: Runtime) -> None:
        self.config = config
        self.runtime = runtime
        proxy = config.proxy
        self._default = runtime.upstream(proxy.target, config, label="default")
        self._routes = tuple(
            _Route(r.model, r.path, runtime.upstream(r.target, config))
            for r in config.routes
        )
        self._needs_model = any(r.model for r in self._routes)

        self._limiter = runtime.limiter(config) if config.ratelimit.enabled else None
        self._limit_kind = config.ratelimit.key
        self._limit_label = config.ratelimit.key

        cache = config.cache
        self._cache = runtime.cache(config) if cache.enabled else None
        self._cache_global = cache.scope == "global"
        self._cache_max = cache.max_body_bytes

        self._breakers = config.circuit_breaker.enabled
        self._accounting = accounting = Accounting(config, runtime)
        self._metrics = accounting.metrics
        self._usage_on = accounting.enabled
        self._own = own_endpoints(self)

    # ------------------------------------------------------------------ #
    # entry point
    # ------------------------------------------------------------------ #
    async def handle(self, request: Request, client: ClientConnection) -> None:
        own = self._own.get(request.path)
        if own is not None:
            await own(request, client)
            return
        upstream = self._route(request)
        extra: list[bytes] = []

        limiter = self._limiter
        if limiter is not None:
            decision = await limiter.acquire(self._limit_key(request))
            extra.append(b"X-RateLimit-Limit: %d\r\n" % decision.limit)
            extra.append(b"X-RateLimit-Remaining: %d\r\n" % decision.remaining)
            if not decision.allowed:
                self._metrics.ratelimit_reject(self._limit_label)
                retry = max(1, math.ceil(decision.retry_after))
                extra.append(b"Retry-After: %d\r\n" % retry)
                extra.append(_BYPASS)  # every answer on a proxied path says it
                self._reject(
                    request, client, upstream,
                    errors.GatewayError(
                        429,
                        "Rate limit exceeded: retry after the time in Retry-After",
                        "rate_limit_error",
                        "rate_limit_exceeded",
                    ),
                    extra,
                )
                return

        cache = self._cache
        key = None
        store = False
        if cache is not None and request.method == b"POST":
            control = request.cache_control
            no_store = control is not None and b"no-store" in control
            no_cache = no_store or (control is not None and b"no-cache" in control)
            store = not no_store
            key = _fast.cache_key(
                request.method,
                request.target,
                request.body,
                # The raw credential only feeds the SHA-256 of the key and is
                # never stored: a short hash here could be collided with.
                b"" if self._cache_global else (request.credential or b""),
                request.varying_key(),
            )
            if not no_cache:
                entry = await cache.get(key)
                if entry is not None:
                    self._serve_hit(request, client, upstream, entry, extra)
                    return
                if store:
                    ticket = self.runtime.coalescer.join(key)
                    if isinstance(ticket, Follower):
                        try:
                            if await self._follow(request, client, upstream, ticket, extra):
                                return
                        finally:
                            ticket.close()
                        # The leader's response was not shareable: go upstream
                        # on our own.
                    else:
                        extra.append(_MISS)
                        self._metrics.cache_misses.inc()
                        try:
                            await self._forward(request, client, upstream, extra, key, ticket)
                        finally:
                            ticket.close()
                        return
                extra.append(_MISS)
                self._metrics.cache_misses.inc()
            else:
                extra.append(_BYPASS)
        else:
            extra.append(_BYPASS)
        await self._forward(request, client, upstream, extra, key if store else None, None)

    # ------------------------------------------------------------------ #
    # decisions
    # ------------------------------------------------------------------ #
    def _route(self, request: Request) -> Upstream:
        if self._routes:
            model = request.model() if self._needs_model else None
            for route in self._routes:
                if route.path is not None and not request.path.startswith(route.path):
                    continue
                if route.model is not None and (model is None or route.model(model) is None):
                    continue
                return route.upstream
        return self._default

    def _limit_key(self, request: Request) -> bytes:
        kind = self._limit_kind
        if kind == "global":
            return b"global"
        if kind == "api_key":
            credential = request.credential
            if credential:
                return b"k:" + _fast.credential_hash(credential)
        # "ip", or an anonymous caller under "api_key": the socket's peer,
        # never X-Forwarded-For, which any client can write.
        return b"ip:" + request.client_ip.encode()

    # ------------------------------------------------------------------ #
    # answers that do not go upstream
    # ------------------------------------------------------------------ #
    def _reject(
        self,
        request: Request,
        client: ClientConnection,
        upstream: Upstream,
        error: errors.GatewayError,
        extra: list[bytes],
    ) -> None:
        client.send_error(error, extra)
        self._accounting.done(request, upstream, error.status, _cache_status(extra))

    def _serve_hit(
        self,
        request: Request,
        client: ClientConnection,
        upstream: Upstream,
        entry: CacheEntry,
        extra: list[bytes],
    ) -> None:
        self._metrics.cache_hits.inc()
        lines = [b"%s: %s\r\n" % pair for pair in entry.headers if pair[0] != USAGE_HEADER]
        lines.extend(extra)
        lines.append(_HIT)
        if entry.streamed:
            client.start_response(entry.status, lines, None)
            client.write(entry.body)
            client.finish()
        else:
            client.respond(entry.status, lines, entry.body)
        self._accounting.done(request, upstream, entry.status, "HIT", stored_usage(entry), saved=True)

    async def _follow(
        self,
        request: Request,
        client: ClientConnection,
        upstream: Upstream,
        follower: Follower,
        extra: list[bytes],
    ) -> bool:
        """Relay a coalesced leader's response; False if it was not shareable."""
        head = await follower.head()
        if head is None:
            return False
        status, headers = head
        self._metrics.cache_hits.inc()
        lines = [b"%s: %s\r\n" % pair for pair in headers]
        lines.extend(extra)
        lines.append(_HIT)
        client.start_response(status, lines, None)
        # The leader's own bytes objects, kept up to the cache's size bound (a
        # follower already relaying goes on past it; its usage is then lost).
        chunks: list[bytes] | None = []
        kept = 0
        usage = None
        try:
            async for chunk in follower:
                client.write(chunk)
                if chunks is not None:
                    kept += len(chunk)
                    if kept > self._cache_max:
                        chunks = None
                    else:
                        chunks.append(chunk)
                if client.writing_paused:
                    await client.drain()
                if client.is_lost:
                    break
        except FlightAborted:
            # Cut for the leader too: this caller sees the same abort (and,
            # for a stream, the same closing error event).
            cut = stream_cut_event(request.path, _content_type(headers))
            if cut is not None:
                client.write(cut)
            client.abort()
        else:
            client.finish()
            if chunks and not client.is_lost:
                if self._usage_on:
                    usage = await self._accounting.shared_usage(request, status, headers, chunks)
        # Served without going upstream: a hit, counted as saved cost.
        self._accounting.done(request, upstream, status, "HIT", usage, saved=True)
        return True

    # ------------------------------------------------------------------ #
    # upstream
    # ------------------------------------------------------------------ #
    async def _forward(
        self,
        request: Request,
        client: ClientConnection,
        upstream: Upstream,
        extra: list[bytes],
        cache_key: bytes | None,
        leader: Leader | None,
    ) -> None:
        runtime = self.runtime
        breaker = upstream.breaker if self._breakers else None
        if breaker is not None and not breaker.allow(time.monotonic()):
            retry = max(1, math.ceil(breaker.retry_after(time.monotonic())))
            if leader is not None:
                leader.fail()
            self._reject(
                request, client, upstream,
                errors.GatewayError(
                    503,
                    f"Upstream {upstream.origin} is unavailable (circuit breaker open)",
                    "upstream_unavailable",
                    "circuit_breaker_open",
                    headers=((b"Retry-After", b"%d" % retry),),
                ),
                extra,
            )
            return
        if breaker is not None and breaker.state:
            # allow() just turned an open breaker half-open for this probe:
            # show it on the gauge (only a probe passes a non-closed breaker).
            runtime.breaker_changed(upstream)

        # Ask OpenAI for streamed usage when the client did not; the
        # usage-only chunk is removed again before the client sees it.
        strip_usage = False
        body = request.body
        if (
            self._usage_on
            and request.method == b"POST"
            and request.path.endswith(_CHAT_SUFFIX)
            and b'"stream"' in body
        ):
            injected = inject_include_usage(body, facts=request.facts())
            if injected is not None:
                body = injected
                strip_usage = True

        head = b"".join(
            (
                request.method, b" ", request.target, b" HTTP/1.1\r\nHost: ",
                upstream.host_header, b"\r\n",
                request.forward_headers,
                b"X-Forwarded-For: ",
                request.forwarded_for + b", " if request.forwarded_for else b"",
                request.client_ip.encode(), b"\r\n",
                _PROTO_HTTP,
                ACCEPT_IDENTITY,
                b"Content-Length: %d\r\n\r\n" % len(body)
                if body or request.method in _BODY_METHODS
                else b"\r\n",
            )
        )
        parts = [head, body] if body else [head]
        pool = upstream.pool
        head_only = request.method == b"HEAD"
        record_limit = self._cache_max if cache_key is not None else 0

        exchange: ProxyExchange | None = None
        for attempt in range(2):
            conn = pool.take_idle()
            reused = conn is not None
            if conn is None:
                try:
                    conn = await pool.connect()
                except UpstreamError as exc:
                    self._upstream_failed(request, client, upstream, exc, extra, breaker, leader)
                    return
            if client.is_lost:
                # Gone behind an await above (limiter, cache, a failed
                # leader, the connect): never sent, never billed.
                self._not_sent(request, upstream, conn, breaker, leader)
                return
            exchange = ProxyExchange(
                client,
                conn,
                pool.release,
                extra,
                record_limit=record_limit,
                json_limit=_JSON_USAGE_LIMIT if self._usage_on else 0,
                strip_usage=strip_usage,
                stream_usage=self._accounting.stream_usage(request),
                observer=leader,
                loop=runtime.loop,
                head_only=head_only,
                path=request.path,
            )
            conn.send(parts, exchange, head_only=head_only)
            outcome = await exchange.done
            if (
                outcome == Outcome.FAILED
                and reused
                and attempt == 0
                and not conn.received_any
                and exchange.error is not None
                and not exchange.error.timeout
            ):
                # A keep-alive socket the upstream closed as we wrote to it:
                # the request never reached it, so one retry is safe.
                continue
            break
        assert exchange is not None
        if breaker is not None and exchange.outcome != Outcome.FAILED:
            # Judged now: a first-time tokenizer load below can take seconds,
            # and neither the failure count nor a half-open probe may wait.
            self._judge(upstream, breaker, exchange)
        estimator = runtime.estimator
        if not estimator.loaded and self._accounting.needs_estimate(request, exchange):
            # Tokenizer data (~40 MB) is loaded on first need, in a thread;
            # the client already has its response.
            await estimator.ensure_loaded(self.config.models)
        # Counted before _finish, off the loop when a large estimate is needed.
        usage = None
        if exchange.outcome != Outcome.FAILED:
            usage = await self._accounting.usage_async(request, exchange, body)
        self._finish(
            request, client, upstream, exchange, extra, breaker, leader, cache_key, body, usage
        )

    def _not_sent(
        self,
        request: Request,
        upstream: Upstream,
        conn: UpstreamConnection,
        breaker: _fast.CircuitBreaker | None,
        leader: Leader | None,
    ) -> None:
        """The client left before its request went upstream: 499, no usage."""
        upstream.pool.release_unused(conn)
        if breaker is not None:
            breaker.release_probe()
        if leader is not None:
            leader.fail()  # its followers go upstream on their own
        self._accounting.done(request, upstream, 499)

    def _upstream_failed(
        self,
        request: Request,
        client: ClientConnection,
        upstream: Upstream,
        error: UpstreamError,
        extra: list[bytes],
        breaker: _fast.CircuitBreaker | None,
        leader: Leader | None,
    ) -> None:
        if breaker is not None:
            breaker.record_failure(time.monotonic())
            self.runtime.breaker_changed(upstream)
        if leader is not None:
            leader.fail()
        if client.is_lost:
            self._accounting.done(request, upstream, 499)
            return
        gateway_error = (
            errors.gateway_timeout(error.reason) if error.timeout else errors.bad_gateway(error.reason)
        )
        self._reject(request, client, upstream, gateway_error, extra)

    def _judge(
        self, upstream: Upstream, breaker: _fast.CircuitBreaker, exchange: ProxyExchange
    ) -> None:
        """The breaker's verdict on an exchange that got past its connect."""
        status = exchange.status
        if exchange.outcome == Outcome.BROKEN or status >= 500:
            breaker.record_failure(time.monotonic())
        elif status:
            breaker.record_success()
        else:
            breaker.release_probe()  # the client left before the head: no verdict
        self.runtime.breaker_changed(upstream)

    def _finish(
        self,
        request: Request,
        client: ClientConnection,
        upstream: Upstream,
        exchange: ProxyExchange,
        extra: list[bytes],
        breaker: _fast.CircuitBreaker | None,
        leader: Leader | None,
        cache_key: bytes | None,
        body: bytes,
        usage: Usage | None,
    ) -> None:
        outcome = exchange.outcome
        runtime = self.runtime
        if outcome == Outcome.FAILED:
            assert exchange.error is not None
            self._upstream_failed(request, client, upstream, exchange.error, extra, breaker, leader)
            return
        status = exchange.status
        if status:
            self._metrics.observe_upstream_latency(upstream.label, exchange.upstream_latency)

        if (
            cache_key is not None
            and outcome == Outcome.OK
            and exchange.recorded is not None
            and 200 <= status < 300
        ):
            entry = CacheEntry(
                status,
                with_usage(replay_headers(exchange.headers), usage),
                exchange.body(),
                exchange.splitter is not None,
                time.time(),
            )
            cache = self._cache
            assert cache is not None
            runtime.spawn(cache.set(cache_key, entry))
        # 499 (nginx's "client closed request") when the client left before
        # the response was complete; 502 when the upstream broke it off (the
        # client saw the head, then an aborted body).
        if outcome == Outcome.CLIENT_GONE:
            status = 499
        elif outcome == Outcome.BROKEN:
            status = 502
        self._accounting.done(request, upstream, status, _cache_status(extra), usage)

    def upstreams(self) -> list[Upstream]:
        return [self._default, *(r.upstream for r in self._routes)]


def _content_type(headers: tuple[tuple[bytes, bytes], ...]) -> bytes | None:
    for name, value in headers:
        if name.lower() == b"content-type":
            return value.lower()
    return None


def _cache_status(extra: list[bytes]) -> str:
    """HIT, MISS or BYPASS, as the response said (for the request log)."""
    for line in extra:
        if line is _MISS:
            return "MISS"
        if line is _HIT:
            return "HIT"
    return "BYPASS"
