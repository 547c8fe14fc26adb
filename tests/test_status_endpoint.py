"""``GET /relay/status`` and ``GET /relay/`` over real sockets: the live figures
after a known mix of requests (one process, and two worker processes summed),
and the page's headers (strict Content-Security-Policy, nothing from another
origin)."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest

from relay.ops.status import histogram_quantile
from relay.testing.fake_upstream import ThreadedFakeUpstream
from tests.support import free_port, relay_workers
from tests.test_usage_e2e import KEY_HASH, MODELS, OTHER_KEY, chat, counted, get, post, wait_usage


@pytest.fixture(scope="module")
def upstream():
    with ThreadedFakeUpstream() as fake:
        yield fake


def status_json(port: int) -> dict[str, Any]:
    code, raw = get(port, "/relay/status")
    assert code == 200
    return json.loads(raw)


def wait_status(port: int, requests: int, timeout: float = 10.0) -> dict[str, Any]:
    """Poll until ``requests`` are counted (a request is counted just after
    its client has the answer)."""
    deadline = time.monotonic() + timeout
    while True:
        status = status_json(port)
        if status["requests"]["total"] >= requests or time.monotonic() > deadline:
            return status
        time.sleep(0.02)


def test_status_figures_match_the_requests_made(relay_factory, upstream):
    dead = free_port()  # nothing listens: connect refused
    relay = relay_factory(
        upstream.url,
        models=MODELS,
        cache={"enabled": True},
        ratelimit={"enabled": True, "requests_per_second": 0.001, "burst": 7},
        circuit_breaker={"enabled": True, "failure_threshold": 2, "recovery_timeout": 300},
        routes=[{"model": "dead-*", "target": f"http://127.0.0.1:{dead}"}],
    )
    port = relay.port
    good = f"127.0.0.1:{upstream.port}"
    bad = f"127.0.0.1:{dead}"
    answers = [
        post(port, "/v1/chat/completions", chat("status one")),  # miss, 200
        post(port, "/v1/chat/completions", chat("status one")),  # hit, 200
        post(port, "/v1/chat/completions", chat("status two")),  # miss, 200
        post(port, "/v1/chat/completions", chat("status 500"), {"x-fake-status": "500"}),  # miss
        post(port, "/v1/chat/completions", chat("down", model="dead-1")),  # 502
        post(port, "/v1/chat/completions", chat("down", model="dead-2")),  # 502, opens it
        post(port, "/v1/chat/completions", chat("down", model="dead-3")),  # 503 at once
        post(port, "/v1/chat/completions", chat("limited")),  # 429: the bucket of 7 is empty
        post(port, "/v1/chat/completions", chat("limited too")),  # 429
        post(port, "/v1/chat/completions", chat("other key"), auth=f"Bearer {OTHER_KEY}"),
    ]
    assert [a[0] for a in answers] == [200, 200, 200, 500, 502, 502, 503, 429, 429, 200]
    # relay's own endpoints are not traffic: reading them changes nothing.
    for path in ("/metrics", "/relay/usage", "/relay/status", "/relay/", "/healthz"):
        assert get(port, path)[0] == 200

    status = wait_status(port, len(answers))
    assert status["scope"] == "instance" and status["metrics_enabled"] is True
    assert status["requests"] == {
        "total": 10,
        "by_status": {"1xx": 0, "2xx": 4, "3xx": 0, "4xx": 2, "5xx": 4},
    }
    # Misses: the first of each distinct cacheable body that went upstream
    # (one, two, 500, the three dead ones and the other key's).
    assert status["cache"] == {"hits": 1, "misses": 7}
    assert status["ratelimit"] == {"rejected": 2, "by_key_type": {"api_key": 2}}
    assert status["errors"] == {"5xx": 4, "redis": 0, "config_reload": 0}
    assert status["duration"]["count"] == 10
    assert status["keys"]["rejected"] == 0
    assert set(status["upstreams"]) == {good, bad}

    ok = status["upstreams"][good]
    assert ok["state"] == "closed" and ok["state_code"] == 0
    assert ok["requests"] == 7 and ok["errors"] == 1
    assert ok["by_status"] == {"1xx": 0, "2xx": 4, "3xx": 0, "4xx": 2, "5xx": 1}
    assert ok["attempts"] == {"ok": 3, "5xx": 1}
    assert ok["failed_attempts"] == 1 and ok["error_rate"] == 0.25
    # First byte measured for the 4 answers that came from the upstream.
    assert ok["ttfb"]["count"] == 4
    assert 0 < ok["ttfb"]["p50_seconds"] <= ok["ttfb"]["p95_seconds"]

    down = status["upstreams"][bad]
    assert down["state"] == "open" and down["state_code"] == 2
    assert down["requests"] == 3 and down["errors"] == 3
    assert down["ttfb"]["count"] == 0 and down["ttfb"]["p50_seconds"] is None
    assert down["attempts"] == {"ok": 0, "connect": 2} and down["error_rate"] == 1.0

    # The page's other source agrees on what it shares with this one.
    usage, _ = wait_usage(port, counted(4))
    assert usage["totals"]["cache_hits"] == status["cache"]["hits"]
    raw = get(port, "/relay/status")[1].decode()
    assert "sk-usage" not in raw and KEY_HASH not in raw  # keys are not in the figures


def test_status_page_is_self_contained_with_a_strict_policy(relay_factory, upstream):
    import http.client

    relay = relay_factory(upstream.url)
    conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=10)
    conn.request("GET", "/relay/")
    resp = conn.getresponse()
    body = resp.read()
    assert resp.status == 200
    assert resp.getheader("Content-Type") == "text/html; charset=utf-8"
    assert resp.getheader("X-Content-Type-Options") == "nosniff"
    assert resp.getheader("Cache-Control") == "no-store"
    policy = dict(
        part.strip().split(" ", 1) for part in resp.getheader("Content-Security-Policy").split(";")
    )
    assert policy["default-src"] == "'none'"
    assert policy["connect-src"] == "'self'"
    assert policy["frame-ancestors"] == "'none'" and policy["form-action"] == "'none'"
    # Script and style are admitted by hash only: no 'unsafe-inline', no origin.
    for directive in ("script-src", "style-src"):
        assert re.fullmatch(r"'sha256-[A-Za-z0-9+/]+=*'", policy[directive]), policy[directive]
    text = body.decode()
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in text and "src=" not in text
    assert "innerHTML" not in text and "localStorage" not in text and "document.cookie" not in text

    conn.request("GET", "/relay")
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 308 and resp.getheader("Location") == "/relay/"
    conn.close()
    assert not any(r.path.startswith("/relay") for r in upstream.requests)  # never proxied


def send_until_open(port: int, target: str, limit: int = 40) -> dict[str, Any]:
    """Requests to the two-target route until *target*'s breaker shows open."""
    for i in range(limit):
        assert post(port, "/v1/chat/completions", chat(f"targets {i}", model="multi-1"))[0] == 200
        status = status_json(port)
        if status["upstreams"].get(target, {}).get("state") == "open":
            return status
    raise AssertionError(f"{target} never opened: {status}")


