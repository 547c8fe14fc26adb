"""The long-lived state of one relay process, shared by every config generation.

:class:`Runtime` is the one owner of mutable process state: upstream pools,
circuit breakers, cache and limiter backends, the Redis connection, the
coalescer of in-flight misses, usage totals, metrics and the request log.
A :class:`~relay.pipeline.Pipeline` asks it for the objects its config
needs; objects whose settings did not change are handed out again, so a hot
reload keeps cached entries, buckets, breaker states and pooled sockets.
"""

from __future__ import annotations

import asyncio
import glob
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from . import _fast, debug
from .accounting.cost import ModelLabels, PriceTable
from .accounting.ledger import RedisUsageLedger, SharedUsage, UsageLedger, merge_snapshots
from .accounting.requestlog import RequestLogger
from .accounting.tokens import TokenEstimator
from .accounting.usage import Usage
from .config import AUTH_SCHEMES, Config
from .features.cache import MemoryCache, RedisCache
from .features.coalescer import Coalescer
from .features.limits import MemoryLimiter, RedisLimiter
from .ops.metrics import Metrics, RequestMetricsOff, multiprocess_dir
from .redisconn import RedisConnection
from .upstream.pool import Origin, UpstreamPools
from .upstream.target import TargetState, Upstream

if TYPE_CHECKING:
    from .http.request import Request
    from .pipeline import Pipeline

__all__ = ["Runtime"]

T = TypeVar("T")

log = logging.getLogger("relay")

# Memory cache byte bound: entries are at most cache.max_body_bytes each, so
# this caps the worst case independently of max_entries.
MEMORY_CACHE_BYTES = 256 * 1024 * 1024


