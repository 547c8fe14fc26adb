"""Token usage and cost end to end: real sockets, the fake upstream's
deterministic usage, and relay's two read-outs (``GET /relay/usage`` and
``GET /metrics``) checked against exact arithmetic.

The fake upstream's rules (see relay.testing.responses): W = words in the
prompt, the reply is "Hello from fake upstream W" (5 words), completion
tokens = words in the reply; with ``x-fake-cached-tokens: C`` OpenAI reports
``prompt_tokens = W + C`` (``cached_tokens = C``) and Anthropic
``input_tokens = W`` plus ``cache_read_input_tokens = C``.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay import _fast
from relay.accounting.tokens import TokenEstimator
from relay.testing.fake_upstream import ThreadedFakeUpstream
from tests.redis_server import RedisServer
from tests.support import RelayThread, make_config

KEY = "sk-usage-e2e-SECRET-0123456789"
OTHER_KEY = "sk-usage-e2e-OTHER-9876543210"
AUTH = f"Bearer {KEY}"
KEY_HASH = _fast.credential_hash(KEY.encode()).decode()  # the Bearer scheme is not part of it

# USD per 1K tokens.
GPT4O = {"input": 0.0025, "output": 0.01, "cached_input": 0.00125}
CLAUDE = {"input": 0.003, "output": 0.015, "cached_input": 0.0003}
GPT4 = 0.03
MODELS = {"gpt-4o": GPT4O, "gpt-4": GPT4, "claude-3-5-sonnet": CLAUDE}

REPLY_WORDS = 5  # "Hello from fake upstream W"


# --------------------------------------------------------------------------- #
# helpers shared with the other end-to-end files
# --------------------------------------------------------------------------- #
def post(
    port: int,
    path: str,
    body: dict[str, Any] | bytes,
    headers: dict[str, str] | None = None,
    *,
    auth: str | None = AUTH,
) -> tuple[int, dict[str, str], bytes]:
    """One POST on a fresh connection: (status, lower-cased headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        sent = {"content-type": "application/json"}
        if auth is not None:
            if path.startswith("/v1/messages"):
                sent["x-api-key"] = auth
                sent["anthropic-version"] = "2023-06-01"
            else:
                sent["authorization"] = auth
        sent.update(headers or {})
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn.request("POST", path, data, sent)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def usage_json(port: int) -> tuple[dict[str, Any], bytes]:
    status, raw = get(port, "/relay/usage")
    assert status == 200
    return json.loads(raw), raw


def wait_usage(
    port: int, done: Callable[[dict[str, Any]], bool], timeout: float = 10.0
) -> tuple[dict[str, Any], bytes]:
    """Poll /relay/usage until ``done(snapshot)``: accounting runs after the
    client has its response (and may first load the tokenizer in a thread)."""
    deadline = time.monotonic() + timeout
    while True:
        snap, raw = usage_json(port)
        if done(snap) or time.monotonic() > deadline:
            return snap, raw
        time.sleep(0.02)


def counted(n: int) -> Callable[[dict[str, Any]], bool]:
    """Snapshot predicate: n paid requests and cache hits recorded in all."""
    return lambda s: s["totals"]["requests"] + s["totals"].get("cache_hits", 0) >= n


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> tuple[set[str], Samples, str]:
    """GET /metrics parsed: (family names, {(sample, sorted labels): value}, text)."""
    status, raw = get(port, "/metrics")
    assert status == 200
    text = raw.decode()
    families: set[str] = set()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        families.add(family.name)
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return families, samples, text


def sample(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value (0 when absent: a counter never incremented)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def label_values(samples: Samples) -> set[str]:
    return {v for (_, labels) in samples for _, v in labels}


def assert_no_secret(*texts: str | bytes) -> None:
    for text in texts:
        if isinstance(text, bytes):
            text = text.decode(errors="replace")
        for secret in (KEY, OTHER_KEY, "SECRET", "OTHER-98"):
            assert secret not in text


def cost(price: float | dict[str, float], prompt: int, completion: int, cached: int = 0) -> float:
    """The contract's formula, written out independently of relay.accounting.cost."""
    if isinstance(price, float):
        return (prompt + completion) / 1000 * price
    cached_price = price.get("cached_input", price["input"])
    return (
        (prompt - cached) / 1000 * price["input"]
        + cached / 1000 * cached_price
        + completion / 1000 * price["output"]
    )


def chat(content: str, model: str = "gpt-4o", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def anthropic(content: str, model: str = "claude-3-5-sonnet-20241022", **extra: Any) -> dict[str, Any]:
    return {"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": content}], **extra}


def row(**values: float) -> dict[str, float]:
    base = {
        "requests": 0, "estimated_requests": 0, "prompt_tokens": 0, "completion_tokens": 0,
        "cached_tokens": 0, "cost_usd": 0.0, "saved_usd": 0.0, "cache_hits": 0,
    }  # fmt: skip
    base.update(values)
    return base


def assert_row(actual: dict[str, Any], expected: dict[str, float]) -> None:
    assert set(actual) == set(expected), (actual, expected)
    for field, value in expected.items():
        if isinstance(value, float):
            assert actual[field] == pytest.approx(value, rel=1e-9, abs=1e-15), (field, actual)
        else:
            assert actual[field] == value, (field, actual)


def sse_events(body: bytes) -> list[bytes]:
    return [e for e in body.split(b"\n\n") if e.strip()]


# --------------------------------------------------------------------------- #
# fixtures
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def upstream():
    with ThreadedFakeUpstream() as fake:
        yield fake


@pytest.fixture
def relay(upstream):
    with RelayThread(make_config(upstream.url, models=MODELS)) as r:
        yield r


@pytest.fixture(scope="module")
def estimator() -> TokenEstimator:
    """The estimator relay loads (same models, so the same encodings)."""
    est = TokenEstimator()
    est.load_blocking(tuple(MODELS))
    return est


# --------------------------------------------------------------------------- #
# exact usage from the upstream
# --------------------------------------------------------------------------- #
def test_openai_json_cached_tokens_and_prefix_price(relay):
    w, c = 4, 3
    status, _, body = post(
        relay.port, "/v1/chat/completions", chat("one two three four", "gpt-4o-2024-08-06"),
        {"x-fake-cached-tokens": str(c)},
    )
    assert status == 200
    reported = json.loads(body)["usage"]
    assert (reported["prompt_tokens"], reported["completion_tokens"]) == (w + c, REPLY_WORDS)

    expected_cost = cost(GPT4O, w + c, REPLY_WORDS, c)  # priced as gpt-4o (prefix)
    assert expected_cost == pytest.approx(4 * 0.0025e-3 + 3 * 0.00125e-3 + 5 * 0.01e-3)
    snap, raw = wait_usage(relay.port, counted(1))
    expected = row(requests=1, prompt_tokens=w + c, completion_tokens=REPLY_WORDS,
                   cached_tokens=c, cost_usd=expected_cost)  # fmt: skip
    assert_row(snap["totals"], expected)
    assert_row(snap["models"]["gpt-4o-2024-08-06"], expected)
    assert_row(snap["keys"][KEY_HASH], expected)
    assert list(snap["keys"]) == [KEY_HASH] and snap["backend"] == "memory"

    _, samples, text = scrape(relay.port)
    m = "gpt-4o-2024-08-06"
    assert sample(samples, "relay_tokens_total", model=m, kind="prompt") == w + c
    assert sample(samples, "relay_tokens_total", model=m, kind="completion") == REPLY_WORDS
    assert sample(samples, "relay_cost_usd_total", model=m) == pytest.approx(expected_cost)
    assert sample(samples, "relay_request_tokens_sum", model=m, kind="prompt") == w + c
    assert sample(samples, "relay_request_tokens_count", model=m, kind="completion") == 1
    assert sample(samples, "relay_request_tokens_bucket", model=m, kind="prompt", le="16.0") == 1
    assert_no_secret(raw, text)


def test_openai_stream_with_injected_usage_is_exact(relay, upstream):
    w = 6
    status, _, body = post(relay.port, "/v1/chat/completions",
                           chat("a b c d e f", "gpt-4o", stream=True))  # fmt: skip
    assert status == 200 and b'"usage"' not in body  # the client did not ask for it
    assert json.loads(upstream.requests[-1].body)["stream_options"] == {"include_usage": True}
    snap, _ = wait_usage(relay.port, counted(1))
    expected = row(requests=1, prompt_tokens=w, completion_tokens=REPLY_WORDS,
                   cost_usd=cost(GPT4O, w, REPLY_WORDS))  # fmt: skip
    assert_row(snap["models"]["gpt-4o"], expected)
    _, samples, _ = scrape(relay.port)
    assert sample(samples, "relay_tokens_total", model="gpt-4o", kind="prompt") == w
    assert sample(samples, "relay_tokens_total", model="gpt-4o", kind="completion") == REPLY_WORDS


def test_openai_stream_with_client_include_usage_counted_once(relay):
    w, c = 3, 2
    status, _, body = post(
        relay.port, "/v1/chat/completions",
        chat("x y z", "gpt-4o", stream=True, stream_options={"include_usage": True}),
        {"x-fake-cached-tokens": str(c)},
    )
    assert status == 200
    events = sse_events(body)
    # The client asked for it, so it gets the usage chunk and "usage":null.
    last = json.loads(events[-2].removeprefix(b"data: "))
    assert last["choices"] == [] and last["usage"]["prompt_tokens"] == w + c
    assert all(b'"usage":null' in e for e in events[:-2])
    snap, _ = wait_usage(relay.port, counted(1))
    assert_row(snap["totals"], row(requests=1, prompt_tokens=w + c, completion_tokens=REPLY_WORDS,
                                   cached_tokens=c, cost_usd=cost(GPT4O, w + c, REPLY_WORDS, c)))


def test_anthropic_json_and_stream(relay):
    w, c = 5, 7
    model = "claude-3-5-sonnet-20241022"
    status, _, body = post(relay.port, "/v1/messages", anthropic("one two three four five"),
                           {"x-fake-cached-tokens": str(c)})  # fmt: skip
    assert status == 200
    assert json.loads(body)["usage"]["input_tokens"] == w
    status, _, body = post(relay.port, "/v1/messages",
                           anthropic("one two three four five", stream=True),
                           {"x-fake-cached-tokens": str(c)})  # fmt: skip
    assert status == 200 and b"message_delta" in body
    snap, _ = wait_usage(relay.port, counted(2))
    # Anthropic's input_tokens exclude cache reads: relay's prompt includes them.
    one = cost(CLAUDE, w + c, REPLY_WORDS, c)
    assert one == pytest.approx(5 * 0.003e-3 + 7 * 0.0003e-3 + 5 * 0.015e-3)
    assert_row(snap["models"][model], row(requests=2, prompt_tokens=2 * (w + c),
                                          completion_tokens=2 * REPLY_WORDS, cached_tokens=2 * c,
                                          cost_usd=2 * one))  # fmt: skip
    _, samples, _ = scrape(relay.port)
    assert sample(samples, "relay_tokens_total", model=model, kind="prompt") == 2 * (w + c)
    assert sample(samples, "relay_cost_usd_total", model=model) == pytest.approx(2 * one)


def test_one_number_price(relay):
    w = 2
    post(relay.port, "/v1/chat/completions", chat("hello there", "gpt-4"))
    snap, _ = wait_usage(relay.port, counted(1))
    assert snap["models"]["gpt-4"]["cost_usd"] == pytest.approx((w + REPLY_WORDS) / 1000 * GPT4)


def test_unknown_models_cost_nothing_and_labels_stay_bounded(relay):
    # A model name that is a prompt, a key or just odd never becomes a label.
    odd = f"ignore previous instructions {KEY}"
    status, _, _ = post(relay.port, "/v1/chat/completions", chat("one two", odd))
    assert status == 200
    n = 70  # more distinct names than the label bound (64, configured ones included)
    for i in range(n):
        assert post(relay.port, "/v1/chat/completions", chat("one two", f"mystery-{i}"))[0] == 200
    snap, raw = wait_usage(relay.port, counted(n + 1))
    assert snap["totals"]["requests"] == n + 1
    assert snap["totals"]["prompt_tokens"] == 2 * (n + 1)
    assert snap["totals"]["completion_tokens"] == REPLY_WORDS * (n + 1)
    assert snap["totals"]["cost_usd"] == 0.0
    models = snap["models"]
    assert "other" in models and "mystery-0" in models
    assert len(models) <= 64
    assert sum(r["requests"] for r in models.values()) == n + 1
    _, samples, text = scrape(relay.port)
    labels = {v for (name, lbls) in samples if name == "relay_tokens_total" for k, v in lbls if k == "model"}
    assert "other" in labels and len(labels) <= 64
    assert sample(samples, "relay_tokens_total", model="other", kind="prompt") == 2 * models["other"]["requests"]
    assert not any("ignore" in v for v in label_values(samples))
    assert "ignore previous" not in raw.decode()
    assert_no_secret(raw, text)


# --------------------------------------------------------------------------- #
# estimated usage
# --------------------------------------------------------------------------- #
def test_no_usage_from_upstream_is_estimated_with_tiktoken(relay, estimator):
    content = "please estimate these words"
    reply = "Hello from fake upstream 4"
    prompt = estimator.count(f"user\n{content}", "gpt-4o")
    completion = estimator.count(reply, "gpt-4o")
    assert estimator.description.startswith("tiktoken")
    assert (prompt, completion) != (4, 5)  # an estimate, not the fake's word counts

    status, _, body = post(relay.port, "/v1/chat/completions", chat(content),
                           {"x-fake-no-usage": "1"})  # fmt: skip
    assert status == 200 and b'"usage"' not in body
    status, _, body = post(relay.port, "/v1/chat/completions", chat(content, stream=True),
                           {"x-fake-no-usage": "1"})  # fmt: skip
    assert status == 200 and b"upstream 4" not in body  # split over events
    snap, _ = wait_usage(relay.port, counted(2))
    assert_row(snap["models"]["gpt-4o"], row(
        requests=2, estimated_requests=2, prompt_tokens=2 * prompt, completion_tokens=2 * completion,
        cost_usd=2 * cost(GPT4O, prompt, completion)))  # fmt: skip


def test_anthropic_stream_without_usage_is_estimated(relay, estimator):
    content = "count me please"
    model = "claude-3-5-sonnet-20241022"
    status, _, _ = post(relay.port, "/v1/messages", anthropic(content, stream=True),
                        {"x-fake-no-usage": "1"})  # fmt: skip
    assert status == 200
    snap, _ = wait_usage(relay.port, counted(1))
    prompt = estimator.count(f"user\n{content}", model)
    completion = estimator.count("Hello from fake upstream 3", model)
    assert_row(snap["models"][model], row(
        requests=1, estimated_requests=1, prompt_tokens=prompt, completion_tokens=completion,
        cost_usd=cost(CLAUDE, prompt, completion)))  # fmt: skip


def _read_until(sock: socket.socket, marker: bytes, count: int, timeout: float = 10.0) -> bytes:
    """Read from *sock* until *marker* occurred *count* times."""
    data = b""
    deadline = time.monotonic() + timeout
    while data.count(marker) < count:
        assert time.monotonic() < deadline, data
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    return data


def test_client_leaving_mid_stream_counts_tokens_so_far(relay, estimator, upstream):
    content = "tell me a long story"
    events = 60
    body = json.dumps(chat(content, stream=True)).encode()
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: relay\r\n"
        b"Content-Type: application/json\r\nAuthorization: " + AUTH.encode() + b"\r\n"
        b"x-fake-events: %d\r\nx-fake-event-delay: 0.05\r\n"
        b"Content-Length: %d\r\n\r\n" % (events, len(body))
    )
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
        s.sendall(head + body)
        seen = _read_until(s, b'"content":"', 8)  # role chunk + 7 content pieces
    words = [f"w{i}" for i in range(6, events + 1)]
    full = " ".join(["Hello", "from", "fake", "upstream", "5", *words])
    # The body is chunked; the pieces of text are JSON strings without escapes.
    received = "".join(p.decode() for p in re.findall(rb'"content":"([^"\\]*)"', seen))
    assert received and full.startswith(received)

    snap, _ = wait_usage(relay.port, counted(1))
    got = snap["models"]["gpt-4o"]
    assert got["requests"] == 1 and got["estimated_requests"] == 1
    assert got["prompt_tokens"] == estimator.count(f"user\n{content}", "gpt-4o")
    # What relay had relayed when it noticed: at least what the client read,
    # well short of the whole reply.
    assert estimator.count(received, "gpt-4o") <= got["completion_tokens"]
    assert got["completion_tokens"] < estimator.count(full, "gpt-4o")
    assert got["cost_usd"] == pytest.approx(
        cost(GPT4O, got["prompt_tokens"], got["completion_tokens"]))
    _, samples, _ = scrape(relay.port)
    assert sample(samples, "relay_tokens_total", model="gpt-4o", kind="completion") == got["completion_tokens"]


