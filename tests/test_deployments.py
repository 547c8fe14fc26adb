"""Deployments through real sockets: routes with several fake upstreams,
balancing by weight, load and latency, failover before the first byte
(connect error, 5xx, 429, first-byte timeout), Retry-After measured on the
upstream's own clock, fallback models, open breakers, one attempt chain
per coalesced flight, bounded upstream pools and upstream credentials."""

from __future__ import annotations

import http.client
import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import anthropic
import openai
import pytest

from relay.testing import ThreadedFakeUpstream
from tests.support import free_port
from tests.test_usage_e2e import chat, get, post, sample, scrape

if TYPE_CHECKING:
    from tests.conftest import RelayFactory

CHAT = "/v1/chat/completions"
Fakes = Callable[[], ThreadedFakeUpstream]


@pytest.fixture
def fakes() -> Iterator[Fakes]:
    """Start fake upstreams for one test (each with exact request counts)."""
    started: list[ThreadedFakeUpstream] = []

    def make() -> ThreadedFakeUpstream:
        fake = ThreadedFakeUpstream().start()
        started.append(fake)
        return fake

    yield make
    for fake in started:
        fake.stop()


def label(fake: ThreadedFakeUpstream) -> str:
    return f"127.0.0.1:{fake.port}"


def route(*targets: dict[str, Any], model: str = "gpt-4o*", **extra: Any) -> dict[str, Any]:
    return {"model": model, "targets": list(targets), **extra}


def ask(port: int, content: str = "hello", model: str = "gpt-4o", **headers: str
        ) -> tuple[int, dict[str, str], bytes]:
    return post(port, CHAT, chat(content, model), headers)


def chats(fake: ThreadedFakeUpstream) -> int:
    return sum(1 for r in fake.requests if r.path == CHAT)


def five_sigma(n: int, p: float) -> tuple[float, float]:
    """Bounds a binomial(n, p) count leaves with probability < 1e-6."""
    mean, sigma = n * p, math.sqrt(n * p * (1 - p))
    return mean - 5 * sigma, mean + 5 * sigma


# --------------------------------------------------------------------------- #
# balancing
# --------------------------------------------------------------------------- #
def test_weighted_split_stays_within_binomial_bounds(relay_factory: RelayFactory, fakes: Fakes):
    heavy, light = fakes(), fakes()
    relay = relay_factory(heavy.url, routes=[route(
        {"url": heavy.url, "weight": 3, "name": "heavy"},
        {"url": light.url, "weight": 1, "name": "light"},
    )])
    n = 400
    said: dict[str, int] = {}
    for i in range(n):
        status, headers, _ = ask(relay.port, f"request {i}")
        assert status == 200
        said[headers["x-relay-upstream"]] = said.get(headers["x-relay-upstream"], 0) + 1
    low, high = five_sigma(n, 0.75)
    assert low <= chats(heavy) <= high, (chats(heavy), low, high)
    assert chats(heavy) + chats(light) == n
    # The header names the target that answered: its label, never its URL's key.
    assert said == {"heavy": chats(heavy), "light": chats(light)}


def test_least_busy_steers_away_from_a_target_holding_slow_requests(
    relay_factory: RelayFactory, fakes: Fakes
):
    slow, fast = fakes(), fakes()
    slow.set_faults({"x-fake-delay": 6})  # far longer than the 20 requests below
    relay = relay_factory(slow.url, routes=[route(
        {"url": slow.url}, {"url": fast.url}, strategy="least_busy")])
    # Send requests until one is parked on the slow target (ties between
    # idle targets go either way; the fast one answers its share at once).
    held: list[threading.Thread] = []
    answers: list[int] = []
    for i in range(40):
        if chats(slow) >= 1:
            break
        before = chats(slow) + chats(fast)
        thread = threading.Thread(target=lambda i=i: answers.append(ask(relay.port, f"p{i}")[0]))
        thread.start()
        held.append(thread)
        deadline = time.monotonic() + 5
        while chats(slow) + chats(fast) == before and time.monotonic() < deadline:
            time.sleep(0.005)
    assert chats(slow) == 1
    parked = chats(slow)
    for i in range(20):
        status, headers, _ = ask(relay.port, f"after {i}")
        assert status == 200 and headers["x-relay-upstream"] == label(fast)
    # One in flight there, none on the fast one: nothing more went to the busy one.
    assert chats(slow) == parked
    for thread in held:
        thread.join(20)
    assert answers and all(status == 200 for status in answers)


