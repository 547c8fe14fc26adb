"""The target chooser on its own: which targets may be picked (breaker,
Retry-After cool-down, exclusions) and how each strategy chooses among them.
Real-socket behaviour is in test_deployments.py."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import pytest

from relay import _fast
from relay.upstream.balance import Balancer
from relay.upstream.target import TargetState


@dataclass
class FakeTarget:
    weight: float = 1.0
    state: TargetState = field(default_factory=TargetState)
    breaker: object = field(default_factory=lambda: _fast.CircuitBreaker(1, 60.0))


def balancer(targets: list[FakeTarget], strategy: str, seed: int = 7) -> Balancer:
    return Balancer(tuple(targets), strategy, breakers=True,  # type: ignore[arg-type]
                    rng=random.Random(seed))


@pytest.mark.parametrize("strategy", ["weighted", "least_busy", "latency"])
def test_open_cooling_and_excluded_targets_are_never_picked(strategy: str) -> None:
    targets = [FakeTarget() for _ in range(4)]
    now = 1000.0
    targets[0].breaker.record_failure(now)  # type: ignore[attr-defined]
    targets[1].state.not_before = now + 5
    chooser = balancer(targets, strategy)
    picked = {chooser.pick(now, excluded=1 << 3) for _ in range(200)}
    assert picked == {2}
    # Without the cool-down rule (a first attempt may go), target 1 is back.
    assert {chooser.pick(now, excluded=1 << 3, cooling=False) for _ in range(200)} == {1, 2}
    assert chooser.pick(now, excluded=0b1111) == -1
    # An open breaker past its recovery time may take its probe.
    assert 0 in {chooser.pick(now + 61) for _ in range(200)}


def test_weighted_follows_the_weights() -> None:
    targets = [FakeTarget(1), FakeTarget(2), FakeTarget(5)]
    chooser = balancer(targets, "weighted")
    n = 8000
    counts = [0, 0, 0]
    for _ in range(n):
        counts[chooser.pick(0.0)] += 1
    for count, weight in zip(counts, (1, 2, 5), strict=True):
        p = weight / 8
        assert abs(count - n * p) <= 5 * math.sqrt(n * p * (1 - p)), counts
    # With one excluded, the others keep their ratio.
    counts = [0, 0, 0]
    for _ in range(n):
        counts[chooser.pick(0.0, excluded=1 << 2)] += 1
    assert counts[2] == 0
    assert abs(counts[1] - n * 2 / 3) <= 5 * math.sqrt(n * 2 / 9), counts


def test_least_busy_takes_the_emptiest_and_shares_ties() -> None:
    targets = [FakeTarget() for _ in range(3)]
    targets[0].state.inflight = 4
    targets[1].state.inflight = 1
    targets[2].state.inflight = 1
    chooser = balancer(targets, "least_busy")
    picked = [chooser.pick(0.0) for _ in range(300)]
    assert set(picked) == {1, 2}


def test_latency_compares_two_and_decays_towards_retrying_a_slow_one() -> None:
    slow, fast = FakeTarget(), FakeTarget()
    slow.state.observe(2.0, 100.0)
    fast.state.observe(0.05, 100.0)
    chooser = balancer([slow, fast], "latency")
    assert {chooser.pick(100.0) for _ in range(100)} == {1}
    # A queue on the fast one counts: 0.05 x 50 in flight is worse than 2.0.
    fast.state.inflight = 49
    assert {chooser.pick(100.0) for _ in range(100)} == {0}
    fast.state.inflight = 0
    # Peak-sensitive: one slow answer counts at once, recovery is gradual.
    fast.state.observe(3.0, 101.0)
    assert fast.state.ewma == 3.0
    fast.state.observe(0.05, 102.0)
    assert 0.05 < fast.state.ewma < 3.0
    # Without samples the cost decays, so the slow one is tried again later.
    assert slow.state.cost(160.0) < slow.state.cost(100.0) / 100


def test_unknown_strategy_and_no_targets_are_refused() -> None:
    with pytest.raises(ValueError, match="strategy"):
        balancer([FakeTarget()], "fastest")
    with pytest.raises(ValueError, match="target"):
        Balancer((), "weighted", breakers=False)


def test_retry_after_values_are_read_as_seconds_or_dates() -> None:
    from email.utils import formatdate

    from relay.pipeline import _retry_after

    assert _retry_after([(b"Retry-After", b"7")]) == 7.0
    assert _retry_after([(b"retry-after", b" 1.5 ")]) == 1.5
    later = _retry_after([(b"Retry-After", formatdate(time.time() + 30, usegmt=True).encode())])
    assert 25 <= later <= 31
    assert _retry_after([(b"Retry-After", formatdate(time.time() - 30, usegmt=True).encode())]) == 0
    assert _retry_after([(b"Retry-After", b"soon")]) == 0.0
    assert _retry_after([(b"Retry-After", b"-3")]) == 0.0
    assert _retry_after([(b"X-Other", b"5")]) == 0.0