class Runtime:
    """Owner of everything that outlives one config generation."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        metrics: Metrics,
        *,
        count_reload_errors: bool = True,
    ) -> None:
        self.loop = loop
        self.metrics = metrics
        self.count_reload_errors = count_reload_errors
        self.pools = UpstreamPools(loop)
        self.estimator = TokenEstimator()
        self.coalescer = Coalescer()
        self.ledger = UsageLedger()
        self.redis: RedisConnection | None = None
        self._redis_settings: tuple[Any, ...] | None = None
        # Usage bound for Redis, kept until Redis confirmed it (None: no Redis).
        self._shared_usage: SharedUsage | None = None
        self._breakers: dict[tuple[Origin, str], tuple[tuple[int, float], Any]] = {}
        self._target_states: dict[tuple[Origin, str], TargetState] = {}
        self._cache: tuple[tuple[Any, ...], Any] | None = None
        self._limiter: tuple[tuple[Any, ...], Any] | None = None
        self._prices: tuple[Any, PriceTable] | None = None
        self.labels = ModelLabels()
        self.request_log: RequestLogger | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._retired: list[RedisConnection] = []  # replaced, closed a little later
        self._retired_keys: list[Any] = []  # key services replaced, closed a little later
        self._usage_flush: asyncio.TimerHandle | None = None
        # Read once: the launcher sets it before any worker starts.
        self._shared_dir = multiprocess_dir()
        self._key_hashes: dict[bytes, str] = {}
        # Virtual keys: (store settings, service, manager), static keys applied.
        self._keys: tuple[tuple[Any, ...], Any, Any] | None = None
        self._static_keys: tuple[Any, ...] | None = None
        self._static_keys_task: asyncio.Task[Any] | None = None
        self.draining = False

    # ------------------------------------------------------------------ #
    # building blocks for a pipeline
    # ------------------------------------------------------------------ #
    def apply(self, config: Config, build: Callable[[], T]) -> T:
        """Bring the process in line with *config* and return ``build()`` (the
        pipeline), all or nothing.

        Everything that can refuse the config is built first: the Redis
        connection, the limiter and cache backends, a breaker, and then
        ``build()`` itself, with the new connection in place. Only when all
        of that succeeded do the process-wide settings change (request log,
        coalescer cap, model labels) and the old connection get closed. If
        anything raises, the runtime is as it was and the error propagates:
        a refused reload leaves nothing of itself behind.
        """
        before = (self.redis, self._redis_settings, self._shared_usage, self._cache,
                  self._limiter, self._prices, dict(self._breakers))  # fmt: skip
        replaced = self._stage_redis(config)
        keys_staged: tuple[bool, Any] = (False, None)
        try:
            keys_staged = self._stage_keys(config)
            # Cheap objects that refuse settings they cannot hold; built
            # before any pool is reconfigured by build().
            cb = config.circuit_breaker
            _fast.CircuitBreaker(cb.failure_threshold, cb.recovery_timeout)
            if config.ratelimit.enabled:
                self.limiter(config)
            if config.cache.enabled:
                self.cache(config)
            self.prices(config)
            built = build()
        except BaseException:
            self._unstage_keys(keys_staged)
            staged, staged_usage = self.redis, self._shared_usage
            (self.redis, self._redis_settings, self._shared_usage, self._cache,
             self._limiter, self._prices, self._breakers) = before  # fmt: skip
            if replaced and staged_usage is not None:
                staged_usage.close()
            if replaced and staged is not None:
                self.spawn(staged.close())
            raise
        # Nothing below can fail: the edit is applied from here on.
        if replaced:
            self._hand_over_usage(before[2])
            if self.redis is not None and self.redis.mode == "cluster":
                # Learn the slot table now rather than in the first request's call.
                self.spawn(self.redis.check())
        if replaced and before[0] is not None:
            # Requests of the previous generation may still hold it: close later.
            old = before[0]
            self._retired.append(old)
            self.loop.call_later(5.0, self._close_retired, old)
        self.coalescer.max_body_bytes = config.cache.max_body_bytes
        if config.log.requests:
            if self.request_log is None:
                self.request_log = RequestLogger(sys.stderr)
        elif self.request_log is not None:
            self.request_log.close()
            self.request_log = None
        if before[5] is None or before[5][0] != config.models:
            # Keep the labels already given out: the bound is per process.
            self.labels.reserve(config.models)
        if keys_staged[0]:
            old_keys = keys_staged[1]
            if old_keys is not None:
                # Requests of the previous generation may still hold it:
                # close later, or in close() if the stop comes first.
                self._retired_keys.append(old_keys[1])
                self.loop.call_later(5.0, self._close_retired_keys, old_keys[1])
        self._apply_static_keys(config, keys_staged[0])
        return built

    def _stage_keys(self, config: Config) -> tuple[bool, Any]:
        """Open the key store *config* names (before the pipeline is built);
        ``(replaced, previous entry)``."""
        k = config.keys
        if not (k.enabled or k.admin_key or k.static):
            return False, None
        settings = (k.store, k.path, self.redis if k.store == "redis" else None)
        if self._keys is not None and self._keys[0] == settings:
            return False, None
        from .keys.manage import KeyManager
        from .keys.service import KeyService
        from .keys.stores import open_store

        store = open_store(k, self.redis)  # KeyStoreError names the file
        service = KeyService(store, self.loop)
        previous, self._keys = self._keys, (settings, service, KeyManager(store, service))
        return True, previous

    def _unstage_keys(self, staged: tuple[bool, Any]) -> None:
        replaced, previous = staged
        if replaced and self._keys is not None:
            self.spawn(self._keys[1].close())
            self._keys = previous

    def _apply_static_keys(self, config: Config, new_store: bool) -> None:
        k = config.keys
        if self._keys is not None and (new_store or k.static != self._static_keys):
            from .keys.stores import static_records

            self._static_keys = k.static
            self._static_keys_task = self.spawn(self._keys[2].apply_static(static_records(k)))

    async def settled(self, timeout: float = 10.0) -> None:
        """Wait (bounded) for start-up work the first requests depend on: the
        config's static keys written to the key store, so a key declared in
        the file is valid from the first request on."""
        task = self._static_keys_task
        if task is not None and not task.done():
            await asyncio.wait({task}, timeout=timeout)

    def keys(self) -> tuple[Any, Any] | None:
        """(KeyService, KeyManager) of the configured key store, if any."""
        return None if self._keys is None else (self._keys[1], self._keys[2])

    def _close_retired_keys(self, service: Any) -> None:
        if service in self._retired_keys:
            self._retired_keys.remove(service)
            self.spawn(service.close())

    def _close_retired(self, conn: RedisConnection) -> None:
        if conn in self._retired:
            self._retired.remove(conn)
            self.spawn(conn.close())

    def _stage_redis(self, config: Config) -> bool:
        """Put the connection *config* asks for in place; True if it is a new one.

        Creating a connection opens no socket, so undoing this is cheap.
        """
        r = config.redis
        settings = (
            r.enabled, r.address, r.password, r.db, r.timeout, r.mode, r.addresses, r.master_name,
        )  # fmt: skip
        if settings == self._redis_settings:
            return False
        redis = shared = None
        if r.enabled:
            redis = RedisConnection(
                r.address,
                r.password,
                r.db,
                r.timeout,
                on_error=self.metrics.redis_errors.inc,
                logger=logging.getLogger("relay.redis"),
                mode=r.mode,
                addresses=r.addresses,
                master_name=r.master_name,
            )
            ledger = RedisUsageLedger(redis.client, runner=redis.execute)
            shared = SharedUsage(ledger, redis, self.loop, on_outage_change=self._usage_changed)
        self._redis_settings = settings
        self.redis = redis
        self._shared_usage = shared
        return True

    def _hand_over_usage(self, previous: SharedUsage | None) -> None:
        """Totals the replaced connection had not confirmed go with the new one
        (or stay in this process's memory totals without Redis)."""
        if previous is None:
            return
        if self._shared_usage is not None:
            self._shared_usage.adopt(previous)
            return
        previous.close()
        if previous.has_unconfirmed():
            self.ledger.merge(previous.take_unconfirmed())
            self._usage_changed()

    def upstream(
        self,
        url: str,
        config: Config,
        *,
        name: str | None = None,
        api_key: str = "",
        auth: str = "bearer",
        weight: float = 1.0,
    ) -> Upstream:
        """The target at *url*; its pool is per origin, its breaker and
        balancing state per (origin, label), all kept across reloads."""
        origin = Origin.parse(url)
        proxy = config.proxy
        pool = self.pools.get(
            origin,
            pool_size=proxy.pool_size,
            connect_timeout=proxy.connect_timeout,
            read_timeout=proxy.read_timeout,
            first_byte_timeout=proxy.first_byte_timeout,
            max_connections=proxy.max_connections,
        )
        label = name or origin.label
        ident = (origin, label)
        cb = config.circuit_breaker
        settings = (cb.failure_threshold, cb.recovery_timeout)
        known = self._breakers.get(ident)
        if known is None or known[0] != settings:
            breaker = _fast.CircuitBreaker(cb.failure_threshold, cb.recovery_timeout)
            self._breakers[ident] = (settings, breaker)
        else:
            breaker = known[1]
        state = self._target_states.get(ident)
        if state is None:
            state = self._target_states[ident] = TargetState()
        auth_line = b""
        if api_key:
            header, prefix = AUTH_SCHEMES[auth]
            auth_line = f"{header}: {prefix}{api_key}\r\n".encode("latin-1")
        upstream = Upstream(
            origin,
            pool,
            breaker,
            label,
            origin.host_header(),
            weight=weight,
            state=state,
            auth_line=auth_line,
            relay_header=b"X-Relay-Upstream: %s\r\n" % label.encode(),
        )
        self.breaker_changed(upstream)
        return upstream

    def cache(self, config: Config) -> Any:
        c = config.cache
        settings = (c.ttl, c.max_entries, c.max_body_bytes, self.redis)
        if self._cache is not None and self._cache[0] == settings:
            return self._cache[1]
        memory = MemoryCache(c.max_entries, MEMORY_CACHE_BYTES, c.ttl)
        backend: Any = memory
        if self.redis is not None:
            backend = RedisCache(self.redis, c.ttl, fallback=memory)
        self._cache = (settings, backend)
        return backend

    def limiter(self, config: Config) -> Any:
        rl = config.ratelimit
        settings = (rl.requests_per_second, rl.burst, self.redis)
        if self._limiter is not None and self._limiter[0] == settings:
            return self._limiter[1]
        memory = MemoryLimiter(rl.requests_per_second, rl.burst)
        backend: Any = memory
        if self.redis is not None:
            backend = RedisLimiter(self.redis, rl.requests_per_second, rl.burst, fallback=memory)
        self._limiter = (settings, backend)
        return backend

    def prices(self, config: Config) -> PriceTable:
        if self._prices is None or self._prices[0] != config.models:
            self._prices = (config.models, PriceTable(config.models))
        return self._prices[1]

    # ------------------------------------------------------------------ #
    # per-request services
    # ------------------------------------------------------------------ #
    @debug.spawns("tasks")
    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run *coro* in the background, keeping a reference until it ends."""
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def key_hash(self, credential: bytes) -> str:
        """The short hash that stands for a credential in usage rows and logs.

        Memoized (bounded): most traffic comes from a few keys, and hashing
        per request showed in profiles.
        """
        known = self._key_hashes.get(credential)
        if known is None:
            if len(self._key_hashes) >= 4096:
                self._key_hashes.clear()
            known = self._key_hashes[credential] = _fast.credential_hash(credential).decode()
        return known

    def breaker_changed(self, upstream: Upstream) -> None:
        state = upstream.breaker.state
        if state != upstream.shown_state:  # the gauge is written on change only
            upstream.shown_state = state
            self.metrics.set_breaker_state(upstream.label, state)

    def record_usage(
        self,
        label: str,
        key_hash: str,
        usage: Usage,
        cost: float,
        saved: bool,
        metrics: Metrics | RequestMetricsOff | None = None,
    ) -> None:
        metrics = self.metrics if metrics is None else metrics
        if saved:
            metrics.record_saved(label, cost)
            paid, avoided = 0.0, cost
        else:
            metrics.record_tokens(label, usage.prompt_tokens, usage.completion_tokens, cost)
            paid, avoided = cost, 0.0
        # A hit counts as a hit and saved cost, not as tokens paid again.
        shared = self._shared_usage
        if shared is not None:
            shared.record(label, key_hash, usage, paid, avoided, saved)
        else:
            self.ledger.record(label, key_hash, usage, paid, avoided, saved)
            self._usage_changed()

    def log_request(
        self,
        request: Request,
        upstream: Upstream,
        status: int,
        seconds: float,
        cache: str,
        model: str | None,
        usage: Usage | None,
        cost: float,
    ) -> None:
        logger = self.request_log
        if logger is None:
            return
        credential = request.credential
        ticket = request.relay_key
        logger.log(
            method=request.method,
            path=request.path,
            status=status,
            model=model,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            cost_usd=cost,
            cache=cache,
            latency_ms=seconds * 1000.0,
            upstream=upstream.label,
            key=ticket.name if ticket is not None else (
                self.key_hash(credential) if credential else None
            ),
        )

    def not_ready_reason(self, pipeline: Pipeline) -> str | None:
        if self.draining:
            return "shutting down"
        upstreams = pipeline.upstreams()
        # An open breaker whose recovery time has passed admits a probe, so
        # relay can serve again: report ready then, or a load balancer that
        # stops sending traffic would keep it open (and unready) for ever.
        if pipeline.config.circuit_breaker.enabled and upstreams and len(
            self.open_targets(pipeline)
        ) == len(upstreams):
            return "circuit breaker open for every upstream"
        return None

    def open_targets(self, pipeline: Pipeline) -> list[str]:
        """Labels of the targets whose breaker is open (still in recovery)."""
        if not pipeline.config.circuit_breaker.enabled:
            return []
        now = time.monotonic()
        return [
            u.label
            for u in pipeline.upstreams()
            if u.breaker.state == 2 and u.breaker.retry_after(now) > 0
        ]

    async def render_metrics(self) -> tuple[bytes, str]:
        # Multi-worker rendering reads every worker's files: keep it off the loop.
        return await self.loop.run_in_executor(None, self.metrics.render)

    async def usage_snapshot(self) -> dict[str, Any]:
        shared = self._shared_usage
        if shared is not None:
            snapshot = await shared.snapshot()
            if snapshot is not None:
                snapshot["backend"] = "redis"
                return snapshot
        directory = multiprocess_dir()
        if directory is None:
            snapshot = self._memory_totals()
        else:
            # Several workers without Redis: each keeps its own totals in a
            # file beside the metrics files; any worker answers with the sum.
            self._write_usage_file()
            snapshot = await self.loop.run_in_executor(None, _read_usage_files, directory)
        snapshot["backend"] = "memory"
        return snapshot

    def _memory_totals(self) -> dict[str, Any]:
        """This process's totals that are in no Redis: without Redis all of
        them, with it what Redis has not confirmed yet."""
        shared = self._shared_usage
        if shared is None or not shared.has_unconfirmed():
            return self.ledger.snapshot()
        return merge_snapshots([self.ledger.snapshot(), shared.unconfirmed()])

    def _usage_changed(self) -> None:
        """Schedule this worker's usage file to be rewritten (at most every 0.5 s)."""
        if self._usage_flush is None and self._shared_dir is not None:
            self._usage_flush = self.loop.call_later(0.5, self._write_usage_file)

    def _write_usage_file(self) -> None:
        if self._usage_flush is not None:
            self._usage_flush.cancel()
            self._usage_flush = None
        directory = multiprocess_dir()
        if directory is None:
            return
        path = os.path.join(directory, f"usage-{os.getpid()}.json")
        try:
            with open(path + ".tmp", "w") as f:
                json.dump(self._memory_totals(), f)
            os.replace(path + ".tmp", path)  # readers never see half a file
        except OSError as exc:
            log.warning("usage: cannot write %s: %s", path, exc.strerror)

    async def close(self) -> None:
        shared = self._shared_usage
        if shared is not None:
            await shared.flush()  # bounded by redis.timeout per batch
            shared.close()
        self._write_usage_file()  # the last totals of this worker stay counted
        for service in self._retired_keys:
            await service.close()  # before Redis closes: its settlements land first
        self._retired_keys.clear()
        if self._keys is not None:
            await self._keys[1].close()  # settlements on their way land first
        self.estimator.close()
        self.pools.close()
        if self.request_log is not None:
            self.request_log.close()
        if self.redis is not None:
            await self.redis.close()
        for conn in self._retired:
            await conn.close()
        self._retired.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            # A cancelled task ends only when it runs again: let it, or it
            # stays pending on a loop that may close right after this.
            await asyncio.wait(tasks, timeout=1.0)


def _read_usage_files(directory: str) -> dict[str, Any]:
    snapshots = []
    for path in glob.glob(os.path.join(directory, "usage-*.json")):
        try:
            with open(path) as f:
                snapshots.append(json.load(f))
        except (OSError, ValueError):
            continue  # a worker replacing its file right now: next read has it
    return merge_snapshots(snapshots)
