"""Observability end to end: every contract metric after a known mix of
requests, /metrics summed over two worker processes, Redis errors counted,
and the JSON request log on stderr."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import signal
import subprocess
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay.ops.metrics import render_files
from relay.testing.fake_upstream import ThreadedFakeUpstream
from tests.support import (
    RelayThread,
    StderrLines,
    free_port,
    make_config,
    start_relay_process,
    wait_for_port,
    write_config,
)
from tests.test_usage_e2e import (
    AUTH,
    GPT4O,
    KEY,
    KEY_HASH,
    MODELS,
    REPLY_WORDS,
    anthropic,
    assert_no_secret,
    chat,
    cost,
    counted,
    get,
    label_values,
    post,
    sample,
    scrape,
    wait_usage,
)

# (sample name that must appear, family type, label names) per contract metric.
CONTRACT = {
    "relay_requests_total": ("counter", {"route", "method", "status"}),
    "relay_request_duration_seconds": ("histogram", {"route"}),
    "relay_upstream_latency_seconds": ("histogram", {"upstream"}),
    "relay_cache_hits_total": ("counter", set()),
    "relay_cache_misses_total": ("counter", set()),
    "relay_request_tokens": ("histogram", {"model", "kind"}),
    "relay_tokens_total": ("counter", {"model", "kind"}),
    "relay_cost_usd_total": ("counter", {"model"}),
    "relay_cost_saved_usd_total": ("counter", {"model"}),
    "relay_ratelimit_rejected_total": ("counter", {"key_type"}),
    "relay_circuit_breaker_state": ("gauge", {"upstream"}),
    "relay_redis_errors_total": ("counter", set()),
    "relay_config_reload_errors_total": ("counter", set()),
}
PROMPT_WORD = "PROMPTWORD-zebra"


@pytest.fixture(scope="module")
def upstream():
    with ThreadedFakeUpstream() as fake:
        yield fake


def _no_watch(config):
    """make_config removes its file: without a source there is nothing to watch
    (a watcher would count the missing file as a refused edit)."""
    return dataclasses.replace(config, source=None)


def _types(text: str) -> dict[str, str]:
    types = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            types[s.name] = family.type
    return types


def test_every_contract_metric_matches_the_requests_made(upstream):
    config = _no_watch(make_config(
        upstream.url,
        models=MODELS,
        cache={"enabled": True},
        ratelimit={"enabled": True, "requests_per_second": 0.001, "burst": 6, "key": "api_key"},
        circuit_breaker={"enabled": True, "failure_threshold": 2, "recovery_timeout": 60},
    ))  # fmt: skip
    with RelayThread(config) as relay:
        # Before any request: every family is declared, label-free counters at 0.
        families, samples, text = scrape(relay.port)
        for name in CONTRACT:
            assert name.removesuffix("_total") in families, name
        assert sample(samples, "relay_redis_errors_total") == 0
        assert sample(samples, "relay_config_reload_errors_total") == 0

        p = relay.port
        a = chat(f"{PROMPT_WORD} one", "gpt-4o")
        b = chat(f"{PROMPT_WORD} one two", "gpt-4o", stream=True)
        assert post(p, "/v1/chat/completions", a)[1]["x-relay-cache"] == "MISS"
        assert post(p, "/v1/chat/completions", b)[1]["x-relay-cache"] == "MISS"
        assert post(p, "/v1/chat/completions", a)[1]["x-relay-cache"] == "HIT"
        assert get(p, "/v1/models")[0] == 200
        for i in range(2):  # two upstream failures open the breaker
            assert post(p, "/v1/chat/completions", chat(f"fail {i}"), {"x-fake-status": "500"})[0] == 500
        status, headers, _ = post(p, "/v1/chat/completions", chat("breaker open"))
        assert status == 503 and "retry-after" in headers
        # The key's 7th request is over the burst of 6 (the GET had no key:
        # it drew from its IP's bucket).
        status, headers, _ = post(p, "/v1/chat/completions", a)
        assert status == 429 and headers["x-ratelimit-limit"] == "6"
        assert get(p, "/readyz")[0] == 503  # the only upstream is open
        wait_usage(p, counted(3))

        _, samples, text = scrape(p)
        types = _types(text)
        for name, (kind, labels) in CONTRACT.items():
            probe = name + "_count" if kind == "histogram" else name
            assert types.get(probe) == kind, name
            found = [lbls for (n, lbls) in samples if n == probe]
            assert found, name
            assert all({k for k, _ in lbls} == labels for lbls in found), (name, found)

        routes = {v for (n, lbls) in samples if n == "relay_requests_total" for k, v in lbls if k == "route"}
        assert len(routes) == 1
        route = routes.pop()
        up = f"127.0.0.1:{upstream.port}"

        def requests(method: str, status: int) -> float:
            return sample(samples, "relay_requests_total", route=route, method=method, status=str(status))

        assert requests("POST", 200) == 3
        assert requests("GET", 200) == 1
        assert requests("POST", 500) == 2
        assert requests("POST", 503) == 1
        assert requests("POST", 429) == 1
        assert sum(v for (n, _), v in samples.items() if n == "relay_requests_total") == 8
        assert sample(samples, "relay_request_duration_seconds_count", route=route) == 8
        assert sample(samples, "relay_request_duration_seconds_bucket", route=route, le="+Inf") == 8
        # Only the five that reached the upstream have a time to first byte.
        assert sample(samples, "relay_upstream_latency_seconds_count", upstream=up) == 5
        assert sample(samples, "relay_cache_hits_total") == 1
        assert sample(samples, "relay_cache_misses_total") == 5  # a, b, two 500s, the 503
        assert sample(samples, "relay_ratelimit_rejected_total", key_type="api_key") == 1
        assert sample(samples, "relay_circuit_breaker_state", upstream=up) == 2
        assert sample(samples, "relay_redis_errors_total") == 0
        assert sample(samples, "relay_config_reload_errors_total") == 0

        wa, wb = 2, 3
        paid_a, paid_b = cost(GPT4O, wa, REPLY_WORDS), cost(GPT4O, wb, REPLY_WORDS)
        assert sample(samples, "relay_tokens_total", model="gpt-4o", kind="prompt") == wa + wb
        assert sample(samples, "relay_tokens_total", model="gpt-4o", kind="completion") == 2 * REPLY_WORDS
        assert sample(samples, "relay_request_tokens_count", model="gpt-4o", kind="prompt") == 2
        assert sample(samples, "relay_request_tokens_sum", model="gpt-4o", kind="prompt") == wa + wb
        assert sample(samples, "relay_cost_usd_total", model="gpt-4o") == pytest.approx(paid_a + paid_b)
        assert sample(samples, "relay_cost_saved_usd_total", model="gpt-4o") == pytest.approx(paid_a)

        values = label_values(samples)
        assert not any(PROMPT_WORD in v or "zebra" in v or "Bearer" in v for v in values)
        assert PROMPT_WORD not in text
        assert_no_secret(text)


def test_unreachable_redis_is_counted_and_requests_still_served(upstream):
    dead = free_port()
    config = _no_watch(make_config(
        upstream.url, models=MODELS, ratelimit={"enabled": True, "burst": 100},
        cache={"enabled": True}, redis={"enabled": True, "address": f"127.0.0.1:{dead}", "timeout": 0.1},
    ))  # fmt: skip
    with RelayThread(config) as relay:
        for i in range(3):
            assert post(relay.port, "/v1/chat/completions", chat(f"redis down {i}"))[0] == 200
        snap, _ = wait_usage(relay.port, counted(3))
        assert snap["backend"] == "memory" and snap["totals"]["requests"] == 3
        _, samples, _ = scrape(relay.port)
        assert sample(samples, "relay_redis_errors_total") >= 1
        assert sample(samples, "relay_tokens_total", model="gpt-4o", kind="prompt") == 3 * 3


def _per_worker(metrics_dir: str) -> dict[str, float]:
    """POST 200 count per worker, read from each worker's own values file."""
    shares = {}
    for path in glob.glob(os.path.join(metrics_dir, "relay-metrics-*.values")):
        total = 0.0
        for family in text_string_to_metric_families(render_files([path]).decode()):
            for s in family.samples:
                if s.name == "relay_requests_total" and s.labels["status"] == "200":
                    total += s.value
        shares[os.path.basename(path)] = total
    return shares


