"""Circuit breaker state machine for one upstream.

This one source is both twins: imported as is it is the pure implementation,
and setup.py compiles it unchanged into ``_breaker_c`` with the declarations
of ``_breaker_c.pxd`` (the states as a C enum), so the two cannot drift.

    closed --failure_threshold consecutive failures--> open
    open --recovery_timeout elapsed, first allow()--> half-open (one probe)
    half-open --success--> closed
    half-open --failure--> open (the timer restarts)

Every change of state goes through ``_set_state``, which refuses any other
transition. Time is the monotonic ``now`` the caller passes in.
"""

from __future__ import annotations

import math

# Star import on purpose: the compiled twin declares these names as a C enum
# in _breaker_c.pxd, and Cython refuses a named import that would assign them.
from ._breaker_states import *  # noqa: F403
from ._breaker_states import BreakerTransitionError

# ruff: noqa: F405  (CLOSED, HALF_OPEN, OPEN come from the star import)

__all__ = ["CircuitBreaker"]


class CircuitBreaker:
    """Counts consecutive failures of one upstream and decides who may call it."""

    __slots__ = (
        "_threshold",
        "_recovery",
        "_state",
        "_failures",
        "_opened_at",
        "_probe_out",
    )

    def __init__(self, failure_threshold: int, recovery_timeout: float) -> None:
        if not failure_threshold >= 1:
            raise ValueError(f"failure_threshold must be >= 1, got {failure_threshold!r}")
        if not (recovery_timeout >= 0.0 and math.isfinite(recovery_timeout)):
            raise ValueError(
                f"recovery_timeout must be a finite number >= 0, got {recovery_timeout!r}"
            )
        self._threshold = int(failure_threshold)
        self._recovery = float(recovery_timeout)
        self._state = CLOSED
        self._failures = 0  # consecutive, counted while closed
        self._opened_at = 0.0
        self._probe_out = False  # half-open: the one probe is in flight

    @property
    def state(self) -> int:
        """0 closed, 1 half-open, 2 open (the values of the state gauge)."""
        return self._state

    @property
    def failures(self) -> int:
        """Consecutive failures counted while closed."""
        return self._failures

    @property
    def failure_threshold(self) -> int:
        return self._threshold

    @property
    def recovery_timeout(self) -> float:
        return self._recovery

    def allow(self, now: float) -> bool:
        """May a request go upstream now? Half-open grants exactly one probe."""
        state = self._state
        if state == CLOSED:
            return True
        if state == OPEN:
            if now - self._opened_at >= self._recovery:
                self._set_state(HALF_OPEN)
                self._probe_out = True
                return True
            return False
        if self._probe_out:
            return False
        self._probe_out = True  # the last probe was released: this caller probes
        return True

    def record_success(self) -> None:
        state = self._state
        if state == CLOSED:
            self._failures = 0
        elif state == HALF_OPEN:
            self._set_state(CLOSED)
        # Open: a request admitted before the breaker opened; only a probe
        # may close it.

    def record_failure(self, now: float) -> None:
        state = self._state
        if state == CLOSED:
            self._failures += 1
            if self._failures >= self._threshold:
                self._set_state(OPEN)
                self._opened_at = now
        elif state == HALF_OPEN:
            self._set_state(OPEN)
            self._opened_at = now
        # Open: a late failure of a request admitted earlier; the timer keeps
        # running from the failure that opened it.

    def release_probe(self) -> None:
        """The probe ended without a verdict (e.g. the client left): let another probe."""
        if self._state == HALF_OPEN:
            self._probe_out = False

    def retry_after(self, now: float) -> float:
        """Seconds until the breaker lets a probe through (0.0 unless open)."""
        if self._state != OPEN:
            return 0.0
        # The same arithmetic as allow(): 0.0 exactly when a probe would go.
        left = self._recovery - (now - self._opened_at)
        return left if left > 0.0 else 0.0

    def _set_state(self, new: int) -> None:
        old = self._state
        if new == OPEN:
            valid = old == CLOSED or old == HALF_OPEN
        elif new == HALF_OPEN:
            valid = old == OPEN
        elif new == CLOSED:
            valid = old == HALF_OPEN
        else:
            valid = False
        if not valid:
            raise BreakerTransitionError(f"no transition from state {old} to state {new}")
        self._state = new
        # Every state starts clean: no counted failures, no probe in flight.
        self._failures = 0
        self._probe_out = False
