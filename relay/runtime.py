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
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import _fast
from .cache import Coalescer, MemoryCache, RedisCache
from .config import Config
from .cost import ModelLabels, PriceTable
from .ledger import RedisUsageLedger, UsageLedger, merge_snapshots
from .metrics import Metrics, RequestMetricsOff, multiprocess_dir
from .ratelimit import MemoryLimiter, RedisLimiter
from .redisconn import RedisConnection
from .requestlog import RequestLogger
from .tokens import TokenEstimator
from .upstream.pool import Origin, UpstreamPool, UpstreamPools
from .usage import Usage

if TYPE_CHECKING:
    from .http.request import Request
    from .pipeline import Pipeline

__all__ = ["Runtime", "Upstream"]

log = logging.getLogger("relay")

# Memory cache byte bound: entries are at most cache.max_body_bytes each, so
# this caps the worst case independently of max_entries.
MEMORY_CACHE_BYTES = 256 * 1024 * 1024


@dataclass(slots=True)
class Upstream:
    """One upstream origin with its pool and breaker, as routes point at it."""

    origin: Origin
    pool: UpstreamPool
    breaker: Any  # relay._fast CircuitBreaker (compiled or pure)
    label: str
    host_header: bytes
    shown_state: int = -1  # breaker state last written to the gauge

    @property
    def route_label(self) -> str:
        return self.label


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
        self._redis_ledger: RedisUsageLedger | None = None
        self._breakers: dict[Origin, tuple[tuple[int, float], Any]] = {}
        self._cache: tuple[tuple[Any, ...], Any] | None = None
        self._limiter: tuple[tuple[Any, ...], Any] | None = None
        self._prices: tuple[Any, PriceTable] | None = None
        self.labels = ModelLabels()
        self.request_log: RequestLogger | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._usage_flush: asyncio.TimerHandle | None = None
        # Read once: the launcher sets it before any worker starts.
        self._shared_dir = multiprocess_dir()
        self._key_hashes: dict[bytes, str] = {}
        self.draining = False

    # ------------------------------------------------------------------ #
    # building blocks for a pipeline
    # ------------------------------------------------------------------ #
    def apply(self, config: Config) -> None:
        """Bring process-wide settings in line with *config* (before a pipeline is built)."""
        self._apply_redis(config)
        self.coalescer.max_body_bytes = config.cache.max_body_bytes
        if config.log.requests:
            if self.request_log is None:
                self.request_log = RequestLogger(sys.stderr)
        elif self.request_log is not None:
            self.request_log.close()
            self.request_log = None
        if self._prices is None or self._prices[0] != config.models:
            # Keep the labels already given out: the bound is per process.
            self.labels.reserve(config.models)

    def _apply_redis(self, config: Config) -> None:
        r = config.redis
        settings = (
            r.enabled, r.address, r.password, r.db, r.timeout, r.mode, r.addresses, r.master_name,
        )  # fmt: skip
        if settings == self._redis_settings:
            return
        self._redis_settings = settings
        old = self.redis
        self.redis = None
        self._redis_ledger = None
        if r.enabled:
            self.redis = RedisConnection(
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
            if r.mode == "cluster":
                # Learn the slot table now rather than in the first request's call.
                self.spawn(self.redis.check())
            self._redis_ledger = RedisUsageLedger(self.redis.client, timeout=r.timeout)
        if old is not None:
            # Requests of the previous generation may still hold it: close later.
            self.loop.call_later(5.0, self.spawn, old.close())

    def upstream(self, target: str, config: Config, label: str | None = None) -> Upstream:
        origin = Origin.parse(target)
        proxy = config.proxy
        pool = self.pools.get(
            origin,
            pool_size=proxy.pool_size,
            connect_timeout=proxy.connect_timeout,
            read_timeout=proxy.read_timeout,
        )
        cb = config.circuit_breaker
        settings = (cb.failure_threshold, cb.recovery_timeout)
        known = self._breakers.get(origin)
        if known is None or known[0] != settings:
            breaker = _fast.CircuitBreaker(cb.failure_threshold, cb.recovery_timeout)
            self._breakers[origin] = (settings, breaker)
        else:
            breaker = known[1]
        upstream = Upstream(origin, pool, breaker, origin.label, origin.host_header())
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
    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run *coro* in the background, keeping a reference until it ends."""
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
        redis_ledger = self._redis_ledger
        if redis_ledger is not None and self.redis is not None and self.redis.up:
            self.spawn(
                self._record_shared(redis_ledger, label, key_hash, usage, paid, avoided, saved)
            )
        else:
            self.ledger.record(label, key_hash, usage, paid, avoided, saved)
            self._usage_changed()

    async def _record_shared(
        self,
        ledger: RedisUsageLedger,
        label: str,
        key_hash: str,
        usage: Usage,
        paid: float,
        avoided: float,
        hit: bool,
    ) -> None:
        conn = self.redis
        try:
            assert conn is not None
            await conn.execute(ledger.record, label, key_hash, usage, paid, avoided, hit)
        except Exception:
            # Redis is down: keep the numbers in this process rather than lose them.
            self.ledger.record(label, key_hash, usage, paid, avoided, hit)
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
            key=self.key_hash(credential) if credential else None,
        )

    def not_ready_reason(self, pipeline: Pipeline) -> str | None:
        if self.draining:
            return "shutting down"
        upstreams = pipeline.upstreams()
        # An open breaker whose recovery time has passed admits a probe, so
        # relay can serve again: report ready then, or a load balancer that
        # stops sending traffic would keep it open (and unready) for ever.
        now = time.monotonic()
        if pipeline.config.circuit_breaker.enabled and upstreams and all(
            u.breaker.state == 2 and u.breaker.retry_after(now) > 0 for u in upstreams
        ):
            return "circuit breaker open for every upstream"
        return None

    async def render_metrics(self) -> tuple[bytes, str]:
        # Multi-worker rendering reads every worker's files: keep it off the loop.
        return await self.loop.run_in_executor(None, self.metrics.render)

    async def usage_snapshot(self) -> dict[str, Any]:
        ledger = self._redis_ledger
        conn = self.redis
        if ledger is not None and conn is not None and conn.up:
            try:
                snapshot: dict[str, Any] = await conn.execute(ledger.snapshot)
                snapshot["backend"] = "redis"
                return snapshot
            except Exception:
                pass
        directory = multiprocess_dir()
        if directory is None:
            snapshot = self.ledger.snapshot()
        else:
            # Several workers without Redis: each keeps its own totals in a
            # file beside the metrics files; any worker answers with the sum.
            self._write_usage_file()
            snapshot = await self.loop.run_in_executor(None, _read_usage_files, directory)
        snapshot["backend"] = "memory"
        return snapshot

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
                json.dump(self.ledger.snapshot(), f)
            os.replace(path + ".tmp", path)  # readers never see half a file
        except OSError as exc:
            log.warning("usage: cannot write %s: %s", path, exc.strerror)

    async def close(self) -> None:
        self._write_usage_file()  # the last totals of this worker stay counted
        self.pools.close()
        if self.request_log is not None:
            self.request_log.close()
        if self.redis is not None:
            await self.redis.close()
        for task in list(self._tasks):
            task.cancel()


def _read_usage_files(directory: str) -> dict[str, Any]:
    snapshots = []
    for path in glob.glob(os.path.join(directory, "usage-*.json")):
        try:
            with open(path) as f:
                snapshots.append(json.load(f))
        except (OSError, ValueError):
            continue  # a worker replacing its file right now: next read has it
    return merge_snapshots(snapshots)
