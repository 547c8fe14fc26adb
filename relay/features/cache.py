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
from collections.abc import Callable, Iterable
from typing import Any, cast

from relay import _fast
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
# response (cookies, authentication state): never handed to another caller.
# Named in relay._fast, which classes them while reading a response head.
PER_CALLER_HEADERS = _fast.PER_CALLER_HEADERS

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


_UNREAD: Any = object()  # usage_value not looked up yet


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
    of it. Immutable otherwise (compared by value, never hashed).
    """

    __slots__ = (
        "status", "headers", "body", "streamed", "created", "rendered", "usage",
        "_usage_value", "expires", "_size",
    )

    def __init__(
        self, status: int, headers: Headers, body: bytes, streamed: bool, created: float
    ) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.streamed = streamed
        self.created = created
        self.rendered: bytes | None = None
        self.usage: Any = None
        self._usage_value: bytes | None = _UNREAD
        # When a MemoryCache that took it from its compact form drops it
        # (that cache's clock); 0.0 for an entry no cache holds that way.
        self.expires = 0.0
        self._size = 0

    __hash__ = None  # type: ignore[assignment]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CacheEntry):
            return NotImplemented
        return (
            self.status == other.status
            and self.headers == other.headers
            and self.body == other.body
            and self.streamed == other.streamed
            and self.created == other.created
        )

    def __repr__(self) -> str:
        return (
            f"CacheEntry(status={self.status!r}, headers={self.headers!r}, body={self.body!r}, "
            f"streamed={self.streamed!r}, created={self.created!r})"
        )

    @property
    def head(self) -> bytes:
        """The header lines as a hit sends them, rendered once."""
        head = self.rendered
        if head is None:
            head = self.rendered = b"".join(
                [b"%s: %s\r\n" % pair for pair in self.headers if pair[0] != USAGE_HEADER]
            )
        return head

    @property
    def usage_value(self) -> bytes | None:
        """The internal usage header's value, None without one."""
        value = self._usage_value
        if value is _UNREAD:
            value = None
            for name, found in self.headers:
                if name == USAGE_HEADER:
                    value = found
                    break
            self._usage_value = value
        return value

    def keep_usage(self, usage: Any) -> None:
        """Remember what ``usage_value`` reads as."""
        self.usage = usage

    @property
    def size(self) -> int:
        """Bytes a MemoryCache accounts for it, besides its key: the length of
        its compact form there plus a bookkeeping share."""
        size = self._size
        if not size:
            size = self._size = _ENTRY_OVERHEAD + len(_compact(self, 0.0))
        return size

    def to_bytes(self) -> bytes:
        """Compact, versioned, length-prefixed encoding (see ``from_bytes``)."""
        return _encode(self)

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
            return cls(status, tuple(headers), bytes(view[pos:]), bool(flags & _FLAG_STREAMED), created)
        except (struct.error, TypeError, ValueError, OverflowError):
            return None


def _encode(entry: CacheEntry, prefix: bytes = b"") -> bytes:
    """*prefix* followed by the ``to_bytes`` encoding of *entry*, one bytes object."""
    headers = entry.headers
    parts = [
        prefix,
        _HEAD.pack(
            _FORMAT_VERSION,
            _FLAG_STREAMED if entry.streamed else 0,
            entry.status,
            entry.created,
            len(headers),
        ),
    ]
    append = parts.append
    for name, value in headers:
        append(_HEADER.pack(len(name), len(value)))
        append(name)
        append(value)
    body = entry.body
    append(_BODY.pack(len(body)))
    append(body)
    return b"".join(parts)


# -- memory backend ---------------------------------------------------------

