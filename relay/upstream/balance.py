"""Choosing a route's target: weighted, least busy or lowest latency.

A :class:`Balancer` belongs to one route of one config generation; the
state it reads (requests in flight, a decaying average of time to first
byte, a 429's "not before" time, the circuit breaker) lives in each
target's long-lived :class:`~relay.upstream.target.TargetState`, so a hot reload keeps it.

``pick`` runs per request: it allocates nothing, and a one-target route
returns its target without looking at anything (the breaker is asked by
the caller, as before).

``latency`` is power of two choices over a peak-sensitive decaying
average (PeakEWMA, as Finagle and Linkerd balance): two random candidates,
the one with the lower ``average x (in flight + 1)`` wins. Always taking
the single fastest target would herd every request onto it until it slows
down; two random choices spread the load and still avoid a slow target.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right

from .target import Upstream

__all__ = ["STRATEGIES", "Balancer"]

STRATEGIES = ("weighted", "least_busy", "latency")

def _blocked(upstream: Upstream, now: float, breakers: bool) -> bool:
    """Open breaker still in its recovery time: skip without asking it."""
    if not breakers:
        return False
    breaker = upstream.breaker
    return breaker.state == 2 and breaker.retry_after(now) > 0.0


class Balancer:
    """Picks among one route's targets by its strategy."""

    __slots__ = (
        "targets", "strategy", "single", "measures", "_weights", "_cumulative", "_all",
        "_random", "_breakers",
    )

    def __init__(
        self,
        targets: tuple[Upstream, ...],
        strategy: str,
        *,
        breakers: bool,
        rng: random.Random | None = None,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}")
        if not targets:
            raise ValueError("a route needs at least one target")
        self.targets = targets
        self.strategy = strategy
        self.single = targets[0] if len(targets) == 1 else None
        # Only the latency strategy reads the time-to-first-byte average:
        # other routes skip keeping it (the histogram has the numbers).
        self.measures = strategy == "latency" and self.single is None
        self._weights = tuple(t.weight for t in targets)
        running = 0.0
        cumulative = []
        for weight in self._weights[:-1]:
            running += weight
            cumulative.append(running)
        # bisect over these gives the index for a point in [0, total weight).
        self._cumulative = tuple(cumulative)
        self._all = (1 << len(targets)) - 1
        self._random = (rng or random.Random()).random
        self._breakers = breakers

    def pick(self, now: float, excluded: int = 0, cooling: bool = True) -> int:
        """Index of the target for the next attempt, or -1 if none may be tried.

        *excluded* is a bit mask of target indexes not to use (tried already,
        or refused by their breaker). With *cooling*, targets inside a 429's
        Retry-After are skipped too.
        """
        targets = self.targets
        breakers = self._breakers
        # One pass decides who may be chosen (bit i set: target i may).
        allowed = 0
        count = 0
        total = 0.0
        weights = self._weights
        for i, target in enumerate(targets):
            if (excluded >> i) & 1:
                continue
            if cooling and target.state.not_before > now:
                continue
            if breakers:
                breaker = target.breaker
                if breaker.state == 2 and breaker.retry_after(now) > 0.0:
                    continue
            allowed |= 1 << i
            count += 1
            total += weights[i]
        if count == 0:
            return -1
        strategy = self.strategy
        if strategy == "weighted":
            if allowed == self._all:
                # The usual case: every target may be chosen.
                return bisect_right(self._cumulative, self._random() * total)
            point = self._random() * total
            last = -1
            for i in range(len(targets)):
                if (allowed >> i) & 1:
                    last = i
                    point -= weights[i]
                    if point < 0.0:
                        return i
            return last  # float rounding at the very top of the range
        if strategy == "least_busy":
            # Ties broken from a random starting point, so equal targets share.
            size = len(targets)
            start = int(self._random() * size)
            best, best_load = -1, 0
            for step in range(size):
                i = (start + step) % size
                if (allowed >> i) & 1:
                    load = targets[i].state.inflight
                    if best < 0 or load < best_load:
                        best, best_load = i, load
            return best
        # latency: power of two choices among the allowed targets.
        first = _nth_bit(allowed, int(self._random() * count))
        if count == 1:
            return first
        second = _nth_bit(allowed & ~(1 << first), int(self._random() * (count - 1)))
        if targets[first].state.cost(now) <= targets[second].state.cost(now):
            return first
        return second

    def earliest_cooled(self, now: float, excluded: int) -> tuple[int, float]:
        """The target (not excluded, breaker not open) whose 429 wait ends first, and the wait."""
        best, wait = -1, math.inf
        for i, target in enumerate(self.targets):
            if (excluded >> i) & 1 or _blocked(target, now, self._breakers):
                continue
            left = target.state.not_before - now
            if left < wait:
                best, wait = i, max(0.0, left)
        return best, wait


def _nth_bit(mask: int, n: int) -> int:
    """Index of the n-th (from 0) set bit of *mask*."""
    i = 0
    while True:
        if (mask >> i) & 1:
            if n == 0:
                return i
            n -= 1
        i += 1
