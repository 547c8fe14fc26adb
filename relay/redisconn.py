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
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from . import debug

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["RedisConnection", "RedisUnavailable", "parse_address"]

T = TypeVar("T")

DEFAULT_PORT = 6379
# Failures that mean "use the fallback for this call". OSError and the
# builtin TimeoutError cover what escapes redis-py and our own deadline.
# redis-py is imported with the first connection: a relay without Redis does
# not pay its ~7 MB and 70 ms of import per worker.
_REPLY_ERROR_LOG_INTERVAL = 60.0


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
        max_connections: int = 16,
        probe_interval: float = 1.0,
    ) -> None:
        if timeout <= 0:
            raise ValueError("redis timeout must be positive")
        from redis.asyncio import BlockingConnectionPool, Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import RedisError, ResponseError

        self._call_errors: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
        self._reply_error: type[BaseException] = ResponseError
        host, port = parse_address(address)
        self.where = f"{host}:{port}"  # for logs: never carries the password
        self.timeout = timeout
        self.probe_interval = probe_interval
        self._password = password
        self._on_error = on_error or _noop
        self._log = logger or logging.getLogger("relay.redis")
        # No retries inside redis-py: a failed call falls back at once and the
        # probe decides when Redis is usable again. A blocking pool makes a
        # burst of requests queue (within the same deadline) for one of a few
        # sockets instead of failing with "Too many connections".
        self._pool = BlockingConnectionPool(
            host=host,
            port=port,
            db=db,
            password=password or None,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            max_connections=max_connections,
            timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        # The client owns the pool and closes it in aclose().
        self.client: Redis = Redis.from_pool(self._pool)
        self._up = True
        self._closed = False
        self._probe: asyncio.Task[None] | None = None
        self._last_reply_error_log = -_REPLY_ERROR_LOG_INTERVAL

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
                return await fn(*args, **kwargs)
        except self._call_errors as exc:
            self._failed(exc)
            raise RedisUnavailable(type(exc).__name__) from exc

    async def check(self) -> bool:
        """PING once (e.g. at start-up, to log which backend is live)."""
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
        if isinstance(exc, self._reply_error):
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

    @debug.during("tasks")
    async def _probe_until_up(self) -> None:
        # Idle sockets point at a server that went away; drop them so the
        # first calls after recovery do not trip over stale connections.
        try:
            async with asyncio.timeout(self.timeout):
                await self._pool.disconnect(inuse_connections=False)
        except self._call_errors:
            pass
        while not self._closed:
            await asyncio.sleep(self.probe_interval)
            try:
                async with asyncio.timeout(self.timeout):
                    await self.client.ping()
            except self._call_errors:
                self._count_error()
                continue
            if self._closed:
                return
            self._up = True
            self._probe = None
            self._log.info("redis %s is back; using it again", self.where)
            return