# --------------------------------------------------------------------------- #
# cache hits: saved cost, no tokens paid
# --------------------------------------------------------------------------- #
def test_cache_hits_count_saved_cost_not_tokens(upstream):
    config = make_config(upstream.url, models=MODELS, cache={"enabled": True})
    w, c = 3, 2
    paid = cost(GPT4O, w + c, REPLY_WORDS, c)
    stream_paid = cost(GPT4O, w, REPLY_WORDS)
    with RelayThread(config) as relay:
        request = chat("cache me now", "gpt-4o")
        headers = {"x-fake-cached-tokens": str(c)}
        first = post(relay.port, "/v1/chat/completions", request, headers)
        assert first[1]["x-relay-cache"] == "MISS"
        wait_usage(relay.port, counted(1))
        for _ in range(2):
            hit = post(relay.port, "/v1/chat/completions", request, headers)
            assert hit[1]["x-relay-cache"] == "HIT" and hit[2] == first[2]
        # A streamed response relay asked usage for: the hit replays the
        # client's stream and still knows what it would have cost.
        streamed = chat("cache me now", "gpt-4o", stream=True)
        miss = post(relay.port, "/v1/chat/completions", streamed)
        wait_usage(relay.port, counted(4))
        hit = post(relay.port, "/v1/chat/completions", streamed)
        assert (miss[1]["x-relay-cache"], hit[1]["x-relay-cache"]) == ("MISS", "HIT")
        assert hit[2] == miss[2] and b'"usage"' not in hit[2]

        snap, _ = wait_usage(relay.port, counted(5))
        expected = row(requests=2, cache_hits=3, prompt_tokens=2 * w + c,
                       completion_tokens=2 * REPLY_WORDS, cached_tokens=c,
                       cost_usd=paid + stream_paid, saved_usd=2 * paid + stream_paid)  # fmt: skip
        assert_row(snap["totals"], expected)
        assert_row(snap["models"]["gpt-4o"], expected)
        assert_row(snap["keys"][KEY_HASH], expected)

        _, samples, _ = scrape(relay.port)
        assert sample(samples, "relay_cache_hits_total") == 3
        assert sample(samples, "relay_cache_misses_total") == 2
        assert sample(samples, "relay_tokens_total", model="gpt-4o", kind="prompt") == 2 * w + c
        assert sample(samples, "relay_request_tokens_count", model="gpt-4o", kind="prompt") == 2
        assert sample(samples, "relay_cost_usd_total", model="gpt-4o") == pytest.approx(paid + stream_paid)
        assert sample(samples, "relay_cost_saved_usd_total", model="gpt-4o") == pytest.approx(
            2 * paid + stream_paid)