TWO_TARGETS = {
    "model": "multi-*",
    "strategy": "weighted",
}


def two_targets(upstream_url: str, dead: int) -> dict[str, Any]:
    """A route over a target that is down (picked first almost always) and one that works."""
    return {**TWO_TARGETS, "targets": [
        {"url": f"http://127.0.0.1:{dead}", "name": "primary", "weight": 1000},
        {"url": upstream_url, "name": "backup", "weight": 1},
    ]}  # fmt: skip


def test_status_shows_each_target_of_a_route(relay_factory, upstream):
    dead = free_port()
    relay = relay_factory(
        upstream.url,
        routes=[two_targets(upstream.url, dead)],
        retries={"attempts": 1},
        circuit_breaker={"enabled": True, "failure_threshold": 2, "recovery_timeout": 300},
    )
    status = send_until_open(relay.port, "primary")
    answered = status["requests"]["total"]
    primary, backup = status["upstreams"]["primary"], status["upstreams"]["backup"]
    # Each failed try on primary was retried on backup: every client got a 200.
    assert status["requests"]["by_status"]["2xx"] == answered
    assert primary["state"] == "open" and primary["attempts"] == {"ok": 0, "connect": 2}
    assert primary["requests"] == 0 and primary["error_rate"] == 1.0
    assert backup["state"] == "closed" and backup["requests"] == answered
    assert backup["attempts"] == {"ok": answered} and backup["error_rate"] == 0.0
    # Open, primary is skipped: the next request goes straight to backup.
    assert post(relay.port, "/v1/chat/completions", chat("after", model="multi-2"))[0] == 200
    status = wait_status(relay.port, answered + 1)
    assert status["upstreams"]["primary"]["attempts"] == {"ok": 0, "connect": 2}
    assert status["upstreams"]["backup"]["attempts"] == {"ok": answered + 1}