# The compact form of an entry in a MemoryCache: one bytes object, so that
# an entry costs its key and that object, no per-entry tuples or lists, and
# allocations of about the size of the bodies they hold (an allocator
# churned by evictions stays unfragmented). It is
#   expires (the cache's clock), created, status, flags, usage and head lengths,
#   the usage value, the head as a hit sends it, the body;
# or, for headers whose rendered lines would not read back the same (a name
# or value holding ": " or CRLF, the usage header elsewhere than last),
#   expires, then the to_bytes encoding (_COMPACT_ENCODED).
_COMPACT = struct.Struct("=ddHBHI")
_COMPACT_STREAMED = 0x01
_COMPACT_USAGE = 0x02
_COMPACT_ENCODED = 0x04
_EXPIRES = struct.Struct("=d")  # the first field of both: read without the rest
# Rough per-entry bookkeeping cost (table slot, object headers, allocator),
# so that many tiny entries still count against MemoryCache.max_bytes.
_ENTRY_OVERHEAD = 256


def _compact(entry: CacheEntry, expires: float) -> bytes:
    """The compact form of *entry* (see _COMPACT)."""
    headers = entry.headers
    usage = None
    if headers and headers[-1][0] == USAGE_HEADER:
        usage = headers[-1][1]
        headers = headers[:-1]
    head = b"".join([b"%s: %s\r\n" % pair for pair in headers])
    compact = _compact_of(
        entry.status, headers, head, usage, entry.body, entry.streamed, entry.created, expires
    )
    if not _COMPACT.unpack_from(compact)[3] & _COMPACT_ENCODED:
        entry.rendered = head  # what a hit sends: rendered here once anyway
    return compact


def _compact_of(
    status: int,
    headers: Headers,
    head: bytes,
    usage: bytes | None,
    body: bytes,
    streamed: bool,
    created: float,
    expires: float,
) -> bytes:
    """The compact form of the entry *status*, *headers* (rendered as *head*,
    without the usage header) with the usage header's value *usage* (None:
    no such header)."""
    count = len(headers)
    flags = _COMPACT_STREAMED if streamed else 0
    if usage is None:
        usage = b""
    else:
        flags |= _COMPACT_USAGE
    # No usage header name in the head (else it may name a pair not left
    # out); find, not `in`, as in Pipeline._forward.
    if (
        head.count(b"\r\n") == count
        and head.count(b": ") == count
        and head.find(USAGE_HEADER) < 0
        and len(usage) <= 0xFFFF
    ):
        return b"".join(
            (
                _COMPACT.pack(expires, created, status, flags, len(usage), len(head)),
                usage,
                head,
                body,
            )
        )
    if flags & _COMPACT_USAGE:
        headers = (*headers, (USAGE_HEADER, usage))
    entry = CacheEntry(status, headers, body, streamed, created)
    return _encode(entry, _COMPACT.pack(expires, 0.0, 0, _COMPACT_ENCODED, 0, 0))


def _expanded(compact: bytes) -> CacheEntry:
    """The CacheEntry *compact* holds (see _COMPACT), as it was stored."""
    expires, created, status, flags, usage_len, head_len = _COMPACT.unpack_from(compact)
    pos = _COMPACT.size
    if flags & _COMPACT_ENCODED:
        entry = CacheEntry.from_bytes(memoryview(compact)[pos:])
        assert entry is not None  # encoded by _compact
    else:
        usage = compact[pos:pos + usage_len]
        pos += usage_len
        head = compact[pos:pos + head_len]
        lines = head.split(b"\r\n")
        lines.pop()  # after the last CRLF
        headers = [cast(tuple[bytes, bytes], tuple(line.split(b": ", 1))) for line in lines]
        if flags & _COMPACT_USAGE:
            headers.append((USAGE_HEADER, usage))
        entry = CacheEntry(
            status, tuple(headers), compact[pos + head_len:], bool(flags & _COMPACT_STREAMED),
            created,
        )
        entry.rendered = head
    entry.expires = expires
    entry._size = _ENTRY_OVERHEAD + len(compact)
    return entry


