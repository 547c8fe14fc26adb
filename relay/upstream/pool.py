"""A keep-alive connection pool per upstream origin.

Discipline borrowed from redis-py and aiohttp: LIFO reuse (the most recently
used socket is the one least likely to have been closed by the server),
idle connections expire before a typical upstream keep-alive would close
them, a reused connection that saw stray bytes or EOF while idle is never
handed out, the wait for a new connection is bounded by ``connect_timeout``,
and a connection returns to the pool only after a complete response.

Open connections per origin (idle and busy) are bounded by
``max_connections``: at the bound a request waits for one to come free, at
most ``connect_timeout`` seconds, then fails with ``exhausted`` set (relay
answers 503).
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

from .. import debug
from .protocol import UpstreamConnection, UpstreamError

__all__ = ["Origin", "UpstreamPool", "UpstreamPools"]

# Idle sockets older than this are closed rather than reused. Servers
# close idle keep-alives on their own (Node after 5 s, nginx 75 s); their FIN
# normally reaches us first and drops the socket, and the rare race is
# covered by one retry of a request that got no byte back on a reused socket.
IDLE_EXPIRY = 30.0


@dataclass(frozen=True, slots=True)
class Origin:
    """Where an upstream lives: ``https://api.openai.com`` -> scheme, host, port."""

    scheme: str
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> Origin:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        port = parts.port or (443 if scheme == "https" else 80)
        return cls(scheme, parts.hostname, port)

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def connect_host(self) -> str | bytes:
        """The host to resolve: an ASCII one as bytes, which the loop looks up
        without the idna codec (whose modules a worker would keep for life)."""
        return self.host.encode() if self.host.isascii() else self.host

    def host_header(self) -> bytes:
        """The ``Host`` value for requests to this origin."""
        default = 443 if self.tls else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.port != default:
            host = f"{host}:{self.port}"
        return host.encode("idna") if not host.isascii() else host.encode()

    @property
    def label(self) -> str:
        """A bounded, credential-free name for metrics and logs."""
        return f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.label}"


def _drained(pool: UpstreamPool) -> bool:
    """Closed, and every connection slot given back (for relay.debug)."""
    return pool._closed and pool.open == 0