def two_worker_sections(upstream_url: str) -> dict[str, Any]:
    """The config of the two-worker runs: memory cache on, no rate limit."""
    return {
        "proxy": {"target": upstream_url},
        "cache": {"enabled": True},
        "ratelimit": {"enabled": False},
        "models": MODELS,
    }


def test_status_sums_two_workers(upstream, tmp_path):
    n = 30
    with relay_workers(two_worker_sections(upstream.url), str(tmp_path / "prom")) as port:
        # Fresh connections: SO_REUSEPORT spreads them over both workers;
        # every third body repeats the one before it (a hit on that worker,
        # or a miss if the other worker answered the first).
        for i in range(n):
            code = post(port, "/v1/chat/completions", chat(f"two workers {i - (i % 3 == 2)}"))[0]
            assert code == 200
        status = wait_status(port, n)
        # Each read is a new connection: both workers answer some, all the same.
        for _ in range(6):
            status = status_json(port)
            assert status["requests"]["total"] == n
            assert status["requests"]["by_status"]["2xx"] == n
            cache = status["cache"]
            assert cache["hits"] + cache["misses"] == n
            assert 0 < cache["misses"] <= n
            assert sum(u["requests"] for u in status["upstreams"].values()) == n
            assert sum(u["ttfb"]["count"] for u in status["upstreams"].values()) == cache["misses"]
        usage, _ = wait_usage(port, counted(n))
        assert usage["totals"]["requests"] == cache["misses"]
        assert usage["totals"]["cache_hits"] == cache["hits"]


def test_histogram_quantile_interpolates_like_prometheus():
    inf = float("inf")
    assert histogram_quantile(0.5, []) is None
    assert histogram_quantile(0.5, [(0.1, 0), (inf, 0)]) is None
    # 10 observations, all in (0.1, 0.2]: the median is halfway through it.
    buckets = [(0.1, 0.0), (0.2, 10.0), (0.5, 10.0), (inf, 10.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.15)
    assert histogram_quantile(0.95, buckets) == pytest.approx(0.195)
    # A rank in the +Inf bucket answers the largest finite bound.
    assert histogram_quantile(0.99, [(0.1, 1.0), (inf, 10.0)]) == 0.1


def test_status_says_when_metrics_are_off(relay_factory, upstream):
    relay = relay_factory(upstream.url, metrics={"enabled": False})
    assert post(relay.port, "/v1/chat/completions", chat("metrics off"))[0] == 200
    status = status_json(relay.port)
    assert status["metrics_enabled"] is False
    assert status["requests"]["total"] == 0 and status["cache"] == {"hits": 0, "misses": 0}
