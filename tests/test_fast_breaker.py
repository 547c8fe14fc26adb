"""Circuit breaker state machine, for both twins."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import relay._fast as fast
from relay._fast import CLOSED, HALF_OPEN, OPEN, BreakerTransitionError
from tests.support import compiled_or_skip


def opened(impl: fast.Implementation, threshold: int = 3, recovery: float = 10.0, at: float = 0.0):
    breaker = impl.CircuitBreaker(threshold, recovery)
    for _ in range(threshold):
        breaker.record_failure(at)
    assert breaker.state == OPEN
    return breaker


def test_state_values_are_the_gauge_values() -> None:
    assert (CLOSED, HALF_OPEN, OPEN) == (0, 1, 2)
    assert fast.STATE_NAMES == {0: "closed", 1: "half-open", 2: "open"}


@pytest.mark.parametrize("threshold", [0, -1])
def test_threshold_below_one_is_refused(impl: fast.Implementation, threshold: int) -> None:
    with pytest.raises(ValueError, match="failure_threshold"):
        impl.CircuitBreaker(threshold, 1.0)


@pytest.mark.parametrize("recovery", [-0.5, math.nan, math.inf])
def test_bad_recovery_timeout_is_refused(impl: fast.Implementation, recovery: float) -> None:
    with pytest.raises(ValueError, match="recovery_timeout"):
        impl.CircuitBreaker(1, recovery)


def test_starts_closed_and_allows(impl: fast.Implementation) -> None:
    breaker = impl.CircuitBreaker(3, 10.0)
    assert breaker.state == CLOSED
    assert breaker.allow(0.0) is True
    assert breaker.retry_after(0.0) == 0.0
    assert (breaker.failure_threshold, breaker.recovery_timeout) == (3, 10.0)


def test_opens_after_threshold_consecutive_failures(impl: fast.Implementation) -> None:
    breaker = impl.CircuitBreaker(3, 10.0)
    breaker.record_failure(1.0)
    breaker.record_failure(1.0)
    assert breaker.state == CLOSED and breaker.failures == 2
    breaker.record_failure(2.0)
    assert breaker.state == OPEN
    assert breaker.allow(2.0) is False
    assert breaker.retry_after(5.0) == pytest.approx(7.0)


def test_success_resets_the_consecutive_count(impl: fast.Implementation) -> None:
    breaker = impl.CircuitBreaker(3, 10.0)
    breaker.record_failure(0.0)
    breaker.record_failure(0.0)
    breaker.record_success()
    assert breaker.failures == 0
    breaker.record_failure(0.0)
    breaker.record_failure(0.0)
    assert breaker.state == CLOSED


def test_threshold_one_opens_on_first_failure(impl: fast.Implementation) -> None:
    breaker = impl.CircuitBreaker(1, 0.0)
    breaker.record_failure(5.0)
    assert breaker.state == OPEN
    assert breaker.allow(5.0) is True  # recovery 0: probe at once
    assert breaker.state == HALF_OPEN


def test_half_open_grants_exactly_one_probe(impl: fast.Implementation) -> None:
    breaker = opened(impl)
    assert breaker.allow(9.9) is False
    assert breaker.allow(10.0) is True
    assert breaker.state == HALF_OPEN
    assert [breaker.allow(10.0 + i) for i in range(5)] == [False] * 5
    assert breaker.retry_after(11.0) == 0.0


def test_probe_success_closes(impl: fast.Implementation) -> None:
    breaker = opened(impl)
    assert breaker.allow(10.0)
    breaker.record_success()
    assert breaker.state == CLOSED
    assert breaker.failures == 0
    assert all(breaker.allow(10.0) for _ in range(3))
    breaker.record_failure(11.0)
    breaker.record_failure(11.0)
    assert breaker.state == CLOSED  # the count started again from zero


def test_probe_failure_reopens_and_restarts_the_timer(impl: fast.Implementation) -> None:
    breaker = opened(impl)
    assert breaker.allow(15.0)
    breaker.record_failure(16.0)
    assert breaker.state == OPEN
    assert breaker.retry_after(16.0) == pytest.approx(10.0)
    assert breaker.allow(25.9) is False
    assert breaker.allow(26.0) is True


def test_released_probe_lets_the_next_caller_probe(impl: fast.Implementation) -> None:
    breaker = opened(impl)
    assert breaker.allow(10.0)
    assert not breaker.allow(10.0)
    breaker.release_probe()
    assert breaker.state == HALF_OPEN
    assert breaker.allow(10.0) is True
    assert breaker.allow(10.0) is False


def test_release_probe_outside_half_open_does_nothing(impl: fast.Implementation) -> None:
    breaker = impl.CircuitBreaker(2, 10.0)
    breaker.release_probe()
    assert breaker.state == CLOSED
    breaker = opened(impl)
    breaker.release_probe()
    assert breaker.state == OPEN and not breaker.allow(1.0)


def test_late_results_while_open_change_nothing(impl: fast.Implementation) -> None:
    breaker = opened(impl, at=0.0)
    breaker.record_failure(8.0)  # admitted before it opened
    breaker.record_success()
    assert breaker.state == OPEN
    assert breaker.retry_after(8.0) == pytest.approx(2.0)
    assert breaker.allow(10.0)


def test_retry_after_never_negative(impl: fast.Implementation) -> None:
    breaker = opened(impl)
    assert breaker.retry_after(1000.0) == 0.0
    assert breaker.retry_after(-5.0) == pytest.approx(15.0)  # clock behind: still open
    assert breaker.allow(-5.0) is False


def test_invalid_transition_is_refused() -> None:
    # _set_state is a C-level method in the compiled twin; the twins share
    # this source, so the pure one shows what both refuse.
    breaker = fast.pure.CircuitBreaker(1, 1.0)
    with pytest.raises(BreakerTransitionError):
        breaker._set_state(HALF_OPEN)  # closed -> half-open skips open
    with pytest.raises(BreakerTransitionError):
        breaker._set_state(CLOSED)  # closed -> closed is no transition
    with pytest.raises(BreakerTransitionError):
        breaker._set_state(7)
    breaker.record_failure(0.0)
    with pytest.raises(BreakerTransitionError):
        breaker._set_state(CLOSED)  # open -> closed needs a probe
    assert breaker.state == OPEN


def test_compiled_hides_its_state() -> None:
    compiled = compiled_or_skip()
    breaker = compiled.CircuitBreaker(1, 1.0)
    assert not hasattr(breaker, "_set_state")
    with pytest.raises(AttributeError):
        breaker.state = OPEN  # read-only property


# ----------------------------------------------------------------- properties

operations = st.lists(
    st.tuples(
        st.sampled_from(["allow", "success", "failure", "release"]),
        st.floats(min_value=-1.0, max_value=4.0, allow_nan=False),
    ),
    max_size=60,
)


def run(breaker, ops: list) -> list:
    """Applies ops; returns what a caller observes after each one."""
    now = 0.0
    seen = []
    for name, step in ops:
        now += step
        if name == "allow":
            result = breaker.allow(now)
        elif name == "success":
            result = breaker.record_success()
        elif name == "failure":
            result = breaker.record_failure(now)
        else:
            result = breaker.release_probe()
        seen.append((now, name, result, breaker.state, breaker.failures, breaker.retry_after(now)))
    return seen


@settings(max_examples=300, deadline=None)
@given(
    threshold=st.integers(1, 4),
    recovery=st.floats(min_value=0.0, max_value=5.0),
    ops=operations,
)
def test_invariants(impl: fast.Implementation, threshold: int, recovery: float, ops: list) -> None:
    breaker = impl.CircuitBreaker(threshold, recovery)
    probes_out = 0
    previous = CLOSED
    latest = 0.0
    for now, name, result, state, failures, retry_after in run(breaker, ops):
        latest = max(latest, now)
        assert state in (CLOSED, HALF_OPEN, OPEN)
        assert (previous, state) in {
            (CLOSED, CLOSED),
            (CLOSED, OPEN),
            (OPEN, OPEN),
            (OPEN, HALF_OPEN),
            (HALF_OPEN, HALF_OPEN),
            (HALF_OPEN, CLOSED),
            (HALF_OPEN, OPEN),
        }
        if state != previous:
            probes_out = 0
        if state == HALF_OPEN:
            if name == "allow" and result:
                probes_out += 1
            elif name == "release":
                probes_out = 0
            assert probes_out <= 1  # never a second probe in flight
        if state == CLOSED:
            assert 0 <= failures < threshold
            if name == "allow":
                assert result is True
        else:
            assert failures == 0
        if state == OPEN:
            # Opened at some time <= latest; a clock behind it waits longer.
            assert 0.0 <= retry_after <= recovery + (latest - now) + 1e-9
            if name == "allow":
                assert result is False
                assert retry_after > 0.0  # 0.0 would have let a probe through
        else:
            assert retry_after == 0.0
        previous = state


@settings(max_examples=300, deadline=None)
@given(
    threshold=st.integers(1, 4),
    recovery=st.floats(min_value=0.0, max_value=5.0),
    ops=operations,
)
def test_twins_behave_alike(
    both: tuple[fast.Implementation, fast.Implementation],
    threshold: int,
    recovery: float,
    ops: list,
) -> None:
    pure, compiled = both
    assert run(pure.CircuitBreaker(threshold, recovery), ops) == run(
        compiled.CircuitBreaker(threshold, recovery), ops
    )