def test_two_workers_metrics_are_summed(upstream, tmp_path):
    port = free_port()
    metrics_dir = str(tmp_path / "prom")
    path = write_config({
        "server": {"port": f"127.0.0.1:{port}", "workers": 2, "shutdown_timeout": 2},
        "proxy": {"target": upstream.url},
        "cache": {"enabled": False},
        "ratelimit": {"enabled": False},
        "models": MODELS,
    })  # fmt: skip
    proc = start_relay_process(["--config", path], env={"PROMETHEUS_MULTIPROC_DIR": metrics_dir})
    log = StderrLines(proc)
    n, w = 40, 3
    try:
        wait_for_port(port, proc=proc)
        log.wait_for("listening on", count=2)  # both workers, not just the first
        # Fresh connections: SO_REUSEPORT spreads them over both workers.
        for i in range(n):
            assert post(port, "/v1/chat/completions", chat(f"worker test {i}"))[0] == 200
        # A worker counts a request just after its client has the response.
        deadline = time.monotonic() + 5
        while True:
            shares = _per_worker(metrics_dir)
            if sum(shares.values()) == n or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert len(shares) == 2 and sum(shares.values()) == n, shares
        assert all(v > 0 for v in shares.values()), shares
        # Each scrape is a new connection, so both workers answer some; the
        # totals are the same whoever answers.
        for _ in range(8):
            _, samples, text = scrape(port)
            total = sum(v for (name, _), v in samples.items() if name == "relay_requests_total")
            assert total == n
            assert sample(samples, "relay_tokens_total", model="gpt-4o", kind="prompt") == n * w
            assert sample(samples, "relay_tokens_total", model="gpt-4o", kind="completion") == n * REPLY_WORDS
            assert sample(samples, "relay_cost_usd_total", model="gpt-4o") == pytest.approx(
                n * cost(GPT4O, w, REPLY_WORDS))
            durations = sum(v for (name, _), v in samples.items()
                            if name == "relay_request_duration_seconds_count")  # fmt: skip
            assert durations == n
            assert sample(samples, "relay_config_reload_errors_total") == 0
            assert_no_secret(text)
    finally:
        proc.send_signal(signal.SIGTERM)
        log.close()
        os.unlink(path)
    assert proc.returncode == 0


