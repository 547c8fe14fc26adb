"""Response cache: the stored entry and the memory and Redis backends.

Identical misses in flight are sent upstream once by the coalescer
(relay/features/coalescer.py).

Both backends share one async API (``get(key)`` / ``set(key, entry)``);
keys are the 32-byte digests from ``relay._fast.cache_key``. The memory
backend never awaits and also offers ``get_nowait`` for the hot path. The
Redis backend degrades to a memory fallback whenever the connection is down
or a call fails (see ``relay.redisconn``), so a cache can never fail a
request: at worst it misses.
"""

from __future__ import annotations

import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

from relay.http.protocol import HOP_BY_HOP
from relay.redisconn import RedisConnection, RedisUnavailable

__all__ = [
    "CacheEntry",
    "PER_CALLER_HEADERS",
    "USAGE_HEADER",
    "MemoryCache",
    "RedisCache",
    "replay_headers",
    "shared_headers",
]

Headers = tuple[tuple[bytes, bytes], ...]

# Response headers that belong to the one caller whose request produced the
# response: session cookies and authentication state. They never reach
# another caller, neither from the cache nor as a coalesced follower.
# (WWW-Authenticate and Proxy-Authenticate answer that caller's credentials;
# Proxy-Authenticate is hop-by-hop anyway.)
PER_CALLER_HEADERS = frozenset(
    {
        b"set-cookie",
        b"set-cookie2",
        b"authentication-info",
        b"proxy-authentication-info",
        b"www-authenticate",
    }
)

# Internal header that keeps a cached response's usage beside it (see
# relay.accounting.recorder); stored, never sent.
USAGE_HEADER = b"x-relay-usage"

# Never replayed from the cache: hop-by-hop headers (RFC 9110 7.6.1), the
# framing the server recomputes for the replay, per-caller headers and
# relay's own marker, which the server sets.
_DROPPED_HEADERS = HOP_BY_HOP | PER_CALLER_HEADERS | {b"x-relay-cache", b"content-encoding"}


def shared_headers(headers: Headers) -> Headers:
    """``headers`` without :data:`PER_CALLER_HEADERS` (for another caller)."""
    for name, _ in headers:
        if name.lower() in PER_CALLER_HEADERS:
            return tuple(pair for pair in headers if pair[0].lower() not in PER_CALLER_HEADERS)
    return headers


