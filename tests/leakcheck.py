"""pytest plugin: after every test, whatever relay opened is closed again.

relay's debug mode (relay/debug.py, ``RELAY_DEBUG=1``) registers each
connection, request, exchange, flight, follower, background task and
gateway while it is open. The fixture below waits (bounded) until all of
them are closed once a test is over, its relays stopped, and fails the test
with the list of what is still open otherwise. A test that opened nothing
passes the check at once.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from relay import debug

SETTLE_TIMEOUT = 5.0  # closing is asynchronous: a stopped relay's last callbacks


def check_released(timeout: float = SETTLE_TIMEOUT) -> None:
    """Fail unless every debug count and buffer returns to zero within *timeout*.

    On failure the registry is reset, so the next test is judged on its own.
    """
    left = debug.counters.settle(timeout)
    if not left:
        return
    objects = debug.counters.open_objects()
    debug.counters.reset()
    lines = [f"still open or held after the test (waited {timeout:g} s): {left}"]
    for kind, descriptions in sorted(objects.items()):
        lines.append(f"  {kind}:")
        lines.extend(f"    {text}" for text in descriptions[:10])
        if len(descriptions) > 10:
            lines.append(f"    ... and {len(descriptions) - 10} more")
    pytest.fail("\n".join(lines), pytrace=False)


@pytest.fixture(autouse=True)
def released_after_test() -> Iterator[None]:
    """Autouse, so it is set up first and torn down last: after the test's relays stopped."""
    if not debug.ENABLED:
        raise RuntimeError("the suite runs in relay's debug mode: set RELAY_DEBUG=1 before relay is imported")
    yield
    check_released()