def test_latency_strategy_prefers_the_faster_target(relay_factory: RelayFactory, fakes: Fakes):
    slow, fast = fakes(), fakes()
    slow.set_faults({"x-fake-delay": 0.8})
    relay = relay_factory(slow.url, routes=[route(
        {"url": slow.url}, {"url": fast.url}, strategy="latency")])
    for i in range(40):
        assert ask(relay.port, f"latency {i}")[0] == 200
    # The slow one is tried while it is unmeasured (and again only once its
    # average has decayed, seconds later): a handful at most.
    assert chats(slow) <= 4, chats(slow)
    assert chats(fast) >= 36


# --------------------------------------------------------------------------- #
# failover before the first byte
# --------------------------------------------------------------------------- #
# Weights make the failing target the first choice of nearly every request
# (1 - 1e-6 each), so every answer below shows a failover.
def failing_first(bad_url: str, good: ThreadedFakeUpstream) -> dict[str, Any]:
    return route({"url": bad_url, "weight": 1_000_000, "name": "bad"},
                 {"url": good.url, "weight": 1, "name": "good"})


FAILOVERS = {
    "5xx": ({"x-fake-status": 503}, {}),
    "429": ({"x-fake-status": 429, "x-fake-retry-after": 120}, {}),
    # The good target must answer within it too, on a busy machine: 1 s.
    "timeout": ({"x-fake-delay": 5}, {"first_byte_timeout": 1.0}),
}


@pytest.mark.parametrize("kind", sorted(FAILOVERS))
def test_failover_to_the_next_target(relay_factory: RelayFactory, fakes: Fakes, kind: str):
    bad, good = fakes(), fakes()
    faults, proxy = FAILOVERS[kind]
    bad.set_faults(faults)
    relay = relay_factory(good.url, proxy=proxy, retries={"attempts": 1},
                          routes=[failing_first(bad.url, good)])
    for i in range(3):
        status, headers, body = ask(relay.port, f"{kind} {i}")
        assert status == 200, body
        assert headers["x-relay-upstream"] == "good"
        assert json.loads(body)["object"] == "chat.completion"
    assert chats(good) == 3
    tried = chats(bad)
    # A 429 with a long Retry-After cools its target down: later requests
    # skip it while another target is free.
    assert tried == (1 if kind == "429" else 3)
    _, samples, _ = scrape(relay.port)
    assert sample(samples, "relay_upstream_attempts_total", upstream="bad", outcome=kind) == tried
    assert sample(samples, "relay_upstream_attempts_total", upstream="good", outcome="ok") == 3
    # The same body went to both: re-sent unchanged.
    assert bad.requests[0].body == good.requests[0].body


def test_failover_on_connect_error(relay_factory: RelayFactory, fakes: Fakes):
    good = fakes()
    refused = f"http://127.0.0.1:{free_port()}"
    relay = relay_factory(good.url, retries={"attempts": 1},
                          routes=[failing_first(refused, good)])
    for i in range(3):
        status, headers, _ = ask(relay.port, f"connect {i}")
        assert status == 200 and headers["x-relay-upstream"] == "good"
    _, samples, _ = scrape(relay.port)
    assert sample(samples, "relay_upstream_attempts_total", upstream="bad", outcome="connect") == 3


