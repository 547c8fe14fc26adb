"""Circuit breakers: one per target, kept across config generations.

The breaker itself (closed, open, half-open) is ``relay._fast.CircuitBreaker``;
:class:`Breakers` keeps one per target (origin and label) while its settings
stay the same, so a hot reload neither closes an open breaker nor forgets a
failure count, and shows each one's state on the
``relay_circuit_breaker_state`` gauge.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .. import _fast

if TYPE_CHECKING:
    from ..ops.metrics import Metrics
    from ..upstream.pool import Origin
    from ..upstream.target import Upstream

__all__ = ["Breakers", "open_targets"]

# Which target a breaker guards: its origin and its label.
Ident = tuple["Origin", str]


class Breakers:
    """The breaker of every target this process has had, by (origin, label)."""

    __slots__ = ("_known", "_metrics")

    def __init__(self, metrics: Metrics) -> None:
        self._known: dict[Ident, tuple[tuple[int, float], Any]] = {}
        self._metrics = metrics

    @staticmethod
    def check(failure_threshold: int, recovery_timeout: float) -> None:
        """Raise ValueError if a breaker cannot hold these settings."""
        _fast.CircuitBreaker(failure_threshold, recovery_timeout)

    def get(self, ident: Ident, failure_threshold: int, recovery_timeout: float) -> Any:
        """The target's breaker: the one it had, unless its settings changed."""
        settings = (failure_threshold, recovery_timeout)
        known = self._known.get(ident)
        if known is not None and known[0] == settings:
            return known[1]
        breaker = _fast.CircuitBreaker(failure_threshold, recovery_timeout)
        self._known[ident] = (settings, breaker)
        return breaker

    def checkpoint(self) -> dict[Ident, tuple[tuple[int, float], Any]]:
        """What :meth:`restore` goes back to (a refused config leaves no breaker)."""
        return dict(self._known)

    def restore(self, saved: dict[Ident, tuple[tuple[int, float], Any]]) -> None:
        self._known = saved

    def changed(self, upstream: Upstream) -> None:
        """Show the target's breaker state on the gauge, if it changed."""
        state = upstream.breaker.state
        if state != upstream.shown_state:  # the gauge is written on change only
            upstream.shown_state = state
            self._metrics.set_breaker_state(upstream.label, state)


def open_targets(targets: Iterable[Upstream], now: float) -> list[str]:
    """Labels of the targets whose breaker is open (still in recovery)."""
    return [
        u.label
        for u in targets
        if u.breaker.state == _fast.OPEN and u.breaker.retry_after(now) > 0
    ]