def test_request_log_one_json_line_per_request_without_credentials(upstream):
    port = free_port()
    path = write_config({
        "server": {"port": f"127.0.0.1:{port}", "shutdown_timeout": 2},
        "proxy": {"target": upstream.url},
        "cache": {"enabled": True},
        "ratelimit": {"enabled": False},
        "models": MODELS,
        "log": {"requests": True},
    })  # fmt: skip
    proc = start_relay_process(["--config", path])
    try:
        wait_for_port(port, proc=proc)
        body = chat(f"{PROMPT_WORD} two", "gpt-4o")
        assert post(port, "/v1/chat/completions?api-key=QUERYSECRET&x=1", body)[0] == 200
        assert post(port, "/v1/chat/completions?api-key=QUERYSECRET&x=1", body)[0] == 200  # hit
        assert post(port, "/v1/messages", anthropic("one two three"), auth=KEY)[0] == 200
        assert post(port, "/v1/chat/completions", chat("nobody"), auth=None)[0] == 200
        assert get(port, "/v1/models")[0] == 200
        assert get(port, "/metrics")[0] == 200  # relay's own endpoints are not logged
        assert get(port, "/healthz")[0] == 200
        wait_usage(port, counted(4))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        os.unlink(path)
    text = err.decode()
    assert proc.returncode == 0, text
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert len(lines) == 5, text
    fields = {"time", "method", "path", "status", "model", "prompt_tokens", "completion_tokens",
              "cost_usd", "cache", "latency_ms", "upstream", "key"}  # fmt: skip
    for entry in lines:
        assert set(entry) == fields, entry
        assert entry["time"].endswith("Z") and "T" in entry["time"]
        assert entry["status"] == 200 and entry["latency_ms"] >= 0
        assert entry["upstream"] == f"127.0.0.1:{upstream.port}"
    miss, hit, messages, anonymous, models = lines
    assert (miss["method"], miss["path"], miss["cache"]) == ("POST", "/v1/chat/completions", "MISS")
    assert (miss["model"], miss["prompt_tokens"], miss["completion_tokens"]) == ("gpt-4o", 2, REPLY_WORDS)
    assert miss["cost_usd"] == pytest.approx(cost(GPT4O, 2, REPLY_WORDS))
    assert miss["key"] == KEY_HASH and hit["key"] == KEY_HASH
    assert hit["cache"] == "HIT" and hit["cost_usd"] == 0  # nothing paid upstream
    assert messages["path"] == "/v1/messages" and messages["prompt_tokens"] == 3
    # The same key sent as x-api-key is the same caller.
    assert messages["key"] == KEY_HASH
    assert anonymous["key"] is None
    assert (models["method"], models["path"], models["cache"]) == ("GET", "/v1/models", "BYPASS")
    assert models["model"] is None and models["prompt_tokens"] == 0
    for secret in ("QUERYSECRET", "api-key", PROMPT_WORD, AUTH):
        assert secret not in text
    assert_no_secret(text)
