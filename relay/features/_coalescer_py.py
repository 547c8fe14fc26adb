"""Request coalescing: identical in-flight misses go upstream once.

The first request of a key leads (:class:`Leader`): it goes upstream and
publishes the response as it arrives. Requests of the same key that come
while it is in flight follow (:class:`Follower`): they relay the leader's
bytes to their own clients instead of asking the upstream again.
"""

from __future__ import annotations

import asyncio

from relay import debug

__all__ = ["OPEN", "Coalescer", "FlightAborted", "Follower", "Leader"]

Headers = tuple[tuple[bytes, bytes], ...]


class FlightAborted(Exception):
    """The shared response broke off after this follower began relaying it.

    The follower has already sent the head (and maybe some of the body) to
    its client, so it cannot start over: end the client's response the way
    an upstream failing mid-stream would be ended.
    """


# The states of a flight.
OPEN, DONE, FAILED = 0, 1, 2
# Debug mode counts flights and followers from their __init__: a decorator
# never wraps the compiled twin's, which is its type's init slot.
_DEBUG = debug.ENABLED


def _pos(follower: Follower) -> int:
    return follower.pos


class Leader:
    """Ticket of the request that fetches upstream for everyone, and the
    shared state of that fetch (its flight) that followers read.

    Publish what the client is sent: ``start(status, headers)`` once, then
    ``chunk(data)`` per body piece, then ``finish()``; or ``fail()`` at any
    point (upstream error, or the response will not be cached, e.g. not
    2xx). Always call ``close()`` (in a ``finally``): it ends the flight
    and fails it if it was neither finished nor failed. None of these await.
    A flight nobody follows costs this one object and its dict slot: the
    follower bookkeeping (event, set of started followers) is made by the
    first follower that needs it.
    """

    is_leader = True
    __slots__ = (
        "_coalescer", "key", "cap", "head", "chunks", "base", "retained", "total",
        "state", "overflowed", "event", "started", "joined",
    )

    def __init__(self, coalescer: Coalescer, key: bytes, cap: int) -> None:
        self._coalescer = coalescer
        self.key = key
        self.cap = cap
        self.head: tuple[int, Headers] | None = None
        self.chunks: list[bytes] = []  # chunks[i] is chunk number base + i
        self.base = 0
        self.retained = 0  # bytes held in chunks
        self.total = 0  # bytes published so far
        self.state = OPEN
        self.overflowed = False
        self.event: asyncio.Event | None = None
        self.started: set[Follower] | None = None  # followers relaying the body
        self.joined = 0  # followers not yet closed
        if _DEBUG:
            debug.counters.open("flights", self)

    @property
    def followers(self) -> int:
        """Followers currently attached (e.g. to keep reading upstream for them
        after the leader's own client went away)."""
        return self.joined

    def start(self, status: int, headers: Headers) -> None:
        if self.state != OPEN or self.head is not None:
            return
        self.head = (status, headers)
        if self.event is not None:  # someone waits
            self._notify()

    def chunk(self, data: bytes) -> None:
        if self.state != OPEN or self.head is None or not data:
            return
        self.total += len(data)
        if not self.overflowed and self.total > self.cap:
            self.overflowed = True
            self._coalescer._detach(self)
        self.chunks.append(data)
        self.retained += len(data)
        if self.overflowed:
            self._trim()
        if self.event is not None:
            self._notify()

    def finish(self) -> None:
        """The response is complete. Late joiners still replay it until close()."""
        if self.state != OPEN:
            return
        if self.head is None:
            self.fail()
            return
        self.state = DONE
        if self.event is not None:
            self._notify()

    def fail(self) -> None:
        if self.state != OPEN:
            return
        self.state = FAILED
        self._coalescer._detach(self)
        self._notify()

    @debug.closes("flights")
    def close(self) -> None:
        if self.state == OPEN:
            self.fail()
        self._coalescer._detach(self)

    def __repr__(self) -> str:
        return f"<Leader state={self.state} followers={self.joined} total={self.total}>"

    def _debug_buffers(self) -> dict[str, int]:
        return {"flight_bytes": self.retained}

    # -- what followers use -------------------------------------------------
    def _notify(self) -> None:
        # Pulse: wake every current waiter; each re-checks the state. Every
        # waiter has its own future inside Event.wait(), so one follower
        # being cancelled cannot cancel the others.
        event = self.event
        if event is not None:
            event.set()
            event.clear()

    async def _wait(self) -> None:
        if self.event is None:
            self.event = asyncio.Event()
        await self.event.wait()

    def _trim(self) -> None:
        """After an overflow keep only chunks some started follower still needs."""
        started = self.started
        if not started:
            drop = len(self.chunks)
        else:
            drop = min(f.pos for f in started) - self.base
        if drop > 0:
            self.retained -= sum(len(c) for c in self.chunks[:drop])
            del self.chunks[:drop]
            self.base += drop
        # A follower whose client lags more than cap bytes behind would make
        # the buffer unbounded: cut the slowest ones loose.
        while self.retained > self.cap and started:
            slowest = min(started, key=_pos)
            slowest.aborted = True
            started.discard(slowest)
            self._trim()


