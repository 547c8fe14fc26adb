"""Targets as each config generation gets them, and what they keep across it.

A config names targets by URL (``proxy.target``, ``routes[].targets[]``);
:class:`Targets` turns each into an :class:`~relay.upstream.target.Upstream`
whose long-lived parts outlive a hot reload: the connection pool of its
origin, its circuit breaker and its balancing state (in flight, time to
first byte, a 429's not-before), kept per (origin, label). So a reload that
leaves a target alone neither drops its connections nor forgets that it is
slow or open.

Breakers are kept by whoever owns them (``relay.features.breaker``): this
module only asks for one by the target's identity, so the upstream family
does not import a feature.
"""

from __future__ import annotations

from typing import Any, Protocol

from ..config import BreakerConfig, ProxyConfig
from .pool import Origin, UpstreamPools
from .target import TargetState, Upstream, auth_line

__all__ = ["BreakerKeeper", "Targets"]


class BreakerKeeper(Protocol):
    """Where a target's breaker comes from (``relay.features.breaker.Breakers``)."""

    def get(self, ident: tuple[Origin, str], failure_threshold: int,
            recovery_timeout: float) -> Any: ...

    def changed(self, upstream: Upstream) -> None: ...


class Targets:
    """Every target this process has had, by (origin, label)."""

    __slots__ = ("_pools", "_breakers", "_states")

    def __init__(self, pools: UpstreamPools, breakers: BreakerKeeper) -> None:
        self._pools = pools
        self._breakers = breakers
        self._states: dict[tuple[Origin, str], TargetState] = {}

    def target(
        self,
        url: str,
        proxy: ProxyConfig,
        breaker: BreakerConfig,
        *,
        name: str | None = None,
        api_key: str = "",
        auth: str = "bearer",
        weight: float = 1.0,
    ) -> Upstream:
        """The target at *url* for a new generation; its pool is per origin,
        its breaker and balancing state per (origin, label)."""
        origin = Origin.parse(url)
        pool = self._pools.get(
            origin,
            pool_size=proxy.pool_size,
            connect_timeout=proxy.connect_timeout,
            read_timeout=proxy.read_timeout,
            first_byte_timeout=proxy.first_byte_timeout,
            max_connections=proxy.max_connections,
        )
        label = name or origin.label
        ident = (origin, label)
        state = self._states.get(ident)
        if state is None:
            state = self._states[ident] = TargetState()
        upstream = Upstream(
            origin,
            pool,
            self._breakers.get(ident, breaker.failure_threshold, breaker.recovery_timeout),
            label,
            origin.host_header(),
            weight=weight,
            state=state,
            auth_line=auth_line(api_key, auth),
            relay_header=b"X-Relay-Upstream: %s\r\n" % label.encode(),
        )
        self._breakers.changed(upstream)
        return upstream
