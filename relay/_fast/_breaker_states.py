"""Circuit breaker states: the numbers are the contract's gauge values.

Kept apart from ``_breaker_py`` because the compiled twin declares the same
names as a C enum in ``_breaker_c.pxd``; the shared source takes them with a
star import, the one form Cython lets a .pxd enum shadow.
"""

from __future__ import annotations

__all__ = ["CLOSED", "HALF_OPEN", "OPEN", "STATE_NAMES", "BreakerTransitionError"]

CLOSED = 0
HALF_OPEN = 1
OPEN = 2

STATE_NAMES = {CLOSED: "closed", HALF_OPEN: "half-open", OPEN: "open"}


class BreakerTransitionError(RuntimeError):
    """A transition the state machine does not have: a bug, never user input."""
