"""Rate limiting: a token bucket per key, in process memory or shared in Redis.

``MemoryLimiter`` keeps one bucket per key in this process (``relay._fast``
BucketTable). ``RedisLimiter`` runs the same bucket as one atomic Lua script
on the Redis server, on the server's clock, so every instance draws from one
bucket; when Redis is down or a call fails it answers from its memory
fallback for that call (each instance then limits on its own until Redis is
back: N instances may allow up to N times the rate during an outage, which
beats refusing or stalling traffic).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from relay._fast import BucketTable
from relay.redisconn import RedisConnection, RedisUnavailable

__all__ = [
    "KEY_KINDS",
    "MemoryLimiter",
    "RateDecision",
    "RedisLimiter",
    "key_function",
]

KEY_KINDS = ("api_key", "ip", "global")


@dataclass(frozen=True, slots=True)
class RateDecision:
    """Outcome of one acquire.

    ``limit`` is the burst (X-RateLimit-Limit), ``remaining`` the whole
    tokens left after this request (X-RateLimit-Remaining), ``retry_after``
    the seconds until the next token (0 when one is available now, ``inf``
    when the rate is 0 and the bucket is empty); the server rounds it up to
    whole seconds, at least 1, for Retry-After. From Redis it is whole
    milliseconds, rounded up.
    """

    allowed: bool
    limit: int
    remaining: int
    retry_after: float


# -- keys ---------------------------------------------------------------------

KeyFunction = Callable[[bytes | None, str | bytes], bytes]


def _ip(client_ip: str | bytes) -> bytes:
    return client_ip.encode() if isinstance(client_ip, str) else client_ip


def _global_key(credential_hash: bytes | None, client_ip: str | bytes) -> bytes:
    return b"global"


def _ip_key(credential_hash: bytes | None, client_ip: str | bytes) -> bytes:
    return b"ip:" + _ip(client_ip)


def _api_key_key(credential_hash: bytes | None, client_ip: str | bytes) -> bytes:
    # A request without a credential is limited per client address instead:
    # one bucket shared by every anonymous caller would let one of them
    # starve the rest (and such requests usually fail upstream with 401
    # anyway, so this mostly bounds how fast they can be sent).
    if credential_hash:
        return b"key:" + credential_hash
    return b"ip:" + _ip(client_ip)


_KEY_FUNCTIONS: dict[str, KeyFunction] = {
    "api_key": _api_key_key,
    "ip": _ip_key,
    "global": _global_key,
}


def key_function(kind: str) -> KeyFunction:
    """The key builder for ``ratelimit.key``; look it up once per config,
    then call it per request with ``(credential_hash, client_ip)``.

    ``client_ip`` must be the TCP peer address, never X-Forwarded-For, which
    any client can set. The prefixes keep the kinds apart, so switching
    ``ratelimit.key`` on reload never mixes old buckets with new ones.
    """
    try:
        return _KEY_FUNCTIONS[kind]
    except KeyError:
        raise ValueError(f"unknown rate limit key {kind!r}; use one of {KEY_KINDS}") from None


# -- memory -------------------------------------------------------------------


class MemoryLimiter:
    """Token buckets in this process; ``acquire`` never awaits."""

    def __init__(
        self,
        rate: float,
        burst: float,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 100000,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.limit = int(burst)
        self._clock = clock
        self._table = BucketTable(rate, burst, max_keys)

    def acquire_now(self, key: bytes) -> tuple[bool, int, float]:
        """``(allowed, remaining, retry_after)`` of one acquire, as :class:`RateDecision`
        has them (``limit`` is :attr:`limit`); for the request path, which
        renders the headers itself and needs no object per request."""
        return self._table.acquire(key, self._clock())  # type: ignore[no-any-return]

    def request_path(self) -> tuple[Callable[[bytes, float], tuple[bool, int, float]], Callable[[], float]]:
        """What :meth:`acquire_now` calls, ``(acquire(key, now), clock)``, for
        the request path to call itself: one Python frame less per request."""
        return self._table.acquire, self._clock

    def acquire_nowait(self, key: bytes) -> RateDecision:
        allowed, remaining, retry_after = self.acquire_now(key)
        return RateDecision(allowed, self.limit, remaining, retry_after)

    async def acquire(self, key: bytes) -> RateDecision:
        return self.acquire_nowait(key)


# -- Redis --------------------------------------------------------------------


def _load_script() -> str:
    import importlib.resources  # Redis only

    return (
        importlib.resources.files("relay")
        .joinpath("lua", "token_bucket.lua")
        .read_text(encoding="utf-8")
    )


def _float_arg(value: float) -> bytes:
    # repr is the shortest exact form: Lua's tonumber reads back the same double.
    return repr(float(value)).encode()


class RedisLimiter:
    """One bucket per key shared by every instance through Redis.

    The script is registered once (EVALSHA; redis-py reloads it on NOSCRIPT,
    e.g. after a Redis restart or SCRIPT FLUSH). Any Redis failure makes that
    call use ``fallback``; the client never sees an error.
    """

    def __init__(
        self,
        conn: RedisConnection,
        rate: float,
        burst: float,
        fallback: MemoryLimiter | None = None,
        prefix: str = "relay:rl:",
    ) -> None:
        if not (math.isfinite(rate) and rate >= 0 and burst >= 1):
            raise ValueError("rate must be finite and >= 0, burst >= 1")
        self.conn = conn
        self.rate = rate
        self.burst = burst
        self.limit = int(burst)
        self.prefix = prefix.encode()
        self.fallback = fallback if fallback is not None else MemoryLimiter(rate, burst)
        self._script = conn.client.register_script(_load_script())
        # A bucket idle for this long is full again, so Redis may drop it.
        # Precomputed once: the per-request call only concatenates the key.
        refill = burst / rate if rate > 0 else 86400.0
        idle_ms = math.ceil(refill * 1000) + 1000
        self._args: tuple[bytes, ...] = (_float_arg(rate), _float_arg(burst), str(idle_ms).encode())

    async def acquire(self, key: bytes) -> RateDecision:
        if not self.conn.up:
            return self.fallback.acquire_nowait(key)
        return await self._run(key, self._args)

    async def _acquire_at(self, key: bytes, now: float) -> RateDecision:
        """Like ``acquire`` but at a given time instead of Redis' clock.

        Only for tests that compare the script with the memory bucket.
        """
        return await self._run(key, (*self._args, _float_arg(now)))

    async def _run(self, key: bytes, args: tuple[bytes, ...]) -> RateDecision:
        try:
            reply = await self.conn.execute(self._script, (self.prefix + key,), args)
            allowed, remaining, retry_after_ms = reply
            retry_after = retry_after_ms / 1000 if retry_after_ms >= 0 else math.inf
            return RateDecision(allowed == 1, self.limit, int(remaining), retry_after)
        except (RedisUnavailable, TypeError, ValueError):
            # TypeError/ValueError: a reply of an unexpected shape, e.g. a
            # foreign value at our key; still never the client's problem.
            return self.fallback.acquire_nowait(key)
