"""One target of a route: an origin (maybe with its own key), its pooled
connections, its circuit breaker and what the balancer knows of it.

The pool, breaker and :class:`TargetState` outlive config generations (the
runtime keeps them by origin and label); an :class:`Upstream` is rebuilt with
each pipeline around them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .. import _fast
from ..config import AUTH_SCHEMES
from .pool import Origin, UpstreamPool

__all__ = ["TargetState", "Upstream", "auth_line"]

# Seconds over which an old time-to-first-byte sample loses most of its
# weight (1/e). Short enough that a target that got faster wins traffic back
# within a few seconds, long enough that one lucky answer does not.
DECAY_SECONDS = 10.0


class TargetState:
    """What the balancer knows of one target; outlives config generations."""

    __slots__ = ("inflight", "ewma", "stamp", "not_before")

    def __init__(self) -> None:
        self.inflight = 0
        self.ewma = 0.0  # seconds to first byte, decaying average (0: never measured)
        self.stamp = 0.0  # loop time of the last sample
        self.not_before = 0.0  # loop time before which a retry must not go here (429)

    def observe(self, seconds: float, now: float) -> None:
        """One time to first byte (or the time a failed attempt cost)."""
        ewma = self.ewma
        if seconds >= ewma or ewma == 0.0:
            # Peak-sensitive: a slowdown counts at once, recovery decays in.
            self.ewma = seconds
        else:
            weight = math.exp(-(now - self.stamp) / DECAY_SECONDS)
            self.ewma = ewma * weight + seconds * (1.0 - weight)
        self.stamp = now

    def cost(self, now: float) -> float:
        """Expected wait here: the average decayed to *now*, times the queue.

        The decay without new samples (Finagle's PeakEWMA does the same)
        lets a target that was slow once, or whose samples stopped because
        it lost the comparison, be tried again after a while.
        """
        ewma = self.ewma
        if ewma and now > self.stamp:
            ewma *= math.exp(-(now - self.stamp) / DECAY_SECONDS)
        return ewma * (self.inflight + 1)


@dataclass(slots=True)
class Upstream:
    """One target (an origin, maybe with its own key) with its pool and breaker."""

    origin: Origin
    pool: UpstreamPool
    breaker: Any  # relay._fast CircuitBreaker (compiled or pure)
    label: str  # the target's name, else host:port: never a key
    host_header: bytes
    shown_state: int = -1  # breaker state last written to the gauge
    weight: float = 1.0
    state: TargetState = field(default_factory=TargetState)
    # The upstream's own credential as a header line; b"" = the client's passes.
    auth_line: bytes = b""
    relay_header: bytes = b""  # "X-Relay-Upstream: <label>\r\n"
    # Its metric children (relay.ops.metrics.TargetMeters), set by the pipeline.
    meters: Any = None

    @property
    def route_label(self) -> str:
        return self.label

    def __repr__(self) -> str:
        # Never the credential line.
        return f"Upstream({self.label!r}, {self.origin})"

    def snapshot(self, now: float) -> dict[str, Any]:
        """This target as relay's own JSON endpoints show it (no key, ever)."""
        breaker = self.breaker
        state = self.state
        return {
            "upstream": self.label,
            "url": str(self.origin),
            "breaker": _fast.STATE_NAMES[breaker.state],
            "retry_after": round(breaker.retry_after(now), 3),
            "in_flight": state.inflight,
            "latency_seconds": round(state.ewma, 6),
            "weight": self.weight,
        }


def auth_line(api_key: str, auth: str) -> bytes:
    """A target's own credential as the header line sent upstream (*auth*
    names the scheme); b"" without a key: the client's credential passes."""
    if not api_key:
        return b""
    header, prefix = AUTH_SCHEMES[auth]
    return f"{header}: {prefix}{api_key}\r\n".encode("latin-1")
