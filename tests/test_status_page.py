"""The status page at ``/relay/`` in headless Chromium, after real traffic.

What the page shows is read from its DOM (the text a person sees) and
compared with ``/relay/usage`` and ``/relay/status`` fetched by the test:
totals, the per-model and per-key tables, the cache, rejections and each
target's breaker. The page must ask nothing of any other origin, raise no
script error, fit 1280 and 390 pixel wide screens without sideways
scrolling, and be usable with the keyboard alone. Screenshots of both
widths go to ``$RELAY_TEST_ARTIFACTS`` (default: ``relay-artifacts`` in the
temp directory); they are not part of the repository.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from relay.testing.fake_upstream import ThreadedFakeUpstream
from tests.browser import Browser, Page
from tests.redis_server import RedisServer
from tests.support import RelayThread, free_port, make_config, relay_workers
from tests.test_status_endpoint import send_until_open, two_targets, two_worker_sections
from tests.test_usage_e2e import MODELS, chat, counted, get, post, wait_usage

KEYS = ("sk-page-first-0123456789", "sk-page-second-9876543210")
# What the page's script does to numbers (en-US grouping, 6 decimals in USD).
usd = "${:.6f}".format


def count(n: float) -> str:
    return f"{int(n):,}"


@pytest.fixture(scope="module")
def upstream() -> Iterator[ThreadedFakeUpstream]:
    with ThreadedFakeUpstream() as fake:
        yield fake


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with Browser() as chromium:
        yield chromium


def artifacts_dir() -> str:
    path = os.environ.get("RELAY_TEST_ARTIFACTS") or os.path.join(
        tempfile.gettempdir(), "relay-artifacts"
    )
    os.makedirs(path, exist_ok=True)
    return path


# The figures as the page shows them, read from its DOM.
SHOWN = """(() => {
  const text = (id) => document.getElementById(id).textContent;
  const table = (id) => Array.from(document.querySelectorAll(`#${id} tbody tr`),
    (tr) => Array.from(tr.cells, (td) => td.textContent));
  return {
    cost: text("cost-usd"), prompt: text("prompt-tokens"), completion: text("completion-tokens"),
    upstream_requests: text("upstream-requests"), saved: text("saved-usd"),
    requests: text("requests-total"), hit_rate: text("hit-rate"), hits: text("cache-hits"),
    misses: text("cache-misses"), rate: text("rate"), error_rate: text("error-rate"),
    ratelimited: text("ratelimit-rejected"), budget: text("budget-rejected"),
    legend: text("status-legend"), scope: text("usage-scope"),
    models: table("models-table"), keys: table("keys-table"), targets: table("upstreams-table"),
    charts: Array.from(document.querySelectorAll("svg[role=img]"), (s) => [
      s.getAttribute("aria-label"), s.querySelectorAll("rect.bar, rect[class^=bar-], polyline").length]),
  };
})()"""


def updates(page: Page) -> int:
    return int(page.evaluate("Number(document.body.dataset.updates || 0)"))


def open_page(browser: Browser, url: str, width: int = 1280) -> Page:
    page = browser.page(width, 900)
    page.goto(url + "/relay/")
    page.wait_for("Number(document.body.dataset.updates || 0) >= 1")
    return page


def usage_rows(group: dict[str, dict[str, Any]]) -> list[list[str]]:
    """A usage group as the page's table shows it (most spend first)."""
    ordered = sorted(group.items(), key=lambda item: (-item[1]["cost_usd"], item[0]))
    return [
        [name, count(r["requests"]), count(r["prompt_tokens"]), count(r["completion_tokens"]),
         usd(r["cost_usd"]), count(r["cache_hits"]), usd(r["saved_usd"])]
        for name, r in ordered
    ]  # fmt: skip


def assert_matches_usage(shown: dict[str, Any], usage: dict[str, Any]) -> None:
    totals = usage["totals"]
    assert shown["cost"] == usd(totals["cost_usd"])
    assert shown["prompt"] == count(totals["prompt_tokens"])
    assert shown["completion"] == count(totals["completion_tokens"])
    assert shown["upstream_requests"] == count(totals["requests"])
    assert shown["saved"] == usd(totals["saved_usd"])
    assert shown["models"] == usage_rows(usage["models"])
    assert shown["keys"] == usage_rows(usage["keys"])


