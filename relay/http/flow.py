"""Flow control for one transport, shared by the client and upstream protocols.

asyncio reports a full write buffer with ``pause_writing()`` and a drained
one with ``resume_writing()``; a proxy turns that into back-pressure on
whoever produces the bytes (uvicorn ``flow_control.py``, aiohttp
``base_protocol.py``): the client's full buffer pauses the upstream
connection's reading, and a writer can ``await drain()``. Every flag here is
idempotent, so the transport is paused or resumed at most once per change,
and :meth:`FlowControl.lost_connection` wakes everyone at once: after the connection is
gone, writes are dropped and nobody may wait for a drain that never comes.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

__all__ = ["FlowControl", "FlowListener"]


class FlowListener(Protocol):
    """Whoever feeds this connection's writes (the other side of the proxy)."""

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


class FlowControl:
    """Reading and writing pause state of one transport, and its drain waiters."""

    __slots__ = ("_loop", "_transport", "_waiter", "listener", "lost", "reading_paused", "writing_paused")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[None] | None = None
        # Paused and resumed with this connection's write buffer.
        self.listener: FlowListener | None = None
        self.lost = False
        self.reading_paused = False
        self.writing_paused = False

    def attach(self, transport: asyncio.Transport) -> None:
        self._transport = transport

    # -- reading: this side holds back its peer --
    def pause_reading(self) -> bool:
        """Stop reading the socket; False if it was already paused or is gone."""
        transport = self._transport
        if self.reading_paused or self.lost or transport is None:
            return False
        self.reading_paused = True
        transport.pause_reading()
        return True

    def resume_reading(self) -> bool:
        """Read the socket again; False if it was not paused or is gone."""
        transport = self._transport
        if not self.reading_paused or self.lost or transport is None:
            return False
        self.reading_paused = False
        transport.resume_reading()
        return True

    # -- writing: the transport's buffer holds back the producer --
    def pause_writing(self) -> None:
        self.writing_paused = True
        listener = self.listener
        if listener is not None:
            listener.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        listener = self.listener
        if listener is not None:
            listener.resume_reading()
        self._wake()

    async def drain(self) -> None:
        """Wait while the write buffer is above its high-water mark."""
        if not self.writing_paused or self.lost:
            return
        waiter = self._waiter
        if waiter is None:
            waiter = self._waiter = self._loop.create_future()
        await waiter

    def lost_connection(self) -> None:
        """The connection is gone: release the producer and every drain waiter."""
        if self.lost:
            return
        self.lost = True
        listener = self.listener
        if self.writing_paused and listener is not None:
            listener.resume_reading()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)
