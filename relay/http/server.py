"""Listening sockets, connection bookkeeping and the graceful drain.

One :class:`RelayServer` per process. With ``server.workers > 1`` every
worker process binds its own socket with ``SO_REUSEPORT`` and the kernel
spreads connections across them.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import cast

from .protocol import ClientConnection, ConnectionLimits, Handler

__all__ = ["RelayServer", "bind_socket"]

log = logging.getLogger("relay")


def bind_socket(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    """A listening TCP socket; ``host`` "" means every interface (IPv4 and IPv6)."""
    # An ASCII host goes as bytes: a str one is passed through the idna
    # codec, whose modules (unicodedata, stringprep) a worker keeps for life.
    infos = socket.getaddrinfo(
        (host.encode() if host.isascii() else host) or None,
        port,
        type=socket.SOCK_STREAM,
        flags=socket.AI_PASSIVE,
    )
    # Prefer a dual-stack IPv6 socket for "all interfaces", else the first address.
    family, _, _, _, address = infos[0]
    if not host and socket.has_ipv6:
        family, address = socket.AF_INET6, ("::", port, 0, 0)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if not host else 1)
        sock.bind(address)
        sock.listen(2048)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class RelayServer:
    """Accepts client connections and drains them on shutdown."""

    def __init__(
        self,
        handler: Handler,
        limits: ConnectionLimits,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._handler = handler
        self.limits = limits
        self._loop = loop
        self._server: asyncio.Server | None = None
        self.connections: set[ClientConnection] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    def _make_protocol(self) -> asyncio.Protocol:
        # A protocol by its methods (the compiled twin is a cdef class and
        # cannot subclass asyncio.Protocol), as uvloop takes it.
        return cast(asyncio.Protocol, ClientConnection(
            self._handler, self.limits, self.connections, self._loop, self.tasks
        ))

    async def start(self, sock: socket.socket) -> None:
        self._server = await self._loop.create_server(self._make_protocol, sock=sock)

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        name = self._server.sockets[0].getsockname()
        return name[0], name[1]

    def set_limits(self, limits: ConnectionLimits) -> None:
        """New connections get reloaded limits; open ones keep theirs."""
        self.limits = limits

    async def drain(self, timeout: float) -> bool:
        """Stop accepting, let in-flight requests (streams too) finish.

        Idle keep-alive connections are closed at once; busy ones close after
        their current response. Returns False when *timeout* ran out and the
        remaining connections were cut.
        """
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.shutdown()
        deadline = self._loop.time() + timeout
        while (self.connections or self.tasks) and self._loop.time() < deadline:
            await asyncio.sleep(0.05)
        clean = not self.connections and not self.tasks
        for conn in list(self.connections):
            conn.abort()
        for task in list(self.tasks):
            task.cancel()
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            except TimeoutError:
                pass
        return clean
