"""Debug mode: counts of what relay holds open, so a leak shows as a number.

``RELAY_DEBUG=1`` (anything but "" or "0"), read once when this module is
first imported, turns it on for the process; it is off by default. The idea
is uvloop's ``UVLOOP_DEBUG`` build: every object that must be released
(a client or upstream connection, a request being served, an exchange, a
coalesced flight or follower, a background task, a Redis connection, a
gateway) is registered when it opens and removed when it closes, and
:func:`snapshot` reports how many of each are open and how many bytes the
open ones hold in buffers. The test suite runs with debug mode on and checks
after every test that everything went back to zero.

Off, this module costs nothing per request: the decorators below are
applied when a class is defined and hand the method back untouched, so the
methods relay runs are exactly the ones it would run without this module.
On, each decorated method also updates the registry (under a lock: the
tests run several relays in threads of one process).

:data:`counters` is the one piece of mutable module-level state in relay,
and deliberately so (uvloop keeps its debug counters the same way): leaks
are found across every owner at once (servers, runtimes, pools, loops,
threads) and a count per owner could not see an object whose owner is
gone. It is a registry for diagnosis, never read by the request path.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, Final, TypeVar, cast

__all__ = [
    "BUFFERS",
    "ENABLED",
    "KINDS",
    "DebugRegistry",
    "closes",
    "counters",
    "during",
    "log_at_stop",
    "opens",
    "report",
    "snapshot",
    "spawns",
]

ENABLED: Final[bool] = os.environ.get("RELAY_DEBUG", "") not in ("", "0")

# What is counted, open to close.
KINDS: Final = (
    "gateways",              # Gateway created .. stopped
    "client_connections",    # accepted .. connection lost
    "requests",              # a client request being served (its task running)
    "exchanges",             # an upstream exchange .. its outcome settled
    "upstream_connections",  # connected .. connection lost (pooled and in use)
    "upstream_pools",        # created .. closed with every connection slot given back
    "redis_connections",     # created .. closed
    "key_services",          # virtual keys: a service and its store, created .. closed
    "tasks",                 # relay's background tasks (Runtime.spawn, usage sender,
                             # Redis probe, key service tasks and refresher)
    "flights",               # a coalesced miss's leader .. closed
    "followers",             # a coalesced follower .. closed
)

# What the open objects hold, summed over them at snapshot time.
BUFFERS: Final = (
    "client_queued_requests",       # pipelined requests waiting for their turn
    "client_body_bytes",            # request bodies being read
    "client_held_bytes",            # response writes collected by hold()
    "client_write_buffer_bytes",    # in the client transports' write buffers
    "upstream_write_buffer_bytes",  # in the upstream transports' write buffers
    "upstream_pool_waiters",        # requests waiting for a free connection slot
    "flight_bytes",                 # response chunks kept by coalesced flights
    "follower_pending_bytes",       # chunks followers have yet to relay
)

F = TypeVar("F", bound=Callable[..., Any])


class _Call:
    """One run of a counted coroutine (a request served, a background send)."""

    __slots__ = ("name", "owner", "started")

    def __init__(self, name: str, owner: object) -> None:
        self.name = name
        self.owner = owner
        self.started = time.monotonic()

    def __repr__(self) -> str:
        age = time.monotonic() - self.started
        return f"<{self.name} of {self.owner!r}, running for {age:.1f}s>"


class DebugRegistry:
    """What is open right now, by kind; the objects are held until closed.

    Holding them (not weak references) is the point: an object dropped
    without being closed stays counted, which is what a leak is.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[str, dict[int, object]] = {kind: {} for kind in KINDS}
        self.opened: dict[str, int] = dict.fromkeys(KINDS, 0)  # totals since reset

    def open(self, kind: str, obj: object) -> None:
        with self._lock:
            self._open[kind][id(obj)] = obj
            self.opened[kind] += 1

    def close(self, kind: str, obj: object) -> None:
        """Idempotent: a second close (or one of an object never opened) does nothing."""
        with self._lock:
            self._open[kind].pop(id(obj), None)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {kind: len(objs) for kind, objs in self._open.items()}

    def buffers(self) -> dict[str, int]:
        """Bytes (and queue entries) the open objects hold."""
        with self._lock:
            holders = [obj for objs in self._open.values() for obj in objs.values()]
        totals = dict.fromkeys(BUFFERS, 0)
        for obj in holders:
            held = getattr(obj, "_debug_buffers", None)  # what it holds, if it holds any
            if held is not None:
                for name, size in held().items():
                    totals[name] += size
        return totals

    def open_objects(self, limit: int | None = None) -> dict[str, list[str]]:
        """Descriptions of the open objects (up to *limit* per kind), by kind
        (the kinds with any)."""
        with self._lock:
            found = {
                kind: list(objs.values())[:limit] for kind, objs in self._open.items() if objs
            }
        return {kind: [repr(obj) for obj in objs] for kind, objs in found.items()}

    def snapshot(self) -> dict[str, int]:
        """Every count and buffer total, by name: all zero when nothing is open."""
        return {**self.counts(), **self.buffers()}

    def settle(self, timeout: float, interval: float = 0.02) -> dict[str, int]:
        """Poll until every count and buffer is zero or *timeout* passed;
        returns the entries that are not zero (closing is asynchronous)."""
        deadline = time.monotonic() + timeout
        while True:
            left = {name: value for name, value in self.snapshot().items() if value}
            if not left or time.monotonic() >= deadline:
                return left
            time.sleep(interval)

    def reset(self) -> None:
        """Forget every open object (after a leak was reported, so the next
        check starts clean)."""
        with self._lock:
            for objs in self._open.values():
                objs.clear()
            self.opened = dict.fromkeys(KINDS, 0)


