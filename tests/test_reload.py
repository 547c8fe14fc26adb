"""Config hot reload end to end: an edit of the file applies to the running
process within 2 seconds (rate limits, routes, prices), an invalid edit
changes nothing and is counted, a restart-only key is logged, and several
workers reload on their own yet count a refused edit once."""

from __future__ import annotations

import http.client
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml

from relay.config import load_config
from relay.testing.fake_upstream import ThreadedFakeUpstream
from tests.support import RelayThread, StderrLines, free_port, start_relay_process, wait_for_port
from tests.test_usage_e2e import (
    AUTH,
    REPLY_WORDS,
    chat,
    cost,
    counted,
    post,
    sample,
    scrape,
    wait_usage,
)

# The contract's bound on how long an edit takes to apply.
RELOAD_DEADLINE = 2.0


@pytest.fixture(scope="module")
def upstream() -> Iterator[ThreadedFakeUpstream]:
    with ThreadedFakeUpstream() as fake:
        yield fake


def base_config(target: str, **sections: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "server": {"port": "127.0.0.1:0", "shutdown_timeout": 2},
        "proxy": {"target": target},
        "cache": {"enabled": False},
        "ratelimit": {"enabled": True, "requests_per_second": 0.001, "burst": 100},
        "circuit_breaker": {"enabled": False},
    }
    for name, values in sections.items():
        if isinstance(values, dict) and isinstance(data.get(name), dict):
            data[name] = {**data[name], **values}
        else:
            data[name] = values
    return data


def write(path: str, data: dict[str, Any] | str) -> None:
    """Replace the file the way an editor or a config management tool does:
    write a new file, then rename it over the old one."""
    text = data if isinstance(data, str) else yaml.safe_dump(data)
    tmp = path + ".new"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


@pytest.fixture
def config_file(tmp_path) -> str:
    return str(tmp_path / "relay.yaml")


def start(path: str, data: dict[str, Any]) -> RelayThread:
    write(path, data)
    relay = RelayThread(load_config(path, env={}))
    relay.start()
    return relay


def until(check: Callable[[], Any], deadline: float = RELOAD_DEADLINE) -> Any:
    """Call *check* until it returns something true, for at most *deadline* s."""
    end = time.monotonic() + deadline
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > end:
            pytest.fail(f"not within {deadline} s")
        time.sleep(0.02)


def limit(port: int) -> str:
    status, headers, _ = post(port, "/v1/chat/completions", chat("one two"))
    assert status in (200, 429)
    return headers["x-ratelimit-limit"]


def reload_errors(port: int) -> float:
    return sample(scrape(port)[1], "relay_config_reload_errors_total")


def test_rate_limit_edit_applies_to_the_running_process(upstream, config_file):
    data = base_config(upstream.url)
    relay = start(config_file, data)
    try:
        # A keep-alive connection opened before the edit keeps working after it.
        conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=10)
        body = json.dumps(chat("kept alive"))
        sent = {"content-type": "application/json", "authorization": AUTH}
        for _ in range(3):
            conn.request("POST", "/v1/chat/completions", body, sent)
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200 and resp.getheader("x-ratelimit-limit") == "100"

        write(config_file, base_config(upstream.url, ratelimit={"burst": 2}))
        edited = time.monotonic()
        until(lambda: limit(relay.port) == "2", RELOAD_DEADLINE - (time.monotonic() - edited))
        # The new bucket holds 2: the answer above took one, this takes the
        # other, then the limit bites.
        status, headers, _ = post(relay.port, "/v1/chat/completions", chat("one two"))
        assert status == 200 and headers["x-ratelimit-remaining"] == "0"
        status, headers, _ = post(relay.port, "/v1/chat/completions", chat("one two"))
        assert status == 429 and headers["x-ratelimit-limit"] == "2"
        assert int(headers["retry-after"]) >= 1

        conn.request("POST", "/v1/chat/completions", body, sent)
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 429  # same connection, new config
        conn.close()
        assert reload_errors(relay.port) == 0
    finally:
        relay.stop()


