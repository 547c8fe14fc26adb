"""The per-request decisions, in order, in one place.

    own endpoint? -> route -> rate limit -> cache (hit / coalesced / miss)
      -> circuit breaker -> usage injection -> upstream exchange
      -> breaker verdict, cache store, usage and cost, metrics, request log

:meth:`Pipeline.answer` takes these steps in the protocol callback as far
as they need no await (key cache and allowance, memory limiter, memory
cache): a hit or a refusal is answered there, without a task; a request
that has to wait goes on as a coroutine from the step where it stopped.

A :class:`Pipeline` is built from one :class:`~relay.config.Config` and is
immutable afterwards: a hot reload builds a new one and swaps the reference,
so requests in flight finish with the settings they started with. The
long-lived things (sockets, caches, breakers, counters) are held by the
:class:`~relay.runtime.Runtime` and shared between generations; a pipeline
takes the ones it needs when it is built, and per request asks the runtime
for nothing.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import math
import re
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from . import _fast
from .accounting.recorder import ESTIMATE, Accounting, stored_usage, usage_value, with_usage
from .accounting.usage import Usage, inject_include_usage
from .config import Config
from .features.cache import CacheEntry, MemoryCache, RedisCache
from .features.coalescer import FlightAborted, Follower, Leader
from .features.limits import MemoryLimiter, RedisLimiter
from .http import errors
from .http.protocol import ClientConnection
from .http.request import Request
from .keys import ADMIN_PREFIX
from .ops.endpoints import own_endpoints
from .ops.metrics import NO_METERS as _NO_METERS
from .runtime import Runtime
from .upstream.balance import Balancer
from .upstream.exchange import ACCEPT_IDENTITY, Outcome, ProxyExchange, stream_cut_event
from .upstream.protocol import UpstreamConnection, UpstreamError
from .upstream.target import Upstream

if TYPE_CHECKING:  # imported where used: a worker without keys never loads them
    from .keys.admin import AdminAPI
    from .keys.admission import Admission, KeyTicket

__all__ = ["Pipeline"]

_HIT = b"X-Relay-Cache: HIT\r\n"
_MISS = b"X-Relay-Cache: MISS\r\n"
_BYPASS = b"X-Relay-Cache: BYPASS\r\n"
_PROTO_HTTP = b"X-Forwarded-Proto: http\r\n"
_CHAT_SUFFIX = b"/chat/completions"
_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})
# Cache keys remembered by what they hash, for bodies up to this size, and
# how many (then the memo starts over): at most 4 MiB of request bodies.
_KEY_MEMO_BODY = 4096
_KEY_MEMO_MAX = 1024
# JSON bodies read for usage up to this size; beyond it, usage is estimated.
_JSON_USAGE_LIMIT = 8 * 1024 * 1024
# Bound of the per-credential memos (callers are few; clients choose them).
_MEMO_MAX = 4096



class _Route:
    """One ``routes`` rule (or ``proxy.target``), compiled once."""

    __slots__ = ("model", "path", "balancer", "upstream", "fallbacks")

    def __init__(
        self,
        model: str | None,
        path: str | None,
        balancer: Balancer,
        fallbacks: tuple[str, ...] = (),
    ) -> None:
        self.model = re.compile(fnmatch.translate(model)).match if model else None
        self.path = path.encode() if path else None
        self.balancer = balancer
        # Who a request is counted against before a target answers it.
        self.upstream = balancer.targets[0]
        self.fallbacks = fallbacks


class _Chain:
    """The attempts of one request: which targets failed, how many tries are
    left, which fallback model is next. Also the exchange's retry gate: it
    decides, at a response head, whether a retryable answer is held back."""

    __slots__ = (
        "pipeline", "route", "left", "excluded", "index", "fallback", "fallbacks", "model",
    )

    def __init__(self, pipeline: Pipeline, route: _Route) -> None:
        self.pipeline = pipeline
        self.route = route
        self.left = pipeline._attempts
        self.excluded = 0  # bit mask of target indexes tried (or refused) for this model
        self.index = -1  # the target of the current attempt
        self.fallback = 0  # next entry of the original route's fallback_models
        self.fallbacks = route.fallbacks
        self.model: str | None = None  # the fallback model in use

    @property
    def target(self) -> Upstream:
        return self.route.balancer.targets[self.index]

    def wants(self, status: int, headers: list[tuple[bytes, bytes]]) -> bool:
        pipeline = self.pipeline
        if status not in pipeline._retry_statuses:
            return False
        now = time.monotonic()
        if status == 429 or status == 503:
            wait = _retry_after(headers)
            if wait > 0.0:
                # Capped: a target must not be shunned for ever by one header.
                state = self.target.state
                state.not_before = max(state.not_before, now + min(wait, _MAX_COOL_DOWN))
        return self.can_continue(now)

    def can_continue(self, now: float) -> bool:
        """Whether another attempt can follow the current one's failure."""
        if self.left > 0 and self.pick_next(now, dry=True)[0] >= 0:
            return True
        return self.fallback < len(self.fallbacks)

    def pick_next(self, now: float, refused: int = 0, *, dry: bool = False) -> tuple[int, float]:
        """(target index, seconds to wait first) for a retry; (-1, 0) if none.

        *refused*: targets whose breaker turned this request away. With
        *dry* nothing changes (the gate asks whether a retry could follow).
        """
        if self.excluded == -1:
            return -1, 0.0  # this model is done: the next fallback's turn
        balancer = self.route.balancer
        excluded = self.excluded | refused
        if self.index >= 0:
            excluded |= 1 << self.index
        index = balancer.pick(now, excluded)
        if index >= 0:
            return index, 0.0
        limit = self.pipeline._max_retry_after
        index, wait = balancer.earliest_cooled(now, excluded)
        if index < 0 or wait > limit:
            # Every target was tried: go round again (with one target a
            # retry goes to the same one), Retry-After still honoured.
            index, wait = balancer.earliest_cooled(now, refused)
        if index >= 0 and wait <= limit:
            return index, wait
        return -1, 0.0