def wait_shown(page: Page, usage: dict[str, Any], timeout: float = 20.0) -> dict[str, Any]:
    """The page's figures once it shows these totals (it refreshes every few seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        shown = page.evaluate(SHOWN)
        if shown["cost"] == usd(usage["totals"]["cost_usd"]) and shown[
            "upstream_requests"
        ] == count(usage["totals"]["requests"]):
            return shown
        assert time.monotonic() < deadline, (shown, usage["totals"])
        time.sleep(0.2)


def sdk_traffic(url: str, dead_model: str | None = None) -> tuple[dict[str, int], openai.OpenAI]:
    """A known mix through the official SDK: two keys, two models, repeats
    (cache hits), a 5xx, rate-limited calls and a target that is down."""
    outcomes: dict[str, int] = {}

    def note(what: str) -> None:
        outcomes[what] = outcomes.get(what, 0) + 1

    for key in KEYS:
        client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=20)
        for i in range(6):
            model = "gpt-4o" if i % 2 else "gpt-4"
            try:
                client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": f"page {key[-4:]} {i % 4}"}]
                )
                note("ok")
            except openai.RateLimitError:
                note("429")
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEYS[0], max_retries=0, timeout=20)
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "boom"}],
            extra_headers={"x-fake-status": "500"},
        )  # fmt: skip
    if dead_model is not None:
        for _ in range(3):  # two failures open its breaker; the third is refused at once
            with pytest.raises(openai.APIStatusError):
                client.chat.completions.create(
                    model=dead_model, messages=[{"role": "user", "content": "down"}]
                )
    return outcomes, client


def test_page_figures_match_usage_after_sdk_traffic(browser, upstream):
    dead = free_port()
    config = make_config(
        upstream.url,
        models=MODELS,
        cache={"enabled": True},
        ratelimit={"enabled": True, "requests_per_second": 0.001, "burst": 10},
        circuit_breaker={"enabled": True, "failure_threshold": 2, "recovery_timeout": 300},
        routes=[{"model": "dead-*", "target": f"http://127.0.0.1:{dead}"}],
        server={"shutdown_timeout": 1},
    )
    with RelayThread(config) as relay:
        outcomes, first_key = sdk_traffic(relay.url, dead_model="dead-model")
        assert outcomes == {"ok": 12}
        # The first key has made 10 calls: its bucket of 10 is empty.
        with pytest.raises(openai.RateLimitError):
            first_key.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
        usage, _ = wait_usage(relay.port, counted(12))
        page = open_page(browser, relay.url)
        shown = wait_shown(page, usage)
        assert_matches_usage(shown, usage)
        status = json.loads(get(relay.port, "/relay/status")[1])
        assert shown["requests"] == count(status["requests"]["total"])
        cache = status["cache"]
        assert cache["hits"] == usage["totals"]["cache_hits"] == 4
        assert shown["hits"] == count(cache["hits"]) and shown["misses"] == count(cache["misses"])
        assert shown["hit_rate"] == f"{100 * cache['hits'] / (cache['hits'] + cache['misses']):.1f}%"
        # Breaker state as text, not only as a colour.
        targets = {row[0]: row for row in shown["targets"]}
        assert targets[f"127.0.0.1:{upstream.port}"][1] == "✓ closed"
        assert targets[f"127.0.0.1:{dead}"][1] == "✕ open"
        assert targets[f"127.0.0.1:{dead}"][3] == "3" and targets[f"127.0.0.1:{dead}"][4] == "100.0%"
        assert "5xx: 4" in shown["legend"] and "2xx: 12" in shown["legend"]
        assert shown["ratelimited"] == "1" and "4xx: 1" in shown["legend"]
        # Charts, not only tables: bars for every model and key, the status mix.
        charts = dict(shown["charts"])
        assert charts["Spend by model"] == len(usage["models"])
        assert charts["Spend by key"] == len(usage["keys"])
        assert charts["Responses by status class"] >= 2

        # More traffic while the page is open: it refreshes by itself, the
        # rate becomes positive, and the figures still match.
        seen = updates(page)
        before = usage["totals"]["requests"] + usage["totals"]["cache_hits"]
        for i in range(4):
            assert post(relay.port, "/v1/chat/completions", chat(f"live {i}"), auth=None)[0] == 200
        usage, _ = wait_usage(relay.port, counted(before + 4))
        shown = wait_shown(page, usage)
        assert updates(page) > seen
        assert float(shown["rate"]) > 0
        assert_matches_usage(shown, usage)
        assert "anonymous" in [row[0] for row in shown["keys"]]

        # It asked for nothing but relay's own endpoints, and raised nothing.
        urls = {e["request"]["url"] for e in page.events("Network.requestWillBeSent")}
        assert urls <= {relay.url + p for p in ("/relay/", "/relay/usage", "/relay/status")}, urls
        assert page.events("Runtime.exceptionThrown") == []
        assert page.events("Page.javascriptDialogOpening") == []

        for width in (1280, 390):
            page.set_viewport(width, 900)
            before = updates(page)
            page.wait_for(f"Number(document.body.dataset.updates) > {before}")  # redrawn at width
            assert page.evaluate("document.documentElement.scrollWidth") <= width
            assert_matches_usage(page.evaluate(SHOWN), usage)
            page.screenshot(os.path.join(artifacts_dir(), f"status-page-{width}.png"))
        page.close()


def test_page_shows_the_breaker_of_each_target(browser, upstream):
    dead = free_port()
    config = make_config(
        upstream.url,
        routes=[two_targets(upstream.url, dead)],
        retries={"attempts": 1},
        circuit_breaker={"enabled": True, "failure_threshold": 2, "recovery_timeout": 300},
        server={"shutdown_timeout": 1},
    )
    with RelayThread(config) as relay:
        status = send_until_open(relay.port, "primary")
        answered = status["requests"]["total"]
        page = open_page(browser, relay.url)
        page.wait_for(f"document.getElementById('requests-total').textContent === '{answered}'")
        targets = {row[0]: row for row in page.evaluate(SHOWN)["targets"]}
        assert targets["primary"][1:5] == ["✕ open", "0", "0", "100.0%"]
        assert targets["primary"][7] == "connect 2"
        assert targets["backup"][1:5] == ["✓ closed", count(answered), "0", "0.0%"]
        assert targets["backup"][7] == f"ok {answered}"
        page.close()


def test_page_works_with_the_keyboard_alone(browser, upstream):
    config = make_config(upstream.url, models=MODELS, server={"shutdown_timeout": 1})
    with RelayThread(config) as relay:
        page = open_page(browser, relay.url, width=390)
        # Every form field has a label a screen reader announces.
        unlabelled = page.evaluate(
            "Array.from(document.querySelectorAll('input, select'))"
            ".filter((f) => !f.labels || !f.labels.length).map((f) => f.id)"
        )
        assert unlabelled == []
        # Tab reaches the admin key field and the button that opens the console.
        page.focus_by_tab("admin-key")
        page.type_text("not-the-admin-key")
        page.tab()
        assert page.focused() == "admin-connect"
        # Shown focus: the focused control draws an outline.
        assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") != "none"
        page.enter()
        # No admin key in this config: relay answers 404 for the admin API and
        # the console says so in words; the key typed is gone from the field
        # (it lives in the script only) and never went upstream.
        page.wait_for(
            "(t => t.length > 0 && !t.startsWith('Opening'))"
            "(document.getElementById('console-msg').textContent)"
        )
        message = page.evaluate("document.getElementById('console-msg').textContent")
        assert message == "The key console is not available: relay has no admin key configured."
        assert not any("/relay" in r.path for r in upstream.requests)
        assert page.evaluate("document.getElementById('admin-key').value") == ""
        assert page.evaluate("document.cookie + localStorage.length + sessionStorage.length") == "00"
        assert "not-the-admin-key" not in page.evaluate("location.href")
        assert page.events("Runtime.exceptionThrown") == []
        page.close()


def test_page_shows_the_totals_of_two_workers(browser, upstream, tmp_path):
    n = 24
    with relay_workers(two_worker_sections(upstream.url), str(tmp_path / "prom")) as port:
        for i in range(n):  # fresh connections: both workers answer some
            assert post(port, "/v1/chat/completions", chat(f"workers page {i % 16}"))[0] == 200
        usage, _ = wait_usage(port, counted(n))
        page = open_page(browser, f"http://127.0.0.1:{port}")
        shown = wait_shown(page, usage)
        assert_matches_usage(shown, usage)
        assert shown["requests"] == count(n)
        assert shown["scope"] == "Tokens and spend: this instance (all its workers)."
        page.close()


@pytest.mark.redis
def test_page_shows_the_totals_shared_through_redis(browser, upstream):
    with RedisServer() as redis:
        config = make_config(
            upstream.url, models=MODELS, redis={"enabled": True, "address": redis.address},
            server={"shutdown_timeout": 1},
        )  # fmt: skip
        with RelayThread(config) as a, RelayThread(config) as b:
            for i, relay in enumerate((a, b, b, a, b)):
                assert post(relay.port, "/v1/chat/completions", chat(f"shared {i}"))[0] == 200
            usage, _ = wait_usage(a.port, counted(5))
            assert usage["backend"] == "redis" and usage["totals"]["requests"] == 5
            # The page of instance a shows what went through b as well.
            page = open_page(browser, a.url)
            shown = wait_shown(page, usage)
            assert_matches_usage(shown, usage)
            assert shown["scope"] == "Tokens and spend: shared by every instance using this Redis."
            # Its live request counts are its own instance's (2 of the 5).
            assert shown["requests"] == "2"
            page.close()