counters: Final = DebugRegistry()


def snapshot() -> dict[str, int]:
    """The counts and buffer totals of this process (zeros when debug is off)."""
    return counters.snapshot()


def report(limit: int = 20) -> dict[str, Any]:
    """What ``GET /relay/debug`` shows: counts, buffers and up to *limit*
    descriptions of the open objects of each kind (no credentials: peers,
    paths, states)."""
    return {
        "pid": os.getpid(),
        "open": counters.counts(),
        "buffers": counters.buffers(),
        "objects": counters.open_objects(limit),
    }


async def log_at_stop(logger: logging.Logger, timeout: float = 1.0) -> None:
    """Log what is still open once a worker stopped (a warning if anything is).

    Waits up to *timeout* first: the last connections close in callbacks
    the loop runs after the drain.
    """
    deadline = time.monotonic() + timeout
    while True:
        left = {name: value for name, value in counters.snapshot().items() if value}
        if not left or time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.02)
    if left:
        logger.warning("debug: still open after the stop: %s %s", left, counters.open_objects(5))
    else:
        logger.info("debug: every connection, request, task and buffer was released")


# -- decorators: applied at class definition, identity when debug is off ------


def _check(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown debug counter {kind!r}")


def _counting(
    kind: str,
    *,
    enter: Callable[[Callable[..., Any], Any], object] | None = None,
    leave: Callable[[Any, object], None] | None = None,
    returned: Callable[[Any, Any], None] | None = None,
) -> Callable[[F], F]:
    """The one shape of every decorator here: around a method (plain or
    async), ``enter(method, self)`` runs before it and gives a token,
    ``leave(self, token)`` runs after it even when it raises, and
    ``returned(self, result)`` once it has returned. Off, the method is
    handed back untouched."""
    _check(kind)
    if not ENABLED:
        return _unchanged

    def decorate(method: F) -> F:
        if inspect.iscoroutinefunction(method):

            @functools.wraps(method)
            async def counted_async(self: object, *args: Any, **kwargs: Any) -> Any:
                token = enter(method, self) if enter is not None else None
                try:
                    result = await method(self, *args, **kwargs)
                finally:
                    if leave is not None:
                        leave(self, token)
                if returned is not None:
                    returned(self, result)
                return result

            return cast(F, counted_async)

        @functools.wraps(method)
        def counted(self: object, *args: Any, **kwargs: Any) -> Any:
            token = enter(method, self) if enter is not None else None
            try:
                result = method(self, *args, **kwargs)
            finally:
                if leave is not None:
                    leave(self, token)
            if returned is not None:
                returned(self, result)
            return result

        return cast(F, counted)

    return decorate


def opens(kind: str) -> Callable[[F], F]:
    """The decorated method opens ``self`` as one *kind* (after it returns)."""
    return _counting(kind, returned=lambda self, _: counters.open(kind, self))


def closes(kind: str, when: Callable[[Any], bool] | None = None) -> Callable[[F], F]:
    """The decorated method (plain or async) closes ``self`` as one *kind*;
    with *when*, only if ``when(self)`` holds after it."""

    def leave(self: object, _: object) -> None:
        if when is None or when(self):
            counters.close(kind, self)

    return _counting(kind, leave=leave)


def during(kind: str) -> Callable[[F], F]:
    """The decorated coroutine method counts as one open *kind* while it runs."""

    def enter(method: Callable[..., Any], self: object) -> _Call:
        call = _Call(method.__qualname__, self)
        counters.open(kind, call)
        return call

    return _counting(kind, enter=enter, leave=lambda _, call: counters.close(kind, call))


def spawns(kind: str) -> Callable[[F], F]:
    """The decorated method returns a task: it counts as *kind* until done."""

    def returned(_: object, task: asyncio.Task[Any]) -> None:
        counters.open(kind, task)
        task.add_done_callback(functools.partial(counters.close, kind))

    return _counting(kind, returned=returned)


def _unchanged(method: F) -> F:
    return method

