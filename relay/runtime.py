"""The long-lived resources of one relay process, shared by every config generation.

:class:`Runtime` holds what outlives a config generation: the targets (their
pools, breakers and balancing states, in `upstream.registry.Targets`),
cache and limiter backends, the Redis connection, the
coalescer of in-flight misses, the usage totals, metrics, the request log,
the key store, and the background tasks. It decides nothing per request:
the logic of each lives in its family (accounting/, features/, upstream/,
keys/). A :class:`~relay.pipeline.Pipeline` takes from it, once when it is
built, the objects its config needs; objects whose settings did not change
are handed out again, so a hot reload keeps cached entries, buckets,
breaker states and pooled sockets.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from . import debug
from .accounting.book import UsageBook
from .accounting.cost import ModelLabels, PriceTable
from .accounting.keyhash import KeyHashes
from .accounting.ledger import SharedUsage
from .accounting.requestlog import RequestLogger
from .accounting.tokens import TokenEstimator
from .config import Config
from .features.breaker import Breakers
from .features.cache import MemoryCache, RedisCache
from .features.coalescer import Coalescer
from .features.limits import MemoryLimiter, RedisLimiter
from .ops.metrics import Metrics
from .redisconn import RedisConnection
from .upstream.pool import UpstreamPools
from .upstream.registry import Targets

__all__ = ["Runtime"]

T = TypeVar("T")

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
        self.usage_book = UsageBook(loop)
        self.key_hashes = KeyHashes()
        self.breakers = Breakers(metrics)
        self.targets = Targets(self.pools, self.breakers)
        self.redis: RedisConnection | None = None
        self._redis_settings: tuple[Any, ...] | None = None
        self._cache: tuple[tuple[Any, ...], Any] | None = None
        self._limiter: tuple[tuple[Any, ...], Any] | None = None
        self._prices: tuple[Any, PriceTable] | None = None
        self.labels = ModelLabels()
        self.request_log: RequestLogger | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._retired: list[RedisConnection] = []  # replaced, closed a little later
        self._retired_keys: list[Any] = []  # key services replaced, closed a little later
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
        connection, the limiter and cache backends, a breaker, the request
        log, and then ``build()`` itself, with these in place (the pipeline
        takes them when it is built). Only when all of that succeeded do the
        process-wide settings change (usage totals sent to the new Redis,
        coalescer cap, model labels) and the old connection and request log
        get closed. If anything raises, the runtime is as it was and the
        error propagates: a refused reload leaves nothing of itself behind.
        """
        before = (self.redis, self._redis_settings, self._cache, self._limiter, self._prices,
                  self.request_log)  # fmt: skip
        breakers = self.breakers.checkpoint()
        replaced, usage_writer = self._stage_redis(config)
        self._stage_request_log(config)
        keys_staged: tuple[bool, Any] = (False, None)
        try:
            keys_staged = self._stage_keys(config)
            # Cheap objects that refuse settings they cannot hold; built
            # before any pool is reconfigured by build().
            cb = config.circuit_breaker
            self.breakers.check(cb.failure_threshold, cb.recovery_timeout)
            if config.ratelimit.enabled:
                self.limiter(config)
            if config.cache.enabled:
                self.cache(config)
            self.prices(config)
            built = build()
        except BaseException:
            self._unstage_keys(keys_staged)
            staged = self.redis
            (self.redis, self._redis_settings, self._cache, self._limiter, self._prices,
             self.request_log) = before  # fmt: skip
            self.breakers.restore(breakers)
            if usage_writer is not None:
                usage_writer.close()
            if replaced and staged is not None:
                self.spawn(staged.close())
            raise
        # Nothing below can fail: the edit is applied from here on.
        if replaced:
            self.usage_book.use(usage_writer)
            if self.redis is not None and self.redis.mode == "cluster":
                # Learn the slot table now rather than in the first request's call.
                self.spawn(self.redis.check())
        if replaced and before[0] is not None:
            # Requests of the previous generation may still hold it: close later.
            old = before[0]
            self._retired.append(old)
            self.loop.call_later(5.0, self._close_retired, old)
        self.coalescer.max_body_bytes = config.cache.max_body_bytes
        old_log = before[5]
        if old_log is not None and old_log is not self.request_log:
            old_log.close()  # what is buffered is written now
        if before[4] is None or before[4][0] != config.models:
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

    def _stage_request_log(self, config: Config) -> None:
        """The request log *config* asks for (the one there is, if on already)."""
        if not config.log.requests:
            self.request_log = None
        elif self.request_log is None:
            self.request_log = RequestLogger(sys.stderr)

    def _stage_keys(self, config: Config) -> tuple[bool, Any]:
        """Open the key store *config* names (before the pipeline is built);
        ``(replaced, previous entry)``."""
        k = config.keys
        if not k.needs_store:
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

    def _stage_redis(self, config: Config) -> tuple[bool, SharedUsage | None]:
        """Put the connection *config* asks for in place: (True if it is a new
        one, the writer of usage totals into it, not in use yet).

        Creating a connection opens no socket, so undoing this is cheap.
        """
        r = config.redis
        settings = (
            r.enabled, r.address, r.password, r.db, r.timeout, r.mode, r.addresses, r.master_name,
        )  # fmt: skip
        if settings == self._redis_settings:
            return False, None
        redis = None
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
        writer = self.usage_book.writer_for(redis)
        self._redis_settings = settings
        self.redis = redis
        return True, writer

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
    # background work
    # ------------------------------------------------------------------ #
    @debug.spawns("tasks")
    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run *coro* in the background, keeping a reference until it ends."""
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        await self.usage_book.close()  # before Redis closes: the last totals land
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