# The longest a 429's Retry-After keeps a target out of retries (seconds).
_MAX_COOL_DOWN = 3600.0


def _retry_after(headers: list[tuple[bytes, bytes]]) -> float:
    """Seconds a Retry-After header asks for (delta-seconds or HTTP-date), 0 if none."""
    for name, value in headers:
        if len(name) == 11 and name.lower() == b"retry-after":
            text = value.strip()
            try:
                return max(0.0, float(text))
            except ValueError:
                pass
            from email.utils import parsedate_to_datetime  # rare: an HTTP-date Retry-After

            try:
                when = parsedate_to_datetime(text.decode("latin-1"))
            except (TypeError, ValueError, IndexError):
                return 0.0
            return max(0.0, when.timestamp() - time.time())
    return 0.0


class Pipeline:
    """Everything one config generation decides per request."""

    def __init__(self, config: Config, runtime: Runtime) -> None:
        self.config = config
        self._loop = runtime.loop
        self._estimator = runtime.estimator
        self._coalescer = runtime.coalescer
        self._spawn = runtime.spawn
        self._breaker_changed = runtime.breakers.changed
        proxy = config.proxy
        self._breakers = breakers = config.circuit_breaker.enabled
        targets, cb = runtime.targets, config.circuit_breaker
        default = targets.target(proxy.target, proxy, cb, api_key=proxy.api_key, auth=proxy.auth)
        self._default = _Route(None, None, Balancer((default,), "weighted", breakers=breakers))
        self._routes = tuple(
            _Route(
                r.model,
                r.path,
                Balancer(
                    tuple(
                        targets.target(
                            t.url, proxy, cb, name=t.name, api_key=t.api_key, auth=t.auth,
                            weight=t.weight,
                        )
                        for t in r.targets
                    ),
                    r.strategy,
                    breakers=breakers,
                ),
                r.fallback_models,
            )
            for r in config.routes
        )
        self._needs_model = any(r.model for r in self._routes)
        metrics = runtime.metrics if config.metrics.enabled else None
        for route in (self._default, *self._routes):
            for target in route.balancer.targets:
                # Resolved once here: a request's updates need no label lookup.
                target.meters = metrics.target_meters(target.label) if metrics else _NO_METERS
        retries = config.retries
        self._attempts = retries.attempts
        self._retry_statuses = frozenset(int(c) for c in retries.on if c.isdigit())
        self._retry_connect = "connect" in retries.on
        self._retry_timeout = "timeout" in retries.on
        self._retry_reset = "reset" in retries.on
        self._max_retry_after = retries.max_retry_after
        self._first_byte_timeout = proxy.first_byte_timeout
        # Only routes with somewhere else to go need the attempt bookkeeping.
        self._chained = retries.attempts > 0 or any(r.fallbacks for r in self._routes)

        self._limiter = limiter = runtime.limiter(config) if config.ratelimit.enabled else None
        self._limit_kind = config.ratelimit.key  # also the label of its rejections
        # The memory limiter answers at once: no coroutine per request.
        self._acquire_at: Callable[[bytes, float], tuple[bool, int, float]] | None = None
        self._limit_clock: Callable[[], float] = time.monotonic
        if isinstance(limiter, MemoryLimiter):
            self._acquire_at, self._limit_clock = limiter.request_path()
        # X-RateLimit-Limit is the burst, the same for every answer: rendered
        # once, with the Remaining line's name after it.
        self._limit_lines = (
            b"X-RateLimit-Limit: %d\r\nX-RateLimit-Remaining: %%d\r\n" % limiter.limit
            if limiter is not None else b""
        )
        # Bucket key per credential (its hash), bounded: most traffic comes
        # from a few keys, and hashing per request showed in profiles.
        self._limit_keys: dict[bytes, bytes] = {}
        self._limit_by_credential = config.ratelimit.key == "api_key"

        cache = config.cache
        self._cache = runtime.cache(config) if cache.enabled else None
        # The memory cache reads and stores at once: no coroutine, no task.
        self._cache_now = self._cache if isinstance(self._cache, MemoryCache) else None
        self._keys: dict[tuple[bytes, bytes, bytes, bytes], bytes] = {}
        self._cache_global = cache.scope == "global"
        self._cache_max = cache.max_body_bytes

        self._accounting = accounting = Accounting(
            config,
            metrics=runtime.metrics,
            prices=runtime.prices(config),
            labels=runtime.labels,
            estimator=runtime.estimator,
            book=runtime.usage_book,
            request_log=runtime.request_log,
            key_hashes=runtime.key_hashes,
            loop=runtime.loop,
        )
        self._metrics = accounting.metrics
        self._usage_on = accounting.enabled
        self._own = own_endpoints(
            targets=tuple(self.upstreams()),
            breakers=breakers,
            draining=lambda: runtime.draining,
            metrics=runtime.metrics,
            metrics_enabled=config.metrics.enabled,
            usage_snapshot=runtime.usage_book.snapshot,
            loop=runtime.loop,
        )
        self._admission = _admission(config, runtime, accounting)
        keys = runtime.keys()
        self._admin_key = config.keys.admin_key
        self._admin_manager = keys[1] if keys is not None else None
        self._admin: AdminAPI | None = None  # built by the first request under its prefix

    # ------------------------------------------------------------------ #
    # entry point
    # ------------------------------------------------------------------ #
    def answer(
        self, request: Request, client: ClientConnection
    ) -> Coroutine[Any, Any, None] | None:
        """Answer *request* now if nothing on its way needs an await (a cache
        hit, a refusal); else the coroutine that goes on from where this
        stopped (nothing decided here is decided again, the limiter is
        charged once)."""
        own = self._own.get(request.path)
        if own is not None:
            return own(request, client)
        if request.path.startswith(ADMIN_PREFIX):
            return self._admin_api().handle(request, client)
        admission = self._admission
        if admission is None:
            return self._proxy_now(request, client)
        # Virtual keys: admitted (and reserved) before rate limit and cache;
        # from the process's key cache and allowance when they can say.
        ticket = admission.admit_now(request)
        if ticket is None:
            return self._admit(admission, request, client)
        return self._admitted(request, client, ticket)

    async def handle(self, request: Request, client: ClientConnection) -> None:
        """:meth:`answer`, awaited to the end."""
        rest = self.answer(request, client)
        if rest is not None:
            try:
                await rest
            finally:
                finished = request.on_finished
                if finished is not None:
                    finished()

    def _admin_api(self) -> AdminAPI:
        """The admin API of this generation, imported and built once, on the
        first request under its prefix: most workers never see one, and its
        modules (the key model, service, manager) hold memory for life."""
        admin = self._admin
        if admin is None:
            from .keys.admin import AdminAPI

            admin = self._admin = AdminAPI(self._admin_key, self._admin_manager)
        return admin

    async def _admit(self, admission: Admission, request: Request, client: ClientConnection) -> None:
        rest = self._admitted(request, client, await admission.admit(request))
        if rest is not None:
            await rest

    def _admitted(
        self, request: Request, client: ClientConnection, ticket: KeyTicket | errors.GatewayError
    ) -> Coroutine[Any, Any, None] | None:
        if isinstance(ticket, errors.GatewayError):
            self._reject(request, client, self._route(request).upstream, ticket, [_BYPASS])
            return None
        request.relay_key = ticket
        try:
            rest = self._proxy_now(request, client)
        except BaseException:
            ticket.release()
            raise
        if rest is None:
            ticket.release()  # unless settled: nothing was sent upstream
            return None
        # The client connection calls it once *rest* ended, however it ended
        # (handle does the same): no wrapper coroutine per keyed request.
        request.on_finished = ticket.release
        return rest

    def _proxy_now(
        self, request: Request, client: ClientConnection
    ) -> Coroutine[Any, Any, None] | None:
        route = self._route(request)
        extra: list[bytes] = []
        limiter = self._limiter
        if limiter is not None:
            # A credential's bucket key is remembered (see _limit_key).
            credential = request.credential
            bucket = (
                self._limit_keys.get(credential) if credential and self._limit_by_credential else None
            )
            if bucket is None:
                bucket = self._limit_key(request)
            acquire_at = self._acquire_at
            if acquire_at is None:
                return self._limit(limiter, bucket, request, client, route, extra)
            allowed, remaining, retry_after = acquire_at(bucket, self._limit_clock())
            extra.append(self._limit_lines % remaining)
            if not allowed:
                self._refuse_limited(request, client, route, extra, retry_after)
                return None
        return self._lookup_now(request, client, route, extra)

    async def _limit(
        self,
        limiter: RedisLimiter,
        bucket: bytes,
        request: Request,
        client: ClientConnection,
        route: _Route,
        extra: list[bytes],
    ) -> None:
        """The shared (Redis) limiter, then on as :meth:`_proxy_now`."""
        decision = await limiter.acquire(bucket)
        extra.append(self._limit_lines % decision.remaining)
        if not decision.allowed:
            self._refuse_limited(request, client, route, extra, decision.retry_after)
            return
        rest = self._lookup_now(request, client, route, extra)
        if rest is not None:
            await rest

    def _refuse_limited(
        self,
        request: Request,
        client: ClientConnection,
        route: _Route,
        extra: list[bytes],
        retry_after: float,
    ) -> None:
        """Answer 429 (the rate-limit headers are in *extra* already)."""
        self._metrics.ratelimit_reject(self._limit_kind)
        retry = max(1, math.ceil(retry_after))
        extra.append(b"Retry-After: %d\r\n" % retry)
        extra.append(_BYPASS)  # every answer on a proxied path says it
        self._reject(
            request, client, route.upstream,
            errors.GatewayError(
                429,
                "Rate limit exceeded: retry after the time in Retry-After",
                "rate_limit_error",
                "rate_limit_exceeded",
            ),
            extra,
        )

    def _lookup_now(
        self, request: Request, client: ClientConnection, route: _Route, extra: list[bytes]
    ) -> Coroutine[Any, Any, None] | None:
        """The cache: a hit from memory is answered here."""
        cache = self._cache
        if cache is None or request.method != b"POST":
            extra.append(_BYPASS)
            return self._forward(request, client, route, extra, None, None)
        control = request.cache_control
        no_store = control is not None and b"no-store" in control
        no_cache = no_store or (control is not None and b"no-cache" in control)
        body = request.body
        # The raw credential only feeds the SHA-256 of the key and is never
        # stored with an entry: a short hash here could be collided with.
        # A virtual key's caller is its id (stable across rotations).
        scope = b"" if self._cache_global else (
            request.relay_key.identity if request.relay_key is not None
            else request.credential or b""
        )
        varying = request.varying_key()
        # Repeated requests (what a cache serves) skip the canonical JSON and
        # the SHA-256: the key of a body that was a hit is remembered by what
        # it hashes. A miss adds nothing (most misses are never asked again,
        # and the memo would hold their bodies).
        hashed = (request.target, body, scope, varying)
        key = self._keys.get(hashed)
        # What a hit remembers its key by: None when remembered already or
        # never to be (a large body).
        parts: tuple[bytes, bytes, bytes, bytes] | None = None
        if key is None:
            key = _fast.cache_key(b"POST", *hashed)
            if len(body) <= _KEY_MEMO_BODY:
                parts = hashed
        if no_cache:
            extra.append(_BYPASS)
            return self._forward(request, client, route, extra, None if no_store else key, None)
        memory = self._cache_now
        if memory is None:
            return self._lookup(cache, request, client, route, extra, key, parts)
        entry = memory.get_nowait(key)
        if entry is not None:
            if parts is not None:
                self._remember_key(parts, key)
            self._serve_hit(request, client, route.upstream, entry, extra)
            return None
        return self._miss(request, client, route, extra, key)

    def _remember_key(self, parts: tuple[bytes, bytes, bytes, bytes], key: bytes) -> None:
        """Keep the cache key of a request that was a hit (see _lookup_now)."""
        memo = self._keys
        if len(memo) >= _KEY_MEMO_MAX:
            memo.clear()
        memo[parts] = key

    async def _lookup(
        self,
        cache: RedisCache,
        request: Request,
        client: ClientConnection,
        route: _Route,
        extra: list[bytes],
        key: bytes,
        parts: tuple[bytes, bytes, bytes, bytes] | None,
    ) -> None:
        """The shared (Redis) cache, then on as :meth:`_lookup_now`."""
        entry = await cache.get(key)
        if entry is not None:
            if parts is not None:
                self._remember_key(parts, key)
            self._serve_hit(request, client, route.upstream, entry, extra)
            return
        await self._miss(request, client, route, extra, key)

    async def _miss(
        self,
        request: Request,
        client: ClientConnection,
        route: _Route,
        extra: list[bytes],
        key: bytes,
    ) -> None:
        """Not cached: follow an identical request in flight, or go upstream."""
        ticket = self._coalescer.join(key)
        if isinstance(ticket, Follower):
            try:
                if await self._follow(request, client, route.upstream, ticket, extra):
                    return
            finally:
                ticket.close()
            # The leader's response was not shareable: go upstream on our own.
            extra.append(_MISS)
            self._metrics.cache_misses.inc()
            await self._forward(request, client, route, extra, key, None)
            return
        extra.append(_MISS)
        self._metrics.cache_misses.inc()
        try:
            await self._forward(request, client, route, extra, key, ticket)
        finally:
            ticket.close()

    # ------------------------------------------------------------------ #
    # decisions
    # ------------------------------------------------------------------ #
    def _route(self, request: Request) -> _Route:
        if self._routes:
            return self._route_for(
                request.path, request.model() if self._needs_model else None
            )
        return self._default

    def _route_for(self, path: bytes, model: str | None) -> _Route:
        for route in self._routes:
            if route.path is not None and not path.startswith(route.path):
                continue
            if route.model is not None and (model is None or route.model(model) is None):
                continue
            return route
        return self._default

    def _limit_key(self, request: Request) -> bytes:
        kind = self._limit_kind
        if kind == "api_key":
            credential = request.credential
            if credential:
                known = self._limit_keys.get(credential)
                if known is None:
                    if len(self._limit_keys) >= _MEMO_MAX:
                        self._limit_keys.clear()
                    known = self._limit_keys[credential] = b"k:" + _fast.credential_hash(
                        credential
                    )
                return known
        elif kind == "global":
            return b"global"
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
        # The entry's header lines were rendered once, when it was stored.
        lines = [entry.head]
        lines += extra
        lines.append(_HIT)
        if entry.streamed:
            client.hold()  # head and body leave in one write
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
        # A failure the leader's attempt chain ended with is shared too (with
        # retries or fallbacks configured), but it is no hit.
        shared_hit = 200 <= status < 300
        if shared_hit:
            self._metrics.cache_hits.inc()
        lines = [b"%s: %s\r\n" % pair for pair in headers]
        lines.extend(extra)
        lines.append(_HIT if shared_hit else _MISS)
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
        if not shared_hit:
            self._accounting.done(request, upstream, status, "MISS")
            return True
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
        route: _Route,
        extra: list[bytes],
        cache_key: bytes | None,
        leader: Leader | None,
    ) -> None:
        """Send the request upstream: one attempt, or a chain of them.

        Retries and fallbacks happen only while nothing of a response has
        reached the client: a failure before the head, or a retryable
        status held back at the head (:class:`_Chain` decides there).
        """
        breakers = self._breakers
        # Ask OpenAI for streamed usage when the client did not; the
        # usage-only chunk is removed again before the client sees it.
        strip_usage = False
        body = request.body
        if (
            self._usage_on
            and request.method == b"POST"
            and request.path.endswith(_CHAT_SUFFIX)
            # find, not `in`: CPython 3.11's bytes `in` first tries the
            # needle as an int and formats a TypeError for a bytes one.
            and body.find(b'"stream"') >= 0
        ):
            facts = request.facts()
            if facts.stream is True:  # "stream": false (or none) needs nothing
                injected = inject_include_usage(body, facts=facts)
                if injected is not None:
                    body = injected
                    strip_usage = True
        head_only = request.method == b"HEAD"
        record_limit = self._cache_max if cache_key is not None else 0
        chain = _Chain(self, route) if self._chained else None
        if chain is not None and chain.fallbacks and not request.facts().is_object:
            # No JSON object whose "model" could be replaced (the scan is
            # the one routing by model already made: nothing is decoded).
            chain.fallbacks = ()
        balancer = route.balancer
        index = 0
        wait = 0.0
        refused = 0  # targets whose breaker refused this request
        attempted = False  # an attempt of the current model failed: retrying
        fresh = False  # the next attempt goes to the same target on a new connection
        fresh_used = False
        answered_by: bytes | None = None  # X-Relay-Model line while a fallback runs
        exchange: ProxyExchange | None = None
        upstream = route.upstream
        error: UpstreamError | None = None
        while True:
            # -- choose the target ------------------------------------------
            now = time.monotonic()
            if fresh:
                pass  # same target as the attempt that met a stale socket
            elif not attempted:
                if balancer.single is not None:
                    index = -1 if refused else 0
                else:
                    excluded = refused if chain is None else refused | chain.excluded
                    index = balancer.pick(now, excluded)
                    if index < 0:
                        # Only a 429's cool-down is left: a first attempt is
                        # no retry, it may go (the client asked just now).
                        index = balancer.pick(now, excluded, cooling=False)
            else:
                assert chain is not None
                index, wait = chain.pick_next(now, refused)
            if index < 0:
                if chain is not None and chain.fallback < len(chain.fallbacks):
                    balancer, body, answered_by = self._fallback_attempt(
                        request, chain, strip_usage
                    )
                    refused = 0
                    attempted = False
                    continue
                self._unavailable(request, client, route, upstream, error, extra, leader)
                return
            upstream = balancer.targets[index]
            if chain is not None:
                chain.index = index
            breaker = upstream.breaker if breakers else None
            if fresh:
                pass  # the same attempt, resent: the breaker let it through already
            elif breaker is not None and not breaker.allow(now):
                # Half-open with its probe out (or opened meanwhile): next one.
                refused |= 1 << index
                fresh = False
                continue
            if breaker is not None and breaker.state:
                # allow() just turned an open breaker half-open for this probe:
                # show it on the gauge (only a probe passes a non-closed breaker).
                self._breaker_changed(upstream)
            state = upstream.state
            started = now
            if wait > 0.0:
                # A 429's Retry-After on the only target left: wait it out.
                # The loop clock may round: sleep until it has surely passed.
                while (left := state.not_before - time.monotonic()) > 0.0:
                    await asyncio.sleep(left + 0.002)
                wait = 0.0
                started = time.monotonic()
            if client.is_lost:
                # Gone (during a Retry-After wait, say): never sent, never
                # billed; followers of its flight go upstream on their own.
                if breaker is not None:
                    breaker.release_probe()
                if leader is not None:
                    leader.fail()
                self._accounting.done(request, upstream, 499)
                return

            # -- one attempt ------------------------------------------------
            state.inflight += 1
            try:
                conn = None if fresh else upstream.pool.take_idle()
                reused = conn is not None
                try:
                    if conn is None:
                        conn, reused = await upstream.pool.acquire(fresh=fresh)
                except UpstreamError as exc:
                    error = exc
                    fresh = False
                    if exc.exhausted:
                        # Not an upstream failure: relay's own bound was hit.
                        if breaker is not None:
                            breaker.release_probe()
                    else:
                        failed_at = time.monotonic()
                        if balancer.measures:  # what the failure cost counts as latency
                            state.observe(failed_at - started, failed_at)
                        upstream.meters.attempt("connect")
                        if breaker is not None:
                            breaker.record_failure(failed_at)
                            self._breaker_changed(upstream)
                    if self._retry_connect and self._advance(chain):
                        attempted = True
                        continue
                    self._upstream_failed(request, client, upstream, exc, extra, leader)
                    return
                if client.is_lost:
                    # Gone behind an await above (limiter, cache, a failed
                    # leader, the connect, a Retry-After wait): never sent,
                    # never billed.
                    self._not_sent(request, upstream, conn, breaker, leader)
                    return
                if answered_by is not None:
                    extra.append(answered_by)
                extra.append(upstream.relay_header)
                exchange = ProxyExchange(
                    client,
                    conn,
                    upstream.pool.release,
                    extra,
                    record_limit=record_limit,
                    json_limit=_JSON_USAGE_LIMIT if self._usage_on else 0,
                    strip_usage=strip_usage,
                    count_usage=self._usage_on,
                    observer=leader,
                    loop=self._loop,
                    head_only=head_only,
                    retry=chain,
                    path=request.path,
                )
                conn.send(
                    self._request_parts(request, upstream, body),
                    exchange,
                    head_only=head_only,
                    first_byte_timeout=self._first_byte_timeout,
                )
                outcome = await exchange.done
            finally:
                state.inflight -= 1
            fresh = False
            if outcome != Outcome.FAILED:
                if balancer.measures:
                    state.observe(exchange.upstream_latency, time.monotonic())
                if outcome != Outcome.RETRY:
                    break
            # Failed before anything reached the client: maybe try again.
            client.on_lost = None  # that exchange is over; the next sets its own
            extra.pop()  # X-Relay-Upstream of this attempt
            if answered_by is not None:
                extra.pop()
            if outcome == Outcome.RETRY:
                kind = "429" if exchange.status == 429 else "5xx"
                upstream.meters.attempt(kind)
                if breaker is not None:
                    if exchange.status >= 500:
                        breaker.record_failure(time.monotonic())
                    else:
                        breaker.record_success()
                    self._breaker_changed(upstream)
                if self._advance(chain):
                    attempted = True
                    continue
                # The gate saw a way on that is gone now (a breaker opened
                # meanwhile): the answer held back cannot be replayed.
                error = UpstreamError(f"Upstream answered {exchange.status}; no target left to retry")
                self._upstream_failed(request, client, upstream, error, extra, leader)
                return
            error = exchange.error
            assert error is not None
            if reused and not conn.received_any and not error.timeout and not fresh_used:
                # A keep-alive socket the upstream closed as we wrote to it:
                # the request never reached it, so it is safe to send it once
                # more, on a new connection (another idle one may be as stale).
                # Followers of a coalesced flight keep waiting for it.
                fresh = fresh_used = True
                continue
            if error.timeout:
                kind, retry = "timeout", self._retry_timeout
            else:
                kind, retry = "reset", self._retry_reset
            failed_at = time.monotonic()
            if balancer.measures:
                state.observe(failed_at - started, failed_at)
            upstream.meters.attempt(kind)
            if breaker is not None:
                breaker.record_failure(failed_at)
                self._breaker_changed(upstream)
            if retry and self._advance(chain):
                attempted = True
                continue
            self._upstream_failed(request, client, upstream, error, extra, leader)
            return

        status = exchange.status
        if outcome == Outcome.BROKEN:
            cut = exchange.error
            upstream.meters.attempt("timeout" if cut is not None and cut.timeout else "reset")
        elif status:
            if status < 429 or 429 < status < 500:
                upstream.meters.ok_attempts.inc()  # the usual case: no label lookup
            else:
                upstream.meters.attempt("429" if status == 429 else "5xx")
        breaker = upstream.breaker if breakers else None
        if breaker is not None:
            # Judged now: a first-time tokenizer load below can take seconds,
            # and neither the failure count nor a half-open probe may wait.
            if 0 < status < 500 and outcome != Outcome.BROKEN:
                breaker.record_success()  # the usual verdict, without _judge's call
                if breaker.state != upstream.shown_state:
                    self._breaker_changed(upstream)
            else:
                self._judge(upstream, breaker, exchange)
        usage = None
        if self._usage_on:
            accounting = self._accounting
            read = accounting.read_usage(request, exchange, body)  # from the response
            if read is ESTIMATE:
                estimator = self._estimator
                if not estimator.loaded:
                    # Tokenizer data (~40 MB) is loaded on first need, in a
                    # thread; the client already has its response.
                    await estimator.ensure_loaded(self.config.models)
                # Counted before _finish, off the loop when large.
                usage = await accounting.estimate(request, exchange, body)
            else:
                usage = read
        self._finish(
            request, client, upstream, exchange, extra, leader, cache_key, body,
            chain.model if chain is not None else None, usage,
        )

    def _advance(self, chain: _Chain | None) -> bool:
        """A retryable failure of the current attempt: True if another follows.

        Either another try for this model (``retries.attempts`` left and a
        target to take it) or, once those are spent, the next fallback model
        (the loop switches to it when no target is left).
        """
        if chain is None:
            return False
        if chain.left > 0 and chain.pick_next(time.monotonic(), dry=True)[0] >= 0:
            chain.left -= 1
            chain.excluded |= 1 << chain.index
            return True
        if chain.fallback < len(chain.fallbacks):
            chain.left = 0
            chain.excluded = -1  # every target of this model is done
            return True
        return False

    def _fallback_attempt(
        self, request: Request, chain: _Chain, strip_usage: bool
    ) -> tuple[Balancer, bytes, bytes]:
        """Move *chain* to its next fallback model: balancer, body, X-Relay-Model line."""
        model = chain.fallbacks[chain.fallback]
        chain.fallback += 1
        route = self._route_for(request.path, model)
        chain.route = route
        chain.left = self._attempts
        chain.excluded = 0
        chain.index = -1
        chain.model = model
        doc = dict(request.json())
        doc["model"] = model
        body = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
        if strip_usage:
            injected = inject_include_usage(body, doc)
            if injected is not None:
                body = injected
        return route.balancer, body, b"X-Relay-Model: %s\r\n" % model.encode()

    def _request_parts(self, request: Request, upstream: Upstream, body: bytes) -> list[bytes]:
        """The request as written upstream: one head, the body unchanged."""
        head = b"".join(
            (
                request.method, b" ", request.target, b" HTTP/1.1\r\nHost: ",
                upstream.host_header, b"\r\n",
                request.forward_headers,
                upstream.auth_line or request.credential_headers,
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
        return [head, body] if body else [head]

    def _unavailable(
        self,
        request: Request,
        client: ClientConnection,
        route: _Route,
        upstream: Upstream,
        error: UpstreamError | None,
        extra: list[bytes],
        leader: Leader | None,
    ) -> None:
        """No target may be tried (every breaker open): 503 with Retry-After."""
        if error is not None:
            self._upstream_failed(request, client, upstream, error, extra, leader)
            return
        now = time.monotonic()
        waits = [t.breaker.retry_after(now) for t in route.balancer.targets]
        retry = max(1, math.ceil(min(waits)))
        if len(route.balancer.targets) == 1:
            message = f"Upstream {upstream.origin} is unavailable (circuit breaker open)"
        else:
            message = "Every upstream target is unavailable (circuit breakers open)"
        unavailable = errors.GatewayError(
            503,
            message,
            "upstream_unavailable",
            "circuit_breaker_open",
            headers=((b"Retry-After", b"%d" % retry),),
        )
        if leader is not None:
            self._share_failure(leader, unavailable)
        self._reject(request, client, upstream, unavailable, extra)

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
        leader: Leader | None,
    ) -> None:
        gateway_error = self._gateway_error(error)
        if leader is not None:
            self._share_failure(leader, gateway_error)
        if client.is_lost:
            self._accounting.done(request, upstream, 499)
            return
        extra.append(upstream.relay_header)  # who was tried last
        self._reject(request, client, upstream, gateway_error, extra)

    @staticmethod
    def _gateway_error(error: UpstreamError) -> errors.GatewayError:
        if error.exhausted:
            return errors.GatewayError(
                503,
                error.reason,
                "upstream_unavailable",
                "upstream_connections_exhausted",
                headers=((b"Retry-After", b"1"),),
            )
        if error.timeout:
            return errors.gateway_timeout(error.reason)
        return errors.bad_gateway(error.reason)

    def _share_failure(self, leader: Leader, error: errors.GatewayError) -> None:
        """End the flight with relay's own error when an attempt chain ran:
        its followers get that answer instead of each retrying the failing
        upstreams on their own. Without retries, they go on their own."""
        if not self._chained or not leader.followers:
            leader.fail()
            return
        leader.start(error.status, ((b"Content-Type", b"application/json"), *error.headers))
        leader.chunk(error.body())
        leader.finish()

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
        self._breaker_changed(upstream)

    def _finish(
        self,
        request: Request,
        client: ClientConnection,
        upstream: Upstream,
        exchange: ProxyExchange,
        extra: list[bytes],
        leader: Leader | None,
        cache_key: bytes | None,
        body: bytes,
        fallback_model: str | None,
        usage: Usage | None,
    ) -> None:
        outcome = exchange.outcome
        status = exchange.status
        if status:
            upstream.meters.latency.observe(exchange.upstream_latency)

        if (
            cache_key is not None
            and outcome == Outcome.OK
            and exchange.recorded is not None
            and 200 <= status < 300
        ):
            # The response headers without hop-by-hop and per-caller ones
            # (what replay_headers keeps), picked out at the head.
            headers = exchange.shared_headers
            lines = exchange.shared_lines
            if fallback_model is not None:
                # Cached under the request the client sent, saying who answered.
                model_line = (b"X-Relay-Model", fallback_model.encode())
                headers = (*headers, model_line)
                lines = None if lines is None else lines + b"%s: %s\r\n" % model_line
            cache_now = self._cache_now
            if cache_now is not None:
                # Stored now: the next request for it is a hit, and a miss
                # costs no task, no CacheEntry and no rendering.
                cache_now.store(
                    cache_key, status, headers, lines,
                    None if usage is None else usage_value(usage), exchange.body(),
                    exchange.splitter is not None, time.time(),
                )
            else:
                cache = self._cache
                assert cache is not None
                entry = CacheEntry(
                    status,
                    with_usage(headers, usage),
                    exchange.body(),
                    exchange.splitter is not None,
                    time.time(),
                )
                self._spawn(cache.set(cache_key, entry))
        # 499 (nginx's "client closed request") when the client left before
        # the response was complete; 502 when the upstream broke it off (the
        # client saw the head, then an aborted body).
        if outcome == Outcome.CLIENT_GONE:
            status = 499
        elif outcome == Outcome.BROKEN:
            status = 502
        self._accounting.done(request, upstream, status, _cache_status(extra), usage)

    def upstreams(self) -> list[Upstream]:
        """Every target of this generation, once each (proxy.target first)."""
        seen: dict[str, Upstream] = {}
        for route in (self._default, *self._routes):
            for target in route.balancer.targets:
                seen.setdefault(target.label, target)
        return list(seen.values())

    def target_states(self) -> list[dict[str, object]]:
        """Per-target breaker, load and latency, for relay's own JSON endpoints."""
        now = time.monotonic()
        return [u.snapshot(now) for u in self.upstreams()]


def _admission(config: Config, runtime: Runtime, accounting: Accounting) -> Admission | None:
    """Virtual-key admission when keys.enabled, else None (its modules unloaded)."""
    keys = runtime.keys()
    if keys is None or not config.keys.enabled:
        return None
    from .keys.admission import Admission

    return Admission(
        keys[0], runtime.prices(config), config.keys.default_reserve_tokens, accounting.metrics
    )


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