class MemoryCache:
    """In-process LRU bounded by entry count and total bytes, with a TTL.

    Expiry is checked on ``get`` (an expired entry is removed then); LRU
    eviction on ``set`` keeps both bounds. An entry larger than ``max_bytes``
    on its own is not stored. ``ttl <= 0`` disables storing altogether.
    The async methods never await: they exist so both backends look alike.

    An entry is kept in its compact form (one bytes object, see
    :data:`_COMPACT`) until its first hit, which turns it into a
    :class:`CacheEntry` kept from then on (its rendered head and usage read
    once): most entries of a cache full of misses are never hit. Either
    form is accounted the same size, from lengths alone. Keys are at most
    32 bytes (``relay._fast.LruTable``; the cache keys are 32-byte digests).
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
        # key -> compact form (bytes) or, once hit, the CacheEntry, least
        # recently used first. The compiled table keeps each key inline in a
        # slot of its own (about 62 bytes an entry, where a dict, its linked
        # order and a key object cost ~155).
        self._data = _fast.LruTable(max(0, max_entries))
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._data)

    @property
    def nbytes(self) -> int:
        """Bytes currently accounted against ``max_bytes``."""
        return self._bytes

    def get_nowait(self, key: bytes) -> CacheEntry | None:
        data = self._data
        item = data.get(key)
        if item is None:
            return None
        # Now the most recently used: the last to be evicted.
        if type(item) is bytes:
            if _EXPIRES.unpack_from(item)[0] <= self._clock():
                data.pop(key)
                self._bytes -= _ENTRY_OVERHEAD + len(item) + len(key)
                return None
            # The first hit: expanded once, kept expanded from then on (its
            # accounted size stays what it was).
            entry = _expanded(cast(bytes, item))
            data.put(key, entry)
        else:
            entry = cast(CacheEntry, item)
            if entry.expires <= self._clock():
                data.pop(key)
                self._bytes -= entry.size + len(key)
                return None
        return entry

    def set_nowait(self, key: bytes, entry: CacheEntry) -> None:
        if self._vacate(key):
            self._keep(key, _compact(entry, self._clock() + self.ttl))

    def store(
        self,
        key: bytes,
        status: int,
        headers: Headers,
        lines: bytes | None,
        usage: bytes | None,
        body: bytes,
        streamed: bool,
        created: float,
    ) -> None:
        """:meth:`set_nowait` of the entry these make, without making it: a
        miss costs no CacheEntry and renders nothing. *lines* are *headers*
        as the client was sent them (None: rendered here), *usage* the
        internal usage header's value (None: none)."""
        if not self._vacate(key):
            return
        if lines is None:
            lines = b"".join([b"%s: %s\r\n" % pair for pair in headers])
        compact = _compact_of(
            status, headers, lines, usage, body, streamed, created, self._clock() + self.ttl
        )
        self._keep(key, compact)

    def _vacate(self, key: bytes) -> bool:
        """Drop *key*'s entry, if any; whether a new one may be stored."""
        old = self._data.pop(key)
        if old is not None:
            self._drop(key, old)
        return self.ttl > 0 and self.max_entries > 0

    def _keep(self, key: bytes, compact: bytes) -> None:
        size = _ENTRY_OVERHEAD + len(compact) + len(key)
        if size > self.max_bytes:
            return
        data = self._data
        if len(data) >= self.max_entries or self._bytes + size > self.max_bytes:
            self._make_room(size)
        data.put(key, compact)
        self._bytes += size

    def _make_room(self, size: int) -> None:
        """Evict the least recently used entries until one of *size* fits."""
        data = self._data
        while data and (len(data) >= self.max_entries or self._bytes + size > self.max_bytes):
            self._drop(*data.pop_oldest())

    def _drop(self, key: bytes, item: bytes | CacheEntry) -> None:
        """Give back the bytes of an entry taken out of the cache."""
        if type(item) is bytes:
            self._bytes -= _ENTRY_OVERHEAD + len(item) + len(key)
        else:
            self._bytes -= cast(CacheEntry, item).size + len(key)

    def entries(self) -> list[CacheEntry]:
        """The stored entries, oldest first (for inspection: neither their
        order nor their form changes)."""
        return [
            _expanded(item) if type(item) is bytes else cast(CacheEntry, item)
            for item in self._data.values()
        ]

    async def get(self, key: bytes) -> CacheEntry | None:
        return self.get_nowait(key)

    async def set(self, key: bytes, entry: CacheEntry) -> None:
        self.set_nowait(key, entry)

    def delete(self, key: bytes) -> None:
        old = self._data.pop(key)
        if old is not None:
            self._drop(key, old)

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