def test_failover_on_reset_before_the_head_only_when_asked(
    relay_factory: RelayFactory, fakes: Fakes
):
    bad, good = fakes(), fakes()
    bad.set_faults({"x-fake-drop": 1})
    relay = relay_factory(good.url, retries={"attempts": 1, "on": ["reset"]},
                          routes=[failing_first(bad.url, good)])
    for i in range(3):
        status, headers, _ = ask(relay.port, f"reset {i}")
        assert status == 200 and headers["x-relay-upstream"] == "good"
    _, samples, _ = scrape(relay.port)
    assert sample(samples, "relay_upstream_attempts_total", upstream="bad", outcome="reset") == 3
    # Not asked for by default: the upstream may have acted on the request.
    other = relay_factory(good.url, retries={"attempts": 1}, routes=[failing_first(bad.url, good)])
    status, headers, body = ask(other.port, "reset, not retried")
    assert status == 502 and headers["x-relay-upstream"] == "bad"
    assert json.loads(body)["error"]["code"] == "bad_gateway"


def test_target_states_for_relays_own_pages(relay_factory: RelayFactory, fakes: Fakes):
    first, second = fakes(), fakes()
    for fake in (first, second):
        fake.set_faults({"x-fake-delay": 0.01})  # above the loop clock's resolution
    relay = relay_factory(first.url, proxy={"api_key": "sk-never-shown"}, routes=[route(
        {"url": first.url, "name": "first", "weight": 2}, {"url": second.url},
        strategy="latency")])
    for i in range(4):
        assert ask(relay.port, f"state {i}")[0] == 200
    deadline = time.monotonic() + 5
    while True:  # the last request's bookkeeping may trail its answer a little
        states = relay.call(lambda: relay.gateway.pipeline.target_states())
        if all(s["in_flight"] == 0 for s in states) or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    by_label = {s["upstream"]: s for s in states}
    assert set(by_label) == {"first", label(second), label(first)}  # proxy.target too
    assert by_label["first"]["weight"] == 2 and by_label["first"]["breaker"] == "closed"
    assert all(s["in_flight"] == 0 for s in states)
    assert sum(s["latency_seconds"] > 0 for s in states) >= 1
    assert "sk-never-shown" not in json.dumps(states)


def test_without_retries_the_failure_reaches_the_client(relay_factory: RelayFactory, fakes: Fakes):
    bad, good = fakes(), fakes()
    bad.set_faults({"x-fake-status": 503})
    relay = relay_factory(good.url, routes=[failing_first(bad.url, good)])
    status, headers, body = ask(relay.port)
    # attempts defaults to 0: the upstream's answer passes unchanged.
    assert status == 503 and headers["x-relay-upstream"] == "bad"
    assert json.loads(body)["error"]["message"].startswith("fake upstream error")
    assert chats(good) == 0