class Follower:
    """Ticket of a request that waits for the leader's response.

    ``await head()`` gives ``(status, headers)`` or None, meaning "make your
    own upstream request" (the leader failed, the response is not cacheable
    or it outgrew the buffer before this follower started). After a head,
    iterate (``async for chunk in follower`` or ``next_chunk()``) to get the
    body chunks in order; the iteration ends when the response is complete
    and raises FlightAborted if it breaks off. Always call ``close()``.
    """

    is_leader = False
    __slots__ = ("_flight", "pos", "aborted", "_closed", "__weakref__")

    def __init__(self, flight: Leader) -> None:
        self._flight = flight
        self.pos = 0  # number of the next chunk to hand out
        self.aborted = False
        self._closed = False
        flight.joined += 1
        if _DEBUG:
            debug.counters.open("followers", self)

    @property
    def key(self) -> bytes:
        return self._flight.key

    async def head(self) -> tuple[int, Headers] | None:
        flight = self._flight
        while True:
            if flight.state == FAILED or flight.overflowed:
                return None
            if flight.head is not None:
                # Not overflowed, so nothing was trimmed: start at chunk 0.
                self.pos = flight.base
                if flight.started is None:
                    flight.started = set()
                flight.started.add(self)
                return flight.head
            await flight._wait()

    async def next_chunk(self) -> bytes | None:
        """The next body chunk, or None when the response is complete."""
        flight = self._flight
        while True:
            if self.aborted:
                raise FlightAborted(self._flight.key.decode(errors="replace"))
            index = self.pos - flight.base
            if index < len(flight.chunks):
                data = flight.chunks[index]
                self.pos += 1
                if flight.overflowed:
                    flight._trim()
                return data
            if flight.state == DONE:
                return None
            if flight.state == FAILED:
                raise FlightAborted(self._flight.key.decode(errors="replace"))
            await flight._wait()

    def __repr__(self) -> str:
        return f"<Follower pos={self.pos} aborted={self.aborted} flight_state={self._flight.state}>"

    def _debug_buffers(self) -> dict[str, int]:
        flight = self._flight
        pending = flight.chunks[max(0, self.pos - flight.base):]
        return {"follower_pending_bytes": sum(map(len, pending))}

    def __aiter__(self) -> Follower:
        return self

    async def __anext__(self) -> bytes:
        data = await self.next_chunk()
        if data is None:
            raise StopAsyncIteration
        return data

    @debug.closes("followers")
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        flight = self._flight
        flight.joined -= 1
        started = flight.started
        if started is not None and self in started:
            started.discard(self)
            if flight.overflowed:
                flight._trim()


class Coalescer:
    """Sends identical misses that are in flight at the same time upstream once.

    ``join(key)`` returns a Leader for the first request of a key and a
    Follower for every further one until the leader closes (or the body
    outgrows ``max_body_bytes``, the same cap as the cache's: such a
    response is not cacheable, so later requests go upstream on their own).
    Per process; the buffer of a flight is bounded by ``max_body_bytes``.
    """

    def __init__(self, max_body_bytes: int = 1048576) -> None:
        self.max_body_bytes = max_body_bytes
        self._flights: dict[bytes, Leader] = {}

    def __len__(self) -> int:
        return len(self._flights)

    def join(self, key: bytes) -> Leader | Follower:
        flights = self._flights
        leader = flights.get(key)
        if leader is None:
            leader = flights[key] = Leader(self, key, self.max_body_bytes)
            return leader
        return Follower(leader)

    def _detach(self, leader: Leader) -> None:
        flights = self._flights
        if flights.get(leader.key) is leader:
            del flights[leader.key]
