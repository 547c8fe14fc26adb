"""metrics.enabled and usage.enabled: the hot-path accounting can be switched off."""

from __future__ import annotations

import http.client
import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import RelayThread, make_config

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "count these words"}]}


def _post(port: int, body: dict) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Authorization": "Bearer sk-x"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    assert resp.status == 200
    return data


def _get(port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path)
    data = conn.getresponse().read()
    conn.close()
    return data


def _samples(text: str, name: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                total += sample.value
    return total


@pytest.mark.parametrize("metrics_on", [True, False])
def test_metrics_switch(fake_upstream, metrics_on):
    config = make_config(fake_upstream.url, metrics={"enabled": metrics_on})
    with RelayThread(config) as relay:
        for _ in range(3):
            _post(relay.port, CHAT)
        text = _get(relay.port, "/metrics").decode()
    assert _samples(text, "relay_requests_total") == (3 if metrics_on else 0)
    tokens = _samples(text, "relay_tokens_total")
    assert (tokens > 0) if metrics_on else (tokens == 0)
    # The endpoint answers either way, with every family declared.
    assert "relay_redis_errors_total" in text


@pytest.mark.parametrize("usage_on", [True, False])
def test_usage_switch(fake_upstream, usage_on):
    config = make_config(fake_upstream.url, usage={"enabled": usage_on})
    with RelayThread(config) as relay:
        _post(relay.port, CHAT)
        _post(relay.port, {**CHAT, "stream": True})
        sent = json.loads(fake_upstream.requests[-1].body)
        totals = json.loads(_get(relay.port, "/relay/usage"))["totals"]
    # Injection of include_usage happens only with usage accounting on.
    assert ("stream_options" in sent) is usage_on
    if usage_on:
        assert totals["prompt_tokens"] > 0 and totals["completion_tokens"] > 0
    else:
        assert totals.get("prompt_tokens", 0) == 0 and totals.get("completion_tokens", 0) == 0