def test_coalesced_request_counts_as_saved(upstream):
    """Identical requests in flight together go upstream once; the others are hits."""
    config = make_config(upstream.url, models=MODELS, cache={"enabled": True})
    w = 4
    paid = cost(GPT4O, w, REPLY_WORDS)
    with RelayThread(config) as relay:
        before = len(upstream.requests)
        results: list[tuple[int, dict[str, str], bytes]] = []
        request = chat("coalesce these four words", "gpt-4o")

        def one() -> None:
            results.append(post(relay.port, "/v1/chat/completions", request, {"x-fake-delay": "0.4"}))

        threads = [threading.Thread(target=one) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(15)
        assert sorted(r[1]["x-relay-cache"] for r in results) == ["HIT", "HIT", "MISS"]
        assert len(upstream.requests) - before == 1
        snap, _ = wait_usage(relay.port, counted(3))
        assert_row(snap["totals"], row(requests=1, cache_hits=2, prompt_tokens=w,
                                       completion_tokens=REPLY_WORDS, cost_usd=paid,
                                       saved_usd=2 * paid))  # fmt: skip
        _, samples, _ = scrape(relay.port)
        assert sample(samples, "relay_cost_saved_usd_total", model="gpt-4o") == pytest.approx(2 * paid)

        # Streamed: the followers replay the client's stream, from which relay
        # removed the usage chunk it asked for, so their saving is estimated.
        results.clear()
        request = chat("coalesce these four words", "gpt-4o", stream=True)
        threads = [threading.Thread(target=one) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(15)
        assert sorted(r[1]["x-relay-cache"] for r in results) == ["HIT", "MISS"]
        assert results[0][2] == results[1][2] and b'"usage"' not in results[0][2]
        snap, _ = wait_usage(relay.port, counted(5))
        assert snap["totals"]["requests"] == 2 and snap["totals"]["cache_hits"] == 3
        assert snap["totals"]["saved_usd"] > 2 * paid
        assert snap["totals"]["prompt_tokens"] == 2 * w


# --------------------------------------------------------------------------- #
# per key, and Redis-backed totals
# --------------------------------------------------------------------------- #
def test_usage_per_key_hash_and_anonymous(relay):
    post(relay.port, "/v1/chat/completions", chat("one"))
    post(relay.port, "/v1/chat/completions", chat("one two"), auth=f"Bearer {OTHER_KEY}")
    post(relay.port, "/v1/chat/completions", chat("one two three"), auth=None)
    post(relay.port, "/v1/messages", anthropic("four words right here"), auth=KEY)  # x-api-key
    snap, raw = wait_usage(relay.port, counted(4))
    keys = snap["keys"]
    other_hash = _fast.credential_hash(OTHER_KEY.encode()).decode()
    # One key is one caller, sent as "Authorization: Bearer k" or "x-api-key: k".
    assert set(keys) == {KEY_HASH, other_hash, "anonymous"}
    assert all(len(k) == 16 for k in keys if k != "anonymous")
    assert keys[KEY_HASH]["prompt_tokens"] == 1 + 4
    assert keys[other_hash]["prompt_tokens"] == 2
    assert keys["anonymous"]["prompt_tokens"] == 3
    assert_no_secret(raw, scrape(relay.port)[2])


def test_redis_totals_survive_restart_and_add_up_across_instances(upstream):
    with RedisServer() as redis:
        config = make_config(upstream.url, models=MODELS, redis={"enabled": True, "address": redis.address})
        one = cost(GPT4O, 2, REPLY_WORDS)
        with RelayThread(config) as a, RelayThread(config) as b:
            for relay in (a, b, a):
                assert post(relay.port, "/v1/chat/completions", chat("two words"))[0] == 200
            snap_a, raw = wait_usage(a.port, counted(3))
            snap_b, _ = usage_json(b.port)
        assert snap_a["backend"] == "redis"
        assert snap_a == snap_b
        expected = row(requests=3, prompt_tokens=6, completion_tokens=3 * REPLY_WORDS, cost_usd=3 * one)
        assert_row(snap_a["totals"], expected)
        assert_row(snap_a["keys"][KEY_HASH], expected)
        assert_no_secret(raw)

        with RelayThread(config) as restarted:
            snap, _ = usage_json(restarted.port)
            assert_row(snap["totals"], expected)
            assert snap["since"] == snap_a["since"]
            assert post(restarted.port, "/v1/chat/completions", chat("two words"))[0] == 200
            snap, _ = wait_usage(restarted.port, counted(4))
            assert snap["totals"]["requests"] == 4
            assert snap["totals"]["cost_usd"] == pytest.approx(4 * one)