def test_invalid_edit_changes_nothing_and_is_counted(upstream, config_file, caplog):
    relay = start(config_file, base_config(upstream.url, ratelimit={"burst": 50}))
    try:
        assert limit(relay.port) == "50"
        # Not YAML at all, written in place (a half-saved file looks like this).
        with open(config_file, "w") as f:
            f.write("ratelimit: {burst: [unclosed\n")
        until(lambda: reload_errors(relay.port) == 1)
        assert limit(relay.port) == "50"
        # YAML, but invalid values: refused as a whole, the valid part included.
        write(config_file, base_config(upstream.url, ratelimit={"burst": "lots", "requests_per_second": 5}))
        until(lambda: reload_errors(relay.port) == 2)
        assert limit(relay.port) == "50"
        refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert any("burst" in m for m in refused), refused
        # A valid edit after the bad ones applies, and is not counted.
        write(config_file, base_config(upstream.url, ratelimit={"burst": 40}))
        until(lambda: limit(relay.port) == "40")
        assert reload_errors(relay.port) == 2
    finally:
        relay.stop()


def test_port_change_is_logged_as_needing_a_restart(upstream, config_file, caplog):
    caplog.set_level(logging.INFO, logger="relay")
    relay = start(config_file, base_config(upstream.url))
    try:
        new_port = free_port()
        write(config_file, base_config(upstream.url, server={"port": f"127.0.0.1:{new_port}"},
                                       ratelimit={"burst": 9}))  # fmt: skip
        # The rest of the edit applies at once; the port waits for a restart.
        until(lambda: limit(relay.port) == "9")
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("server.port" in m and "restart" in m for m in warnings), warnings
        with pytest.raises(OSError):
            post(new_port, "/v1/chat/completions", chat("nobody listens here"))
        assert relay.call(lambda: relay.gateway.config.server.port) == 0
        assert reload_errors(relay.port) == 0
    finally:
        relay.stop()


def test_routes_and_prices_change_live(upstream, config_file):
    price = {"input": 0.001, "output": 0.002}
    new_price = {"input": 0.01, "output": 0.03}
    data = base_config(upstream.url, models={"gpt-4o": price})
    with ThreadedFakeUpstream() as other:
        relay = start(config_file, data)
        try:
            claude = {"model": "claude-3-5-haiku-latest", "max_tokens": 8,
                      "messages": [{"role": "user", "content": "route me"}]}  # fmt: skip
            before = len(other.requests)
            assert post(relay.port, "/v1/messages", claude)[0] == 200
            assert post(relay.port, "/v1/chat/completions", chat("one two", "gpt-4o"))[0] == 200
            wait_usage(relay.port, counted(2))
            assert len(other.requests) == before

            edited = dict(data, models={"gpt-4o": new_price},
                          routes=[{"model": "claude-*", "target": other.url}])  # fmt: skip
            write(config_file, edited)

            def routed() -> bool:
                n = len(other.requests)
                assert post(relay.port, "/v1/messages", claude)[0] == 200
                return len(other.requests) == n + 1

            until(routed)
            # Only the claude model goes there; the rest stays on the default.
            n = len(other.requests)
            assert post(relay.port, "/v1/chat/completions", chat("one two", "gpt-4o"))[0] == 200
            assert len(other.requests) == n
            snap, _ = wait_usage(relay.port, lambda s: s["models"]["gpt-4o"]["requests"] == 2)
            assert snap["models"]["gpt-4o"]["cost_usd"] == pytest.approx(
                cost(price, 2, REPLY_WORDS) + cost(new_price, 2, REPLY_WORDS))
            _, samples, _ = scrape(relay.port)
            assert sample(samples, "relay_upstream_latency_seconds_count",
                          upstream=f"127.0.0.1:{other.port}") >= 1  # fmt: skip
        finally:
            relay.stop()