def replay_headers(headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    """The subset of upstream response headers worth storing in a CacheEntry.

    Drops hop-by-hop headers (also those a ``Connection`` header names),
    Content-Length / Transfer-Encoding, the per-caller headers, X-Relay-Cache
    and Content-Encoding (entries are stored decoded, as identity).
    """
    headers = tuple(headers)
    dropped = _DROPPED_HEADERS
    for name, value in headers:
        if name.lower() == b"connection":
            named = {t.strip().lower() for t in value.split(b",") if t.strip()}
            if named:
                dropped = dropped | named
    return tuple((n, v) for n, v in headers if n.lower() not in dropped)


# -- the stored entry -------------------------------------------------------

# 2: bodies are stored decoded (identity); a version-1 entry may hold a body
# in a Content-Encoding some client did not accept, so it reads as a miss.
_FORMAT_VERSION = 2
_FLAG_STREAMED = 0x01
# version, flags, status, created (wall-clock seconds), header count
_HEAD = struct.Struct(">BBHdH")
_HEADER = struct.Struct(">HI")  # name length, value length
_BODY = struct.Struct(">Q")
# Rough per-entry bookkeeping cost (objects, dict slot), so that many tiny
# entries still count against MemoryCache.max_bytes.
_ENTRY_OVERHEAD = 256


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """A cached response, replayable byte for byte.

    ``headers`` are already filtered with ``replay_headers``. ``body`` is the
    de-chunked body; for a streamed response it is the complete event stream
    as the client received it, and ``streamed`` tells the server to replay it
    as a stream again. ``created`` is wall-clock time (``time.time()``), not
    monotonic, because Redis entries are read by other processes and hosts.

    Derived once, at the first hit, so a hit does not redo it (and an entry
    never hit costs no memory for it): :attr:`head`, the header lines as
    sent (``Name: value\r\n`` each, the internal usage header left out).
    ``usage`` is where the reader of :attr:`usage_value` keeps what it made
    of it.
    """

    status: int
    headers: Headers
    body: bytes
    streamed: bool
    created: float
    rendered: bytes | None = field(init=False, default=None, repr=False, compare=False)
    usage: Any = field(init=False, default=None, repr=False, compare=False)

    @property
    def head(self) -> bytes:
        """The header lines as a hit sends them, rendered once."""
        head = self.rendered
        if head is None:
            head = b"".join(
                [b"%s: %s\r\n" % pair for pair in self.headers if pair[0] != USAGE_HEADER]
            )
            # Frozen otherwise: a derived value, set once.
            object.__setattr__(self, "rendered", head)
        return head

    @property
    def usage_value(self) -> bytes | None:
        """The internal usage header's value, None without one."""
        for name, value in self.headers:
            if name == USAGE_HEADER:
                return value
        return None

    def keep_usage(self, usage: Any) -> None:
        """Remember what ``usage_value`` reads as (the entry is immutable otherwise)."""
        object.__setattr__(self, "usage", usage)

    @property
    def size(self) -> int:
        """Approximate memory footprint, used for MemoryCache's byte bound."""
        size = _ENTRY_OVERHEAD + len(self.body)
        for name, value in self.headers:  # a loop: no generator per store
            size += len(name) + len(value) + 64
        return size

    def to_bytes(self) -> bytes:
        """Compact, versioned, length-prefixed encoding (see ``from_bytes``)."""
        parts = [
            _HEAD.pack(
                _FORMAT_VERSION,
                _FLAG_STREAMED if self.streamed else 0,
                self.status,
                self.created,
                len(self.headers),
            )
        ]
        for name, value in self.headers:
            parts.append(_HEADER.pack(len(name), len(value)))
            parts.append(name)
            parts.append(value)
        parts.append(_BODY.pack(len(self.body)))
        parts.append(self.body)
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> CacheEntry | None:
        """Decode ``to_bytes`` output; None for anything else (never raises).

        A stored value may be truncated, from a future format version or not
        ours at all (a shared Redis): all of that is a cache miss.
        """
        try:
            view = memoryview(data)
            version, flags, status, created, count = _HEAD.unpack_from(view, 0)
            if version != _FORMAT_VERSION or flags & ~_FLAG_STREAMED or not 100 <= status <= 999:
                return None
            pos = _HEAD.size
            headers = []
            for _ in range(count):
                name_len, value_len = _HEADER.unpack_from(view, pos)
                pos += _HEADER.size
                end = pos + name_len + value_len
                if end > len(view):
                    return None
                headers.append((bytes(view[pos:pos + name_len]), bytes(view[pos + name_len:end])))
                pos = end
            (body_len,) = _BODY.unpack_from(view, pos)
            pos += _BODY.size
            if pos + body_len != len(view):
                return None
            return cls(
                status=status,
                headers=tuple(headers),
                body=bytes(view[pos:]),
                streamed=bool(flags & _FLAG_STREAMED),
                created=created,
            )
        except (struct.error, TypeError, ValueError, OverflowError):
            return None


# -- memory backend ---------------------------------------------------------

# How many distinct header pairs a MemoryCache keeps one shared copy of.
_SHARED_PAIRS = 4096


class MemoryCache:
    """In-process LRU bounded by entry count and total bytes, with a TTL.

    Expiry is checked on ``get`` (an expired entry is removed then); LRU
    eviction on ``set`` keeps both bounds. An entry larger than ``max_bytes``
    on its own is not stored. ``ttl <= 0`` disables storing altogether.
    The async methods never await: they exist so both backends look alike.
    """

    def __init__(
        self,
        max_entries: int = 10000,
        max_bytes: int = 256 * 1024 * 1024,
        ttl: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl = ttl
        self._clock = clock
        # key -> (expires_at, entry, accounted size)
        self._data: OrderedDict[bytes, tuple[float, CacheEntry, int]] = OrderedDict()
        self._bytes = 0
        # (name, value) -> the one copy of that header entries share: most
        # responses carry the same few headers, and a full cache would
        # otherwise hold as many copies of each as it has entries (about
        # half of a small entry's memory). Emptied when full, so headers
        # unique to each response cannot make it grow without bound.
        self._pairs: dict[tuple[bytes, bytes], tuple[bytes, bytes]] = {}

    def __len__(self) -> int:
        return len(self._data)

    @property
    def nbytes(self) -> int:
        """Bytes currently accounted against ``max_bytes``."""
        return self._bytes

    def get_nowait(self, key: bytes) -> CacheEntry | None:
        item = self._data.get(key)
        if item is None:
            return None
        if item[0] <= self._clock():
            del self._data[key]
            self._bytes -= item[2]
            return None
        self._data.move_to_end(key)
        return item[1]

    def set_nowait(self, key: bytes, entry: CacheEntry) -> None:
        size = entry.size + len(key)
        old = self._data.pop(key, None)
        if old is not None:
            self._bytes -= old[2]
        if self.ttl <= 0 or size > self.max_bytes or self.max_entries <= 0:
            return
        data = self._data
        while data and (len(data) >= self.max_entries or self._bytes + size > self.max_bytes):
            _, (_, _, evicted) = data.popitem(last=False)
            self._bytes -= evicted
        pairs = self._pairs
        if len(pairs) >= _SHARED_PAIRS:
            pairs.clear()
        headers = tuple([pairs.setdefault(pair, pair) for pair in entry.headers])
        entry = CacheEntry(entry.status, headers, entry.body, entry.streamed, entry.created)
        data[key] = (self._clock() + self.ttl, entry, size)
        self._bytes += size

    async def get(self, key: bytes) -> CacheEntry | None:
        return self.get_nowait(key)

    async def set(self, key: bytes, entry: CacheEntry) -> None:
        self.set_nowait(key, entry)

    def delete(self, key: bytes) -> None:
        old = self._data.pop(key, None)
        if old is not None:
            self._bytes -= old[2]

    def clear(self) -> None:
        self._data.clear()
        self._bytes = 0


# -- Redis backend ----------------------------------------------------------


class RedisCache:
    """Shared cache in Redis (``GET`` / ``SET PX``), memory fallback when down.

    While the connection is down (or a call fails) reads and writes go to
    ``fallback``; entries written there are not copied to Redis later, they
    simply age out. A hit touches only the backend that answered.
    """

    def __init__(
        self,
        conn: RedisConnection,
        ttl: float,
        prefix: str = "relay:cache:",
        fallback: MemoryCache | None = None,
    ) -> None:
        self.conn = conn
        self.ttl = ttl
        self.prefix = prefix.encode()
        self.fallback = fallback if fallback is not None else MemoryCache(ttl=ttl)
        # Precomputed once: no per-request conversions. PX keeps sub-second TTLs.
        self._ttl_ms = max(1, int(ttl * 1000))

    async def get(self, key: bytes) -> CacheEntry | None:
        conn = self.conn
        if conn.up:
            try:
                data = await conn.execute(conn.client.get, self.prefix + key)
            except RedisUnavailable:
                return self.fallback.get_nowait(key)
            # decode_responses is off: Redis hands back bytes.
            return None if data is None else CacheEntry.from_bytes(cast(bytes, data))
        return self.fallback.get_nowait(key)

    async def set(self, key: bytes, entry: CacheEntry) -> None:
        if self.ttl <= 0:
            return
        conn = self.conn
        if conn.up:
            try:
                await conn.execute(
                    conn.client.set, self.prefix + key, entry.to_bytes(), px=self._ttl_ms
                )
                return
            except RedisUnavailable:
                pass
        self.fallback.set_nowait(key, entry)
