"""One Redis client shared by the cache and the rate limiter, with a health state.

Redis is an accelerator for relay, never a dependency of a request: every
call has a hard deadline, and the first failure marks the connection *down*.
While it is down the backends answer from their in-memory fallback at once,
without touching the network, so an outage costs requests nothing. A
background probe PINGs about once a second and marks the connection *up*
again when Redis answers. Each transition is logged exactly once.

Error counting (``on_error``, wired to ``relay_redis_errors_total``): every
failed call made on behalf of a request counts, and so does every failed
probe. Counting probes keeps the counter rising (about 1/s) for as long as an
outage lasts, so ``rate(relay_redis_errors_total[1m]) > 0`` is a usable alert
even though requests stop touching Redis while it is down.

A reply error (``ResponseError``: the server answered, e.g. OOM or a script
error) counts and makes that call fall back, but does not mark the
connection down: the server is reachable, and flapping on a bad key would
help nobody. Those are logged at most once a minute.

Topologies (``mode``), each with redis-py's own client, never a router of
relay's making:

- ``standalone``: one server at ``address``.
- ``sentinel``: ``redis.asyncio.sentinel.Sentinel(addresses).master_for(
  master_name)``. Every new socket asks the sentinels where the master is,
  so after a failover the probe's PING reaches the promoted replica and
  relay marks the connection up again; a demoted master's ``READONLY``
  reply closes that socket (redis-py) and counts like any other failure.
- ``cluster``: ``redis.asyncio.cluster.RedisCluster(startup_nodes=...)``
  from the seed ``addresses``. redis-py follows ``MOVED`` (and updates its
  slot table) and ``ASK`` (during a slot migration) inside one call, within
  the same deadline; a node that fails makes it rediscover the topology
  from the seeds. Scripts and transactions run unchanged as long as all of
  their keys share one hash slot (relay's multi-key layouts use hash tags).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import cache
from typing import TYPE_CHECKING, Any, TypeVar, cast

from . import debug

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

__all__ = ["MODES", "RedisConnection", "RedisUnavailable", "parse_address"]

MODES = ("standalone", "sentinel", "cluster")

T = TypeVar("T")

DEFAULT_PORT = 6379
# Failures that mean "use the fallback for this call". OSError and the
# builtin TimeoutError cover what escapes redis-py and our own deadline.
# redis-py is imported with the first connection: a relay without Redis does
# not pay its ~7 MB and 70 ms of import per worker.
_REPLY_ERROR_LOG_INTERVAL = 60.0
# Discovering a cluster's topology (CLUSTER SLOTS, then COMMAND) is a few
# round trips and a large reply: the background probe and the start-up
# check give it this long at least rather than the per-call deadline, which
# a busy host could miss every time, so relay would never use the cluster.
_DISCOVERY_TIMEOUT = 5.0


class RedisUnavailable(Exception):
    """Redis could not serve this call (down, slow or failed): use the fallback."""


def parse_address(address: str) -> tuple[str, int]:
    """Split ``"host:port"`` (``"[v6]:port"``, ``":port"``, ``"host"``) into parts."""
    address = address.strip()
    if address.startswith("["):
        host, sep, rest = address[1:].partition("]")
        if not sep:
            raise ValueError(f"bad redis address {address!r}")
        port_text = rest[1:] if rest.startswith(":") else rest
    else:
        host, _, port_text = address.rpartition(":") if ":" in address else (address, "", "")
    host = host or "localhost"
    if not port_text:
        return host, DEFAULT_PORT
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"bad redis port in {address!r}") from None
    if not 0 < port < 65536:
        raise ValueError(f"bad redis port in {address!r}")
    return host, port


def _noop() -> None:
    return None


@cache
def _blocking_sentinel_pool() -> type:
    """redis-py's Sentinel pool with the blocking pool's bounded queueing.

    SentinelConnectionPool finds the master for each new socket; mixed with
    BlockingConnectionPool a burst waits (within the deadline) for one of
    ``max_connections`` sockets, as in standalone mode, instead of failing.
    Built on first use: redis-py is imported with the first connection.
    """
    from redis.asyncio import BlockingConnectionPool
    from redis.asyncio.sentinel import SentinelConnectionPool

    bases = (SentinelConnectionPool, BlockingConnectionPool)
    return type("BlockingSentinelConnectionPool", bases, {})


class RedisConnection:
    """A ``redis.asyncio.Redis`` client plus an up/down health state.

    Use ``execute(fn, *args)`` for every command (``fn`` is a bound client
    method or a registered script); it raises ``RedisUnavailable`` instead
    of any Redis or network error, immediately while the connection is down.
    Callers on the hot path may test ``up`` first to skip even that.
    """

    @debug.opens("redis_connections")
    def __init__(
        self,
        address: str,
        password: str = "",
        db: int = 0,
        timeout: float = 0.25,
        on_error: Callable[[], None] | None = None,
        logger: logging.Logger | None = None,
        *,
        mode: str = "standalone",
        addresses: Sequence[str] = (),
        master_name: str = "mymaster",
        max_connections: int = 16,
        probe_interval: float = 1.0,
    ) -> None:
        if timeout <= 0:
            raise ValueError("redis timeout must be positive")
        if mode not in MODES:
            raise ValueError(f"unknown redis mode {mode!r}; use one of {MODES}")
        from redis.exceptions import (
            ClusterDownError,
            ClusterError,
            MaxConnectionsError,
            RedisClusterException,
            RedisError,
            ResponseError,
            SlotNotCoveredError,
        )

        # RedisClusterException is not a RedisError: a cluster client raises
        # it for slots nobody serves (SlotNotCoveredError) and for commands
        # it refuses to route.
        self._call_errors: tuple[type[BaseException], ...] = (
            RedisError, RedisClusterException, OSError, TimeoutError,
        )  # fmt: skip
        # The server answered (or refused to route) but is reachable. A
        # cluster's ClusterError ("TTL exhausted": 16 redirects without an
        # answer) concerns one slot, typically one being migrated: redis-py
        # 8.1's asyncio client sends ASKING on one pooled socket and the
        # command on another, so the target answers MOVED and the source ASK
        # again. Only that call falls back; the other slots keep using Redis.
        self._reply_errors: tuple[type[BaseException], ...] = (
            ResponseError, RedisClusterException, ClusterError,
        )  # fmt: skip
        # ...except these, which mean the data cannot be reached right now.
        self._outage_replies: tuple[type[BaseException], ...] = (
            ClusterDownError, SlotNotCoveredError,
        )  # fmt: skip
        # All of a cluster node's sockets busy: this call falls back, the
        # node is fine.
        self._busy_error: type[BaseException] = MaxConnectionsError
        self.mode = mode
        self.master_name = master_name
        seeds = [address] if mode == "standalone" else list(addresses) or [address]
        self._seeds = [parse_address(a) for a in seeds]
        shown = ",".join(f"{h}:{p}" for h, p in self._seeds)
        # For logs: never carries the password.
        self.where = {
            "standalone": shown,
            "sentinel": f"sentinel master {master_name!r} (sentinels {shown})",
            "cluster": f"cluster (seeds {shown})",
        }[mode]
        self.timeout = timeout
        self.probe_interval = probe_interval
        self._password = password
        self._on_error = on_error or _noop
        self._log = logger or logging.getLogger("relay.redis")
        self._sentinel: Any = None
        self._pool: Any = None
        self._gate: asyncio.Semaphore | None = None  # cluster: bounds calls in flight
        self.client: Any = self._make_client(password, db, timeout, max_connections)
        self._up = True
        self._closed = False
        self._probe: asyncio.Task[None] | None = None
        self._last_reply_error_log = -_REPLY_ERROR_LOG_INTERVAL

    def _make_client(
        self, password: str, db: int, timeout: float, max_connections: int
    ) -> Redis | RedisCluster:
        from redis.asyncio import BlockingConnectionPool, Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # No retries inside redis-py: a failed call falls back at once and the
        # probe decides when Redis is usable again. A blocking pool makes a
        # burst of requests queue (within the same deadline) for one of a few
        # sockets instead of failing with "Too many connections".
        common: dict[str, Any] = {
            "password": password or None,
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 0),
            "health_check_interval": 0,
        }
        if self.mode == "cluster":
            from redis.asyncio.cluster import ClusterNode, RedisCluster

            # A cluster node's pool does not queue: past max_connections a
            # call would fail with MaxConnectionsError. The gate in execute()
            # lets at most that many calls run at once (each holds at most
            # one socket per node), so a burst queues within its deadline,
            # as on the blocking pool of the other modes.
            # One retry lets a call that met a failed node rediscover the
            # slots and try the new owner, still within the call's deadline.
            del common["retry"]
            self._gate = asyncio.Semaphore(max_connections)
            return RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in self._seeds],
                retry=Retry(NoBackoff(), 1),
                max_connections=max_connections,
                **common,
            )
        if self.mode == "sentinel":
            from redis.asyncio.sentinel import Sentinel

            # Sentinels are asked with the same deadline; they need no password
            # of the master's (redis.password authenticates to the master).
            self._sentinel = Sentinel(
                self._seeds,
                sentinel_kwargs={
                    "socket_timeout": timeout,
                    "socket_connect_timeout": timeout,
                    "retry": Retry(NoBackoff(), 0),
                },
            )
            client = self._sentinel.master_for(
                self.master_name,
                connection_pool_class=_blocking_sentinel_pool(),
                db=db,
                max_connections=max_connections,
                timeout=timeout,
                **common,
            )
            self._pool = client.connection_pool
            return cast("Redis", client)
        host, port = self._seeds[0]
        self._pool = BlockingConnectionPool(
            host=host,
            port=port,
            db=db,
            max_connections=max_connections,
            timeout=timeout,
            **common,
        )
        # The client owns the pool and closes it in aclose().
        return Redis.from_pool(self._pool)

    @property
    def up(self) -> bool:
        """False while Redis is considered unreachable (callers use their fallback)."""
        return self._up

    async def execute(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` with the deadline; RedisUnavailable on any failure."""
        if not self._up:
            raise RedisUnavailable("redis is down")
        try:
            # asyncio.timeout is wait_for's deadline without the extra Task per call.
            async with asyncio.timeout(self.timeout):
                if self._gate is None:
                    return await fn(*args, **kwargs)
                async with self._gate:
                    return await fn(*args, **kwargs)
        except self._call_errors as exc:
            self._failed(exc)
            raise RedisUnavailable(type(exc).__name__) from exc

    async def check(self) -> bool:
        """PING once (e.g. at start-up, to log which backend is live).

        A cluster's topology is discovered first, with a longer deadline
        than a call's, so the first requests do not pay for it."""
        if self.mode == "cluster" and self._up:
            try:
                async with asyncio.timeout(max(self.timeout, _DISCOVERY_TIMEOUT)):
                    await self.client.initialize()
            except self._call_errors as exc:
                self._failed(exc)
                return False
        try:
            await self.execute(self.client.ping)
        except RedisUnavailable:
            return False
        return True

    @debug.closes("redis_connections")
    async def close(self) -> None:
        """Stop the probe and close every socket. Later calls fall back."""
        self._closed = True
        self._up = False
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.cancel()
            try:
                await probe
            except asyncio.CancelledError:
                pass
        try:
            await self.client.aclose()
            if self._sentinel is not None:
                await self._sentinel.aclose()
        except self._call_errors:
            pass

    # -- health -----------------------------------------------------------

    def _count_error(self) -> None:
        try:
            self._on_error()
        except Exception:  # a metrics hiccup must never reach a request
            self._log.exception("redis error counter failed")

    def _failed(self, exc: BaseException) -> None:
        self._count_error()
        if isinstance(exc, self._busy_error):
            return  # every socket in use: this call falls back, Redis is fine
        if isinstance(exc, self._reply_errors) and not isinstance(exc, self._outage_replies):
            now = time.monotonic()
            if now - self._last_reply_error_log >= _REPLY_ERROR_LOG_INTERVAL:
                self._last_reply_error_log = now
                self._log.warning(
                    "redis %s replied with an error (%s); that call used memory",
                    self.where, self._describe(exc),
                )
            return
        if not self._up or self._closed:
            return
        self._up = False
        self._log.warning(
            "redis %s unavailable (%s); using in-memory backends until it returns",
            self.where, self._describe(exc),
        )
        self._probe = asyncio.get_running_loop().create_task(
            self._probe_until_up(), name="relay-redis-probe"
        )

    def _describe(self, exc: BaseException) -> str:
        text = str(exc) or f"no answer within {self.timeout}s"
        if self._password:
            text = text.replace(self._password, "***")
        return f"{type(exc).__name__}: {text}"[:300]

    async def _forget_sockets(self) -> None:
        """Idle sockets point at a server that went away (or a master that was
        demoted, or a node that lost its slots); drop them so the first calls
        after recovery do not trip over stale connections. A cluster client
        also forgets its slot table and rediscovers it from the seeds."""
        try:
            async with asyncio.timeout(self.timeout):
                if self._pool is not None:
                    await self._pool.disconnect(inuse_connections=False)
                else:
                    await self.client.aclose()
        except self._call_errors:
            pass

    async def _ping(self) -> None:
        if self.mode == "cluster":
            # Rediscovery (a no-op when the slot table is current) gets more
            # time than a call; the PING after it (every node) does not.
            async with asyncio.timeout(max(self.timeout, _DISCOVERY_TIMEOUT)):
                await self.client.initialize()
        async with asyncio.timeout(self.timeout):
            await self.client.ping()

    def _serving(self) -> str:
        """Where the data lives now, for the recovery log line."""
        if self.mode == "sentinel" and self._pool is not None:
            master = getattr(self._pool, "master_address", None)
            if master:
                return f" (master at {master[0]}:{master[1]})"
        return ""

    @debug.during("tasks")
    async def _probe_until_up(self) -> None:
        await self._forget_sockets()
        while not self._closed:
            await asyncio.sleep(self.probe_interval)
            try:
                await self._ping()
            except self._call_errors:
                self._count_error()
                continue
            if self._closed:
                return
            self._up = True
            self._probe = None
            self._log.info("redis %s is back%s; using it again", self.where, self._serving())
            return