def test_no_retry_once_bytes_reached_the_client(relay_factory: RelayFactory, fakes: Fakes):
    bad, good = fakes(), fakes()
    bad.set_faults({"x-fake-reset-after": 40, "x-fake-event-delay": 0.05})
    relay = relay_factory(good.url, retries={"attempts": 3, "on": ["connect", "timeout", "reset",
                                                                     500, 502, 503, 504]},
                          routes=[failing_first(bad.url, good)])
    conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=10)
    conn.request("POST", CHAT, json.dumps(chat("cut me", stream=True)),
                 {"content-type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("x-relay-upstream") == "bad"
    with pytest.raises(http.client.IncompleteRead):
        resp.read()
    conn.close()
    assert chats(bad) == 1 and chats(good) == 0
    _, samples, _ = scrape(relay.port)
    assert sample(samples, "relay_upstream_attempts_total", upstream="bad", outcome="reset") == 1


def test_sdks_raise_on_a_stream_cut_after_the_first_byte(
    relay_factory: RelayFactory, fakes: Fakes
):
    cut = fakes()
    cut.set_faults({"x-fake-reset-after": 60, "x-fake-event-delay": 0.05})
    relay = relay_factory(cut.url, retries={"attempts": 2})
    client = openai.OpenAI(base_url=relay.url + "/v1", api_key="sk-x", max_retries=0, timeout=10)
    # The cut stream ends with an SSE error event before the close: the SDKs
    # raise their own API errors, never return a silently shortened answer.
    with pytest.raises(openai.APIError) as raised:
        for _ in client.chat.completions.create(
            model="gpt-4o", stream=True, messages=[{"role": "user", "content": "one two three"}]
        ):
            pass
    assert "broke off" in str(raised.value)
    claude = anthropic.Anthropic(base_url=relay.url, api_key="sk-ant", max_retries=0, timeout=10)
    with pytest.raises(anthropic.APIStatusError) as info:
        with claude.messages.stream(model="claude-3-5-sonnet", max_tokens=16,
                                    messages=[{"role": "user", "content": "one two"}]) as stream:
            for _ in stream:
                pass
    assert "broke off" in str(info.value)
    assert len(cut.requests) == 2  # one each: the cut streams were not sent again


# --------------------------------------------------------------------------- #
# Retry-After
# --------------------------------------------------------------------------- #
def test_retry_after_is_waited_for_on_the_only_target(relay_factory: RelayFactory, fakes: Fakes):
    only = fakes()
    only.set_faults({"x-fake-status": 429, "x-fake-retry-after": 1}, count=1)
    relay = relay_factory(only.url, retries={"attempts": 1})
    status, headers, _ = ask(relay.port)
    assert status == 200
    first, second = only.requests
    # Measured on the upstream's clock: the retry came no sooner than it said.
    assert second.received_at - first.received_at >= 1.0
    assert second.body == first.body


def test_a_retry_after_beyond_the_bound_passes_the_429_through(
    relay_factory: RelayFactory, fakes: Fakes
):
    only = fakes()
    only.set_faults({"x-fake-status": 429, "x-fake-retry-after": 5})
    relay = relay_factory(only.url, retries={"attempts": 2, "max_retry_after": 0.5})
    status, headers, body = ask(relay.port)
    assert status == 429 and headers["retry-after"] == "5"
    assert json.loads(body)["error"]
    assert len(only.requests) == 1


# --------------------------------------------------------------------------- #
# fallbacks
# --------------------------------------------------------------------------- #
def test_fallback_models_in_order_and_cached_under_the_request_sent(
    relay_factory: RelayFactory, fakes: Fakes
):
    primary, second, third = fakes(), fakes(), fakes()
    primary.set_faults({"x-fake-status": 503})
    second.set_faults({"x-fake-status": 500})
    relay = relay_factory(primary.url, cache={"enabled": True}, routes=[
        {"model": "gpt-4o", "target": primary.url,
         "fallback_models": ["gpt-4o-mini", "gpt-3.5-turbo"]},
        {"model": "gpt-4o-mini", "target": second.url},
        {"model": "gpt-3.5-turbo", "target": third.url},
    ])
    status, headers, body = ask(relay.port, "fall back")
    assert status == 200 and headers["x-relay-model"] == "gpt-3.5-turbo"
    assert headers["x-relay-upstream"] == label(third)
    assert json.loads(body)["model"] == "gpt-3.5-turbo"
    assert [r.json()["model"] for r in primary.requests] == ["gpt-4o"]
    assert [r.json()["model"] for r in second.requests] == ["gpt-4o-mini"]
    sent = third.requests[0].json()
    assert sent == dict(chat("fall back", "gpt-4o"), model="gpt-3.5-turbo")
    # The client asked for gpt-4o: the same request again is a hit.
    status, headers, again = ask(relay.port, "fall back")
    assert status == 200 and headers["x-relay-cache"] == "HIT" and again == body
    assert headers["x-relay-model"] == "gpt-3.5-turbo"
    assert len(primary.requests) + len(second.requests) + len(third.requests) == 3


# --------------------------------------------------------------------------- #
# breakers
# --------------------------------------------------------------------------- #
def test_an_open_target_gets_no_traffic_and_readiness_names_it(
    relay_factory: RelayFactory, fakes: Fakes
):
    bad, good = fakes(), fakes()
    bad.set_faults({"x-fake-status": 502})
    relay = relay_factory(
        good.url,
        circuit_breaker={"enabled": True, "failure_threshold": 1, "recovery_timeout": 60},
        retries={"attempts": 1},
        routes=[failing_first(bad.url, good)],
    )
    assert ask(relay.port, "opens it")[0] == 200
    assert chats(bad) == 1
    for i in range(20):
        status, headers, _ = ask(relay.port, f"skip {i}")
        assert status == 200 and headers["x-relay-upstream"] == "good"
    assert chats(bad) == 1
    status, raw = get(relay.port, "/readyz")
    ready = json.loads(raw)
    assert status == 200 and ready["status"] == "ready" and ready["open_targets"] == ["bad"]
    _, samples, _ = scrape(relay.port)
    assert sample(samples, "relay_circuit_breaker_state", upstream="bad") == 2
    assert sample(samples, "relay_circuit_breaker_state", upstream="good") == 0


def test_every_target_open_is_503_with_retry_after(relay_factory: RelayFactory):
    first, second = (f"http://127.0.0.1:{free_port()}" for _ in range(2))
    relay = relay_factory(
        first,
        circuit_breaker={"enabled": True, "failure_threshold": 1, "recovery_timeout": 60},
        retries={"attempts": 1},
        routes=[route({"url": first, "name": "one"}, {"url": second, "name": "two"})],
    )
    status, headers, body = ask(relay.port)
    assert status == 502  # both refused: the last failure is what the client hears
    status, headers, body = ask(relay.port)
    assert status == 503 and int(headers["retry-after"]) >= 1
    error = json.loads(body)["error"]
    assert error["code"] == "circuit_breaker_open" and error["message"]
    assert relay_factory  # keep fixture order obvious
    status, raw = get(relay.port, "/readyz")
    assert status in (200, 503)
    assert sorted(json.loads(raw)["open_targets"]) == ["one", "two"]


# --------------------------------------------------------------------------- #
# coalescing: one attempt chain per flight
# --------------------------------------------------------------------------- #
def test_followers_wait_while_the_leader_fails_over(relay_factory: RelayFactory, fakes: Fakes):
    bad, good = fakes(), fakes()
    bad.set_faults({"x-fake-status": 503, "x-fake-delay": 1.5})
    relay = relay_factory(good.url, cache={"enabled": True}, retries={"attempts": 1},
                          routes=[failing_first(bad.url, good)])
    results: list[tuple[int, str]] = []

    def one() -> None:
        status, headers, body = ask(relay.port, "same question")
        results.append((status, headers["x-relay-cache"]))

    threads = [threading.Thread(target=one) for _ in range(5)]
    threads[0].start()
    deadline = time.monotonic() + 5
    while not bad.requests and time.monotonic() < deadline:
        time.sleep(0.005)
    for thread in threads[1:]:
        thread.start()
    for thread in threads:
        thread.join(15)
    assert sorted(s for s, _ in results) == [200] * 5
    assert sorted(c for _, c in results).count("MISS") == 1
    # One chain for the whole flight: the failing target once, the good one once.
    assert chats(bad) == 1 and chats(good) == 1


@pytest.mark.parametrize(("faults", "proxy", "status"), [
    ({"x-fake-status": 503, "x-fake-delay": 1.0}, {}, 503),
    ({"x-fake-delay": 5}, {"first_byte_timeout": 1.0}, 504),
], ids=["upstream-503", "first-byte-timeout"])
def test_followers_share_the_failure_a_chain_ended_with(
    relay_factory: RelayFactory, fakes: Fakes, faults: dict[str, Any], proxy: dict[str, Any],
    status: int,
):
    one_bad, other_bad = fakes(), fakes()
    for fake in (one_bad, other_bad):
        fake.set_faults(faults)
    relay = relay_factory(one_bad.url, cache={"enabled": True}, proxy=proxy,
                          retries={"attempts": 1},
                          routes=[route({"url": one_bad.url}, {"url": other_bad.url})])
    results: list[tuple[int, str]] = []

    def one() -> None:
        got, headers, body = ask(relay.port, "everyone fails")
        assert json.loads(body)["error"]
        results.append((got, headers["x-relay-cache"]))

    threads = [threading.Thread(target=one) for _ in range(4)]
    threads[0].start()
    deadline = time.monotonic() + 5
    while chats(one_bad) + chats(other_bad) == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    for thread in threads[1:]:
        thread.start()
    for thread in threads:
        thread.join(20)
    # One chain for the flight: two attempts in all, every caller the same answer.
    assert results == [(status, "MISS")] * 4
    assert chats(one_bad) + chats(other_bad) == 2
    _, samples, _ = scrape(relay.port)
    assert sample(samples, "relay_cache_hits_total") == 0


# --------------------------------------------------------------------------- #
# pools: a stale socket's retry opens a new connection; connections bounded
# --------------------------------------------------------------------------- #
def test_stale_socket_retry_goes_on_a_new_connection(relay_factory: RelayFactory, fakes: Fakes):
    up = fakes()
    relay = relay_factory(up.url)
    # Two requests at once leave two idle keep-alive sockets in relay's pool.
    threads = [threading.Thread(target=ask, args=(relay.port, f"warm {i}"),
                                kwargs={"x-fake-delay": "0.3"}) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert up.connections_opened == 2
    # Both go stale: a request on a used connection is met with a reset.
    up.set_faults({"x-fake-drop-reused": 1})
    status, _, body = ask(relay.port, "after the drop")
    # Taking the second idle socket would have met a reset again (502).
    assert status == 200, body
    assert up.connections_opened == 3
    assert len(up.requests) == 4


def test_followers_wait_for_the_stale_socket_retry(relay_factory: RelayFactory, fakes: Fakes):
    up = fakes()
    relay = relay_factory(up.url, cache={"enabled": True})
    assert ask(relay.port, "warm")[0] == 200  # leaves one idle keep-alive socket
    # That socket goes stale; the new connection's answer takes a while, so
    # the followers below join the flight while the leader retries.
    up.set_faults({"x-fake-drop-reused": 1, "x-fake-delay": 1.5})
    results: list[tuple[int, str]] = []

    def one() -> None:
        status, headers, _ = ask(relay.port, "asked three times")
        results.append((status, headers["x-relay-cache"]))

    leader = threading.Thread(target=one)
    leader.start()
    deadline = time.monotonic() + 5
    while len(up.requests) < 3 and time.monotonic() < deadline:  # warm, dropped, resent
        time.sleep(0.005)
    followers = [threading.Thread(target=one) for _ in range(2)]
    for thread in followers:
        thread.start()
    for thread in [leader, *followers]:
        thread.join(15)
    assert sorted(results) == [(200, "HIT"), (200, "HIT"), (200, "MISS")]
    assert len(up.requests) == 3 and up.connections_opened == 2


def test_connections_per_upstream_are_bounded(relay_factory: RelayFactory, fakes: Fakes):
    up = fakes()
    relay = relay_factory(up.url, proxy={"max_connections": 1, "connect_timeout": 0.5})
    slow = threading.Thread(target=ask, args=(relay.port, "holds it"), kwargs={"x-fake-delay": "3"})
    slow.start()
    deadline = time.monotonic() + 5
    while not up.requests and time.monotonic() < deadline:
        time.sleep(0.005)
    status, headers, body = ask(relay.port, "no room")
    assert status == 503 and headers["retry-after"] == "1"
    error = json.loads(body)["error"]
    assert error["code"] == "upstream_connections_exhausted" and "busy" in error["message"]
    assert headers["x-relay-upstream"] == label(up)
    slow.join(10)
    assert up.connections_opened == 1
    # The slot count follows the sockets: one open (idle now), none leaked.
    (pool,) = relay.call(lambda: relay.gateway.runtime.pools.all())
    assert relay.call(lambda: pool.open) == 1 and pool.idle_count == 1


def test_a_bounded_pool_waits_for_a_connection_to_come_free(
    relay_factory: RelayFactory, fakes: Fakes
):
    up = fakes()
    relay = relay_factory(up.url, proxy={"max_connections": 1, "connect_timeout": 5})
    results: list[int] = []
    threads = [threading.Thread(target=lambda i=i: results.append(
        ask(relay.port, f"queued {i}", **{"x-fake-delay": "0.2"})[0])) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(15)
    assert results == [200, 200, 200]
    assert up.connections_opened == 1


# --------------------------------------------------------------------------- #
# upstream credentials
# --------------------------------------------------------------------------- #
def credentials(fake: ThreadedFakeUpstream) -> list[dict[str, str]]:
    return [{k: v for k, v in r.headers if k in ("authorization", "x-api-key", "api-key")}
            for r in fake.requests]


def test_provider_sees_only_the_configured_key(relay_factory: RelayFactory, fakes: Fakes):
    openai_up, claude_up, azure_up, plain_up = fakes(), fakes(), fakes(), fakes()
    relay = relay_factory(
        openai_up.url,
        proxy={"api_key": "sk-provider-openai"},
        routes=[
            {"path": "/v1/messages", "target": claude_up.url, "api_key": "sk-ant-provider",
             "auth": "x-api-key"},
            route({"url": azure_up.url, "api_key": "azure-provider", "auth": "api-key",
                   "name": "azure"}, model="gpt-4o-azure"),
            {"model": "gpt-4o-plain", "target": plain_up.url},
        ],
        log={"requests": True},
    )
    client = openai.OpenAI(base_url=relay.url + "/v1", api_key="sk-client-own", max_retries=0)
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "a"}])
    client.chat.completions.create(model="gpt-4o-azure", messages=[{"role": "user", "content": "b"}])
    reply = client.chat.completions.with_raw_response.create(
        model="gpt-4o-plain", messages=[{"role": "user", "content": "c"}])
    claude = anthropic.Anthropic(base_url=relay.url, api_key="sk-ant-client-own", max_retries=0)
    message = claude.messages.with_raw_response.create(
        model="claude-3-5-sonnet", max_tokens=8, messages=[{"role": "user", "content": "d"}])
    assert credentials(openai_up) == [{"authorization": "Bearer sk-provider-openai"}]
    assert credentials(azure_up) == [{"api-key": "azure-provider"}]
    assert credentials(claude_up) == [{"x-api-key": "sk-ant-provider"}]
    # A route without a key of its own passes the client's, and does not
    # inherit proxy.api_key.
    assert credentials(plain_up) == [{"authorization": "Bearer sk-client-own"}]
    assert reply.headers["x-relay-upstream"] == label(plain_up)
    assert message.headers["x-relay-upstream"] == label(claude_up)
    _, _, text = scrape(relay.port)
    _, usage = get(relay.port, "/relay/usage")
    _, ready = get(relay.port, "/readyz")
    for shown in (text, usage.decode(), ready.decode(), repr(relay.config)):
        for secret in ("sk-provider-openai", "sk-ant-provider", "azure-provider"):
            assert secret not in shown


def test_route_target_and_proxy_keys_come_from_the_environment(tmp_path: Any) -> None:
    from relay.config import load_config

    path = tmp_path / "relay.yaml"
    path.write_text(
        'routes:\n'
        '  - model: "gpt-*"\n'
        '    api_key: "${ROUTE_KEY}"\n'
        '    targets:\n'
        '      - {url: "http://127.0.0.1:1", name: a}\n'
        '      - {url: "http://127.0.0.1:2", api_key: own-secret-3, auth: api-key}\n'
    )
    config = load_config(str(path), env={"PROXY_API_KEY": "proxy-secret-1", "ROUTE_KEY": "route-secret-2"})
    assert config.proxy.api_key == "proxy-secret-1" and config.proxy.auth == "bearer"
    first, second = config.routes[0].targets
    assert (first.api_key, first.auth, first.name) == ("route-secret-2", "bearer", "a")
    assert (second.api_key, second.auth) == ("own-secret-3", "api-key")
    for secret in ("proxy-secret-1", "route-secret-2", "own-secret-3"):
        assert secret not in repr(config)


# --------------------------------------------------------------------------- #
# bad input: refused at load and at reload, with file, key and reason
# --------------------------------------------------------------------------- #
SOMEWHERE = "http://127.0.0.1:9"
BAD_DEPLOYMENTS = [
    ({"routes": [{"model": "a*", "target": SOMEWHERE, "targets": [{"url": SOMEWHERE}]}]},
     "routes[0]", "both target and targets"),
    ({"routes": [route({"url": SOMEWHERE, "weight": 0})]},
     "routes[0].targets[0].weight", "must be a number > 0"),
    ({"routes": [route({"url": SOMEWHERE, "weight": -2})]},
     "routes[0].targets[0].weight", "must be a number > 0"),
    ({"routes": [route({"url": SOMEWHERE}, strategy="fastest")]},
     "routes[0].strategy", "must be one of weighted | least_busy | latency"),
    ({"routes": [route({"url": SOMEWHERE}, fallback_models=["llama-3"])]},
     "routes[0].fallback_models[0]", "no route serves model 'llama-3'"),
    ({"retries": {"attempts": -1}}, "retries.attempts", "must be >= 0"),
]


@pytest.mark.parametrize(("section", "key", "reason"), BAD_DEPLOYMENTS,
                         ids=[f"{k}:{r[:20]}" for _, k, r in BAD_DEPLOYMENTS])
def test_bad_deployment_config_is_refused_at_load(section: dict[str, Any], key: str, reason: str):
    from relay.config import ConfigError, load_config
    from tests.support import write_config

    path = write_config({"proxy": {"target": SOMEWHERE}, **section})
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert any(p.file == path and p.key == key and reason in p.reason
               for p in info.value.problems), info.value.problems


def test_bad_deployment_edits_are_refused_at_reload(fakes: Fakes, tmp_path: Any, caplog: Any):
    from tests.test_reload import reload_errors, start, until, write

    up = fakes()
    path = str(tmp_path / "relay.yaml")
    good = {"server": {"port": "127.0.0.1:0", "shutdown_timeout": 2},
            "proxy": {"target": up.url}, "cache": {"enabled": False},
            "ratelimit": {"enabled": False}, "circuit_breaker": {"enabled": False},
            "routes": [route({"url": up.url, "name": "only"})]}
    relay = start(path, good)
    try:
        for count, (section, key, _) in enumerate(BAD_DEPLOYMENTS, 1):
            write(path, {**good, **section})
            until(lambda count=count: reload_errors(relay.port) == count)
            # The last good config is still the one in force.
            status, headers, _ = ask(relay.port, f"still served {count}")
            assert status == 200 and headers["x-relay-upstream"] == "only"
            refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
            assert any(key in m and path in m for m in refused), (key, refused)
    finally:
        relay.stop()


def test_targets_and_strategy_change_live_and_breakers_survive_the_reload(
    fakes: Fakes, tmp_path: Any
):
    from tests.test_reload import start, until, write

    bad, first, second = fakes(), fakes(), fakes()
    bad.set_faults({"x-fake-status": 500})
    path = str(tmp_path / "relay.yaml")
    config = {"server": {"port": "127.0.0.1:0", "shutdown_timeout": 2},
              "proxy": {"target": first.url}, "cache": {"enabled": False},
              "ratelimit": {"enabled": False},
              "circuit_breaker": {"enabled": True, "failure_threshold": 1, "recovery_timeout": 60},
              "retries": {"attempts": 1},
              "routes": [route({"url": bad.url, "name": "bad", "weight": 1_000_000},
                               {"url": first.url, "name": "first"})]}
    relay = start(path, config)
    try:
        assert ask(relay.port, "opens bad")[1]["x-relay-upstream"] == "first"
        assert chats(bad) == 1
        edited = dict(config, routes=[route(
            {"url": bad.url, "name": "bad", "weight": 1_000_000},
            {"url": first.url, "name": "first"}, {"url": second.url, "name": "second"},
            strategy="least_busy")])
        write(path, edited)
        until(lambda: ask(relay.port, "new target?")[1]["x-relay-upstream"] == "second")
        # The breaker opened before the reload is still open after it.
        for i in range(10):
            assert ask(relay.port, f"after reload {i}")[1]["x-relay-upstream"] in ("first", "second")
        assert chats(bad) == 1
    finally:
        relay.stop()
