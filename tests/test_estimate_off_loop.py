"""A large token estimate never holds the event loop: while one runs, the
same worker keeps answering everyone else.

The estimator is held mid-estimate by an event the test releases only after
another request on the same worker was answered. Were the estimate on the
loop, that request could not be answered before the release: the test
would fail (its client times out first), on any machine, however fast.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from relay.accounting.tokens import OFFLOAD_CHARS
from relay.testing import ThreadedFakeUpstream
from tests.support import RelayThread, make_config
from tests.test_usage_e2e import chat, post, usage_json, wait_usage

LARGE_TEXT = "lorem ipsum dolor sit amet " * 20000  # 540 KB of prompt


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_other_requests_are_answered_while_a_large_estimate_runs(
    fake_upstream: ThreadedFakeUpstream, loop: str
) -> None:
    config = make_config(fake_upstream.url, circuit_breaker={"enabled": False})
    with RelayThread(config, loop=loop) as relay:
        assert relay.gateway is not None
        estimator = relay.gateway.runtime.estimator
        real_count = estimator.count
        started, release = threading.Event(), threading.Event()
        released_in_time: list[bool] = []

        def held_count(text: str, model: str = "") -> int:
            if len(text) >= len(LARGE_TEXT):
                started.set()
                released_in_time.append(release.wait(20))
            return real_count(text, model)

        estimator.count = held_count  # type: ignore[method-assign]
        large: dict[str, Any] = {}

        def send_large() -> None:
            large["reply"] = post(
                relay.port, "/v1/chat/completions", chat(LARGE_TEXT),
                {"x-fake-no-usage": "1"},
            )  # fmt: skip

        sender = threading.Thread(target=send_large)
        sender.start()
        try:
            assert started.wait(30), "the large estimate did not start"
            # The estimate is under way (and held): this worker still answers.
            status, headers, _ = post(relay.port, "/v1/chat/completions", chat("small one"))
            assert status == 200
            assert not release.is_set() and not released_in_time
            snap, _ = usage_json(relay.port)
            assert snap["totals"]["requests"] == 1  # the small one; the large not yet
        finally:
            release.set()
            sender.join(30)
        assert large["reply"][0] == 200
        snap, _ = wait_usage(relay.port, lambda s: s["totals"]["requests"] == 2)
        assert released_in_time == [True]
        assert snap["totals"]["requests"] == 2
        assert snap["totals"]["estimated_requests"] == 1
        assert snap["totals"]["prompt_tokens"] > len(LARGE_TEXT) // 100
        assert len(LARGE_TEXT) > OFFLOAD_CHARS