class UpstreamPool:
    """Connections to one origin."""

    @debug.opens("upstream_pools")
    def __init__(
        self,
        origin: Origin,
        loop: asyncio.AbstractEventLoop,
        *,
        pool_size: int,
        connect_timeout: float,
        read_timeout: float,
        ssl_context: ssl.SSLContext | None,
        first_byte_timeout: float | None = None,
        max_connections: int = 1 << 30,
    ) -> None:
        self.origin = origin
        self._loop = loop
        self.pool_size = pool_size
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.first_byte_timeout = read_timeout if first_byte_timeout is None else first_byte_timeout
        self.max_connections = max_connections
        self._ssl = ssl_context if origin.tls else None
        self._idle: list[UpstreamConnection] = []
        self._closed = False
        self.connections_opened = 0
        self.open = 0  # connections open or being opened (idle ones included)
        self._waiters: list[asyncio.Future[None]] = []

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    def __repr__(self) -> str:
        return (
            f"<UpstreamPool {self.origin} open={self.open} idle={len(self._idle)} "
            f"waiters={len(self._waiters)} closed={self._closed}>"
        )

    def _debug_buffers(self) -> dict[str, int]:
        return {"upstream_pool_waiters": len(self._waiters)}

    def configure(
        self,
        *,
        pool_size: int,
        connect_timeout: float,
        read_timeout: float,
        first_byte_timeout: float | None = None,
        max_connections: int = 1 << 30,
    ) -> None:
        """Apply reloaded settings; idle sockets above the new size are closed."""
        self.pool_size = pool_size
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.first_byte_timeout = read_timeout if first_byte_timeout is None else first_byte_timeout
        self.max_connections = max_connections
        while len(self._idle) > pool_size:
            self._idle.pop(0).close()

    def take_idle(self) -> UpstreamConnection | None:
        """The most recently released live connection, or None."""
        idle = self._idle
        if not idle:
            return None
        now = self._loop.time()
        while idle:
            conn = idle.pop()
            if conn.reusable and not conn.lost and now - conn.idle_since < IDLE_EXPIRY:
                conn._read_timeout = self.read_timeout
                return conn
            conn.close()
        return None

    async def acquire(self, *, fresh: bool = False) -> tuple[UpstreamConnection, bool]:
        """A connection for one exchange and whether it was reused.

        *fresh* skips the idle ones (a retry after a reused socket closed
        unanswered goes on a new connection). At ``max_connections`` the
        wait for a free slot is bounded by ``connect_timeout``.
        """
        if not fresh:
            conn = self.take_idle()
            if conn is not None:
                return conn, True
        if self.open >= self.max_connections:
            deadline = self._loop.time() + self.connect_timeout
            while self.open >= self.max_connections:
                if not fresh:
                    conn = self.take_idle()
                    if conn is not None:
                        return conn, True
                elif self._idle:
                    # A new connection is wanted and idle ones hold the slots:
                    # close the oldest (its connection_lost frees the slot).
                    self._idle.pop(0).close()
                left = deadline - self._loop.time()
                if left <= 0:
                    raise UpstreamError(
                        f"All {self.max_connections} connections to {self.origin} are busy",
                        exhausted=True,
                    )
                waiter = self._loop.create_future()
                self._waiters.append(waiter)
                try:
                    await asyncio.wait_for(waiter, left)
                except TimeoutError:
                    pass
                finally:
                    if waiter in self._waiters:
                        self._waiters.remove(waiter)
        return await self.connect(), False

    async def connect(self) -> UpstreamConnection:
        """Open a new connection, bounded by ``connect_timeout`` (TLS included)."""
        origin = self.origin
        self.open += 1
        made: list[UpstreamConnection] = []

        def factory() -> asyncio.Protocol:
            conn = UpstreamConnection(self._loop, self.read_timeout, self._closed_one)
            made.append(conn)
            # A protocol by its methods (the compiled twin is a cdef class
            # and cannot subclass asyncio.Protocol).
            return cast(asyncio.Protocol, conn)

        try:
            _, conn = await asyncio.wait_for(
                self._loop.create_connection(
                    factory,
                    # Both loops resolve bytes too; the stubs name str only.
                    cast(str, origin.connect_host),
                    origin.port,
                    ssl=self._ssl,
                    server_hostname=origin.host if self._ssl is not None else None,
                ),
                self.connect_timeout,
            )
        except BaseException as exc:
            self._abandon(made)
            if isinstance(exc, TimeoutError):
                raise UpstreamError(
                    f"Connecting to {origin} timed out", timeout=True, connect=True
                ) from None
            if isinstance(exc, ssl.SSLError):
                raise UpstreamError(
                    f"TLS handshake with {origin} failed: {exc.reason}", connect=True
                ) from None
            if isinstance(exc, OSError):
                raise UpstreamError(
                    f"Could not connect to {origin}: {exc.strerror or exc.__class__.__name__}",
                    connect=True,
                ) from None
            raise
        self.connections_opened += 1
        return cast(UpstreamConnection, conn)

    def _abandon(self, made: list[UpstreamConnection]) -> None:
        """A connect that failed or was cancelled gives its slot back once."""
        if made and made[0].transport is not None and not made[0].lost:
            made[0].close()  # its connection_lost gives the slot back
        elif made and made[0].lost:
            pass  # connection_lost already did
        else:
            for conn in made:
                conn._on_closed = None
            self._closed_one()

    @debug.closes("upstream_pools", when=_drained)
    def _closed_one(self) -> None:
        """A connection (or an attempt to open one) ended: its slot is free."""
        self.open -= 1
        self._wake()

    def _wake(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                return

    def release(self, conn: UpstreamConnection) -> None:
        """Give back a connection whose last response completed."""
        if (
            conn.reusable
            and not conn.lost
            and not self._closed
            and len(self._idle) < self.pool_size
        ):
            self._idle.append(conn)
            if self._waiters:
                self._wake()
        else:
            conn.close()

    def release_unused(self, conn: UpstreamConnection) -> None:
        """Keep a connection opened for a request that no longer needs it."""
        conn.reusable = True
        conn.idle_since = self._loop.time()
        self.release(conn)

    @debug.closes("upstream_pools", when=_drained)
    def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class UpstreamPools:
    """Every origin's pool; survives config reloads so sockets are kept."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._pools: dict[Origin, UpstreamPool] = {}
        self._ssl: ssl.SSLContext | None = None

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            # Verification on, system CAs, SNI: the defaults a client must have.
            self._ssl = ssl.create_default_context()
        return self._ssl

    def get(
        self,
        origin: Origin,
        *,
        pool_size: int,
        connect_timeout: float,
        read_timeout: float,
        first_byte_timeout: float | None = None,
        max_connections: int = 1 << 30,
    ) -> UpstreamPool:
        pool = self._pools.get(origin)
        if pool is None:
            pool = UpstreamPool(
                origin,
                self._loop,
                pool_size=pool_size,
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                ssl_context=self._ssl_context() if origin.tls else None,
                first_byte_timeout=first_byte_timeout,
                max_connections=max_connections,
            )
            self._pools[origin] = pool
        else:
            pool.configure(
                pool_size=pool_size,
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                first_byte_timeout=first_byte_timeout,
                max_connections=max_connections,
            )
        return pool

    def all(self) -> list[UpstreamPool]:
        return list(self._pools.values())

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
