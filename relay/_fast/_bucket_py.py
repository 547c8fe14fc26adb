"""Token buckets, one per key, refilled from the clock the caller passes in.

This one source is both twins: imported as is it is the pure implementation,
and setup.py compiles it unchanged into ``_bucket_c`` with the declarations
of ``_bucket_c.pxd`` (C doubles, C method calls), so the two cannot drift.
Keep it to what Cython compiles from plain Python: no decorators beyond
``property``, state only in the slots the .pxd declares.

Time is whatever monotonic seconds the caller passes as ``now``: the bucket
never reads a clock, which keeps it deterministic and testable. A ``now``
earlier than one already seen adds nothing (clocks of different callers may
disagree slightly; going back must not mint tokens).
"""

from __future__ import annotations

import math
from collections import OrderedDict

__all__ = ["BucketTable", "TokenBucket"]

# Tokens are doubles; past 2**53 whole tokens stop being exact.
_MAX_BURST = 2.0**53


def _check_rate_burst(rate: float, burst: float) -> None:
    if not (rate >= 0.0 and math.isfinite(rate)):
        raise ValueError(f"rate must be a finite number >= 0, got {rate!r}")
    if not (1.0 <= burst <= _MAX_BURST):
        raise ValueError(f"burst must be between 1 and 2**53, got {burst!r}")


class TokenBucket:
    """``burst`` tokens at most, ``rate`` tokens added per second; starts full."""

    __slots__ = ("_rate", "_burst", "_tokens", "_last")

    def __init__(self, rate: float, burst: float) -> None:
        _check_rate_burst(rate, burst)
        self._rate = float(rate)
        self._burst = float(burst)
        self._tokens = float(burst)
        self._last = -math.inf  # no time seen yet: a full bucket needs none

    @property
    def rate(self) -> float:
        return self._rate

    @property
    def burst(self) -> float:
        return self._burst

    def _refill(self, now: float) -> None:
        last = self._last
        if now > last:  # also False for NaN: nothing is added
            if self._tokens < self._burst:
                tokens = self._tokens + (now - last) * self._rate
                self._tokens = tokens if tokens < self._burst else self._burst
            self._last = now

    def take(self, now: float) -> bool:
        """Takes one token if there is a whole one; True when taken."""
        self._refill(now)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def remaining(self, now: float) -> int:
        """Whole tokens available at ``now``."""
        self._refill(now)
        return int(self._tokens)

    def retry_after(self, now: float) -> float:
        """Seconds from ``now`` until one whole token (0.0 if there is one).

        ``math.inf`` when the rate is 0 and the bucket is empty: it never refills.
        """
        self._refill(now)
        return self._wait()

    def _wait(self) -> float:
        missing = 1.0 - self._tokens
        if missing <= 0.0:
            return 0.0
        if self._rate <= 0.0:
            return math.inf
        return missing / self._rate

    def _acquire(self, now: float) -> tuple[bool, int, float]:
        # take + remaining + retry_after with a single refill.
        self._refill(now)
        allowed = self._tokens >= 1.0
        if allowed:
            self._tokens -= 1.0
        return allowed, int(self._tokens), self._wait()


class BucketTable:
    """One TokenBucket per key, at most ``max_keys`` of them.

    When full, the least recently used key is evicted. That key has been idle
    longest, so its bucket has had the most time to refill; a full bucket is
    exactly what a new one starts as, so evicting it loses nothing.
    """

    __slots__ = ("_rate", "_burst", "_max_keys", "_buckets")

    def __init__(self, rate: float, burst: float, max_keys: int = 100000) -> None:
        _check_rate_burst(rate, burst)
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys!r}")
        self._rate = float(rate)
        self._burst = float(burst)
        self._max_keys = max_keys
        # Insertion order is recency order: a hit moves its key to the end.
        self._buckets: OrderedDict[object, TokenBucket] = OrderedDict()

    @property
    def rate(self) -> float:
        return self._rate

    @property
    def burst(self) -> float:
        return self._burst

    @property
    def max_keys(self) -> int:
        return self._max_keys

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key: object) -> bool:
        return key in self._buckets

    def acquire(self, key: bytes, now: float) -> tuple[bool, int, float]:
        """Takes a token from ``key``'s bucket: (allowed, remaining, retry_after).

        ``remaining`` is the whole tokens left after this call, ``retry_after``
        the seconds until the next whole token (0.0 while one is left).
        """
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            if len(buckets) >= self._max_keys:
                buckets.popitem(last=False)
            bucket = TokenBucket(self._rate, self._burst)
            buckets[key] = bucket
        else:
            buckets.move_to_end(key)
        return bucket._acquire(now)