def test_workers_reload_each_and_count_a_refused_edit_once(upstream, tmp_path):
    port = free_port()
    path = str(tmp_path / "relay.yaml")
    data = base_config(upstream.url, server={"port": f"127.0.0.1:{port}", "workers": 2})
    write(path, data)
    proc = start_relay_process(["--config", path],
                               env={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom")})  # fmt: skip
    log = StderrLines(proc)
    try:
        wait_for_port(port, proc=proc)
        log.wait_for("listening on", count=2)
        assert limit(port) == "100"
        write(path, base_config(upstream.url, server={"port": f"127.0.0.1:{port}", "workers": 2},
                                ratelimit={"burst": 3}))  # fmt: skip
        log.wait_for("config: reloaded", count=2, timeout=RELOAD_DEADLINE)
        # Fresh connections reach both workers: every answer has the new limit.
        assert {limit(port) for _ in range(10)} == {"3"}

        write(path, "server: {workers: two}\n")
        log.wait_for("edit refused", count=2, timeout=RELOAD_DEADLINE)  # both workers saw it
        assert reload_errors(port) == 1  # ...and it is counted once
        assert limit(port) == "3"
    finally:
        proc.send_signal(signal.SIGTERM)
        text = log.close()
    assert proc.returncode == 0, text


def test_model_label_bound_holds_across_a_price_reload(upstream, config_file):
    data = base_config(upstream.url, ratelimit={"enabled": False}, models={"gpt-4o": 0.01})
    relay = start(config_file, data)
    try:
        for i in range(70):  # past the bound of 64 labels
            assert post(relay.port, "/v1/chat/completions", chat("one", f"label-{i}"))[0] == 200
        write(config_file, dict(data, models={"gpt-4o": 0.02, "gpt-4": 0.03}))
        until(lambda: relay.call(lambda: "gpt-4" in relay.gateway.config.models))
        for i in range(70, 140):
            assert post(relay.port, "/v1/chat/completions", chat("one", f"label-{i}"))[0] == 200
        wait_usage(relay.port, counted(140))
        _, samples, _ = scrape(relay.port)
        models = {v for (n, lbls) in samples if n == "relay_tokens_total" for k, v in lbls if k == "model"}
        # A newly configured name gets its own label; client-chosen names
        # do not get a fresh allowance with every reload.
        assert len(models) <= 65 and "other" in models
        assert not any(f"label-{i}" in models for i in range(70, 140))
    finally:
        relay.stop()


# --------------------------------------------------------------------------- #
# A refused edit leaves nothing of itself behind
# --------------------------------------------------------------------------- #
HUGE_BURST = 1152921504606846976  # 2**60: a double bucket cannot hold it exactly
REQUEST_LOG_LINE = '"path":"/v1/chat/completions"'


def test_out_of_range_edit_is_refused_whole_in_every_worker(upstream, tmp_path):
    port = free_port()
    path = str(tmp_path / "relay.yaml")
    server = {"port": f"127.0.0.1:{port}", "workers": 2}
    write(path, base_config(upstream.url, server=server, log={"requests": False}))
    proc = start_relay_process(["--config", path],
                               env={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom")})  # fmt: skip
    log = StderrLines(proc)
    try:
        wait_for_port(port, proc=proc)
        log.wait_for("listening on", count=2)
        assert limit(port) == "100"
        # The edit that used to pass validation and then half apply: the
        # request log and the coalescer cap went live, the bucket refused.
        write(path, base_config(upstream.url, server=server, log={"requests": True},
                                ratelimit={"burst": HUGE_BURST},
                                cache={"max_body_bytes": 1000, "ttl": 1e12},
                                circuit_breaker={"recovery_timeout": float("nan")}))  # fmt: skip
        # Both workers refuse it, each naming all three problems...
        log.wait_for("edit refused", count=6, timeout=RELOAD_DEADLINE)
        assert log.count("ratelimit.burst: must be <=") == 2
        assert log.count("cache.ttl: must be <= 31536000") == 2
        assert log.count("circuit_breaker.recovery_timeout: must be a finite number") == 2
        assert reload_errors(port) == 1  # ...and it is counted once
        # Fresh connections reach both workers: none logs requests, the old
        # bucket answers.
        assert {limit(port) for _ in range(10)} == {"100"}
        time.sleep(0.5)  # the request log flushes on a short timer
        assert log.count(REQUEST_LOG_LINE) == 0
        assert log.count("config: reloaded") == 0

        # The same edit with a valid burst applies whole, in both workers.
        write(path, base_config(upstream.url, server=server, log={"requests": True},
                                ratelimit={"burst": 3}))  # fmt: skip
        log.wait_for("config: reloaded", count=2, timeout=RELOAD_DEADLINE)
        assert {limit(port) for _ in range(10)} == {"3"}
        log.wait_for(REQUEST_LOG_LINE, count=10)
        assert reload_errors(port) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        text = log.close()
    assert proc.returncode == 0, text


@pytest.mark.parametrize("failing", ["limiter", "pipeline"])
def test_an_edit_that_fails_to_build_applies_nothing(
    upstream, config_file, monkeypatch, caplog, failing
):
    """Defence in depth: were a validated value still refused while the new
    generation is built, nothing of the edit is applied (before: the request
    log, coalescer cap and Redis connection of the new config were live)."""
    import relay.pipeline
    import relay.runtime

    def refuse_limiter(real):
        def build(rate, burst, *args, **kwargs):
            if burst == 77:
                raise ValueError("burst refused by the bucket")
            return real(rate, burst, *args, **kwargs)
        return build

    def refuse_accounting(real):
        def build(config, **resources):
            if config.ratelimit.burst == 77:
                raise ValueError("accounting refused")
            return real(config, **resources)
        return build

    if failing == "limiter":
        monkeypatch.setattr(relay.runtime, "MemoryLimiter",
                            refuse_limiter(relay.runtime.MemoryLimiter))  # fmt: skip
    else:
        monkeypatch.setattr(relay.pipeline, "Accounting",
                            refuse_accounting(relay.pipeline.Accounting))  # fmt: skip
    relay = start(config_file, base_config(upstream.url, ratelimit={"burst": 50}))
    try:
        gateway = relay.gateway
        assert gateway is not None
        before = relay.call(lambda: (gateway.pipeline, gateway.config,
                                     gateway.runtime.coalescer.max_body_bytes))  # fmt: skip
        assert limit(relay.port) == "50"
        redis_address = f"127.0.0.1:{free_port()}"  # never connected to
        write(config_file, base_config(
            upstream.url, ratelimit={"burst": 77}, log={"requests": True},
            cache={"max_body_bytes": 1234}, redis={"enabled": True, "address": redis_address}))  # fmt: skip
        until(lambda: reload_errors(relay.port) == 1)
        state = relay.call(lambda: (gateway.pipeline, gateway.config,
                                    gateway.runtime.coalescer.max_body_bytes,
                                    gateway.runtime.request_log, gateway.runtime.redis))  # fmt: skip
        assert state == (*before, None, None)
        assert limit(relay.port) == "50"
        assert any("reload of" in r.getMessage() and "failed" in r.getMessage()
                   for r in caplog.records)  # fmt: skip
        # The next good edit applies whole.
        write(config_file, base_config(upstream.url, ratelimit={"burst": 40},
                                       log={"requests": True}))  # fmt: skip
        until(lambda: limit(relay.port) == "40")
        assert relay.call(lambda: gateway.runtime.request_log is not None)
        assert reload_errors(relay.port) == 1
    finally:
        relay.stop()
