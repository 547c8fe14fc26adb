"""The core proxy end to end: SDKs, streaming, flow control, keep-alive, headers, routes."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import time

import anthropic
import httptools
import openai
import pytest

from relay.testing.fake_upstream import ThreadedFakeUpstream
from tests.support import (
    RelayThread,
    free_port,
    make_config,
    start_relay_process,
    wait_for_port,
    write_config,
)

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "say hello to the tests"}]}


@pytest.fixture(scope="module")
def upstream():
    with ThreadedFakeUpstream() as fake:
        yield fake


@pytest.fixture(params=["uvloop", "asyncio"])
def relay(request, upstream):
    with RelayThread(make_config(upstream.url), loop=request.param) as r:
        yield r


def _clients(base: str) -> tuple[openai.OpenAI, anthropic.Anthropic]:
    return (
        openai.OpenAI(base_url=base + "/v1", api_key="sk-test-proxy", max_retries=0, timeout=10),
        anthropic.Anthropic(base_url=base, api_key="sk-ant-test", max_retries=0, timeout=10),
    )


def test_openai_sdk_json_and_stream_match_direct(relay, upstream):
    via, _ = _clients(relay.url)
    direct, _ = _clients(upstream.url)
    a = via.chat.completions.create(**CHAT)
    b = direct.chat.completions.create(**CHAT)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens
    assert a.usage.completion_tokens == b.usage.completion_tokens

    streamed = [c.choices[0].delta.content or "" for c in via.chat.completions.create(**CHAT, stream=True) if c.choices]
    expected = [c.choices[0].delta.content or "" for c in direct.chat.completions.create(**CHAT, stream=True) if c.choices]
    assert streamed == expected
    assert "".join(streamed) == b.choices[0].message.content


def test_openai_stream_without_include_usage_sees_no_usage_chunk(relay, upstream):
    via, _ = _clients(relay.url)
    chunks = list(via.chat.completions.create(**CHAT, stream=True))
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)
    # ...while upstream was asked for it.
    sent = json.loads(upstream.requests[-1].body)
    assert sent["stream_options"] == {"include_usage": True}


def test_openai_stream_with_include_usage_keeps_it(relay):
    via, _ = _clients(relay.url)
    chunks = list(
        via.chat.completions.create(**CHAT, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[-1].usage is not None and chunks[-1].choices == []


def test_anthropic_sdk_json_and_stream(relay, upstream):
    _, via = _clients(relay.url)
    _, direct = _clients(upstream.url)
    args = {"model": "claude-3-5-sonnet", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
    a = via.messages.create(**args)
    b = direct.messages.create(**args)
    assert a.content[0].text == b.content[0].text
    assert a.usage.input_tokens == b.usage.input_tokens
    with via.messages.stream(**args) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == b.content[0].text
    assert final.usage.output_tokens == b.usage.output_tokens
    # Anthropic headers pass through untouched.
    last = upstream.requests[-1]
    names = {k for k, _ in last.headers}
    assert "anthropic-version" in names
    assert "x-api-key" in names or "authorization" in names


@pytest.mark.parametrize("status", [400, 401, 404, 429, 500, 503])
def test_upstream_errors_pass_unchanged(relay, upstream, status):
    body = json.dumps(CHAT)
    for target in (relay, upstream):
        host, port = "127.0.0.1", target.port
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request("POST", "/v1/chat/completions", body, {"x-fake-status": str(status), "content-type": "application/json"})
        resp = conn.getresponse()
        got = (resp.status, resp.read())
        conn.close()
        if target is relay:
            via = got
        else:
            direct = got
    assert via == direct
    assert via[0] == status


def test_openai_sdk_raises_the_upstream_error(relay):
    via, _ = _clients(relay.url)
    with pytest.raises(openai.RateLimitError) as info:
        via.chat.completions.create(**CHAT, extra_headers={"x-fake-status": "429"})
    assert info.value.status_code == 429


def test_stream_is_incremental(relay):
    """300 ms between events: the first event arrives long before the last is sent."""
    conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=10)
    body = json.dumps({**CHAT, "stream": True})
    start = time.monotonic()
    conn.request("POST", "/v1/chat/completions", body, {"x-fake-event-delay": "0.3", "x-fake-events": "5"})
    resp = conn.getresponse()
    assert resp.status == 200
    arrivals = []
    while True:
        line = resp.fp.readline()
        if not line:
            break
        if line.startswith(b"data:"):
            arrivals.append(time.monotonic() - start)
            if b"[DONE]" in line:
                break
    conn.close()
    assert len(arrivals) >= 6
    # Events were spread over >= 1.5 s upstream; the first must not wait for them.
    assert arrivals[0] < arrivals[-1] - 1.0


def test_keep_alive_reuses_upstream_connections(upstream):
    with RelayThread(make_config(upstream.url)) as relay:
        pools = relay.call(lambda: relay.gateway.runtime.pools.all())
        before = sum(p.connections_opened for p in pools)
        conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=10)
        body = json.dumps(CHAT)
        for _ in range(1000):
            conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
        conn.close()
        opened = relay.call(lambda: sum(p.connections_opened for p in relay.gateway.runtime.pools.all())) - before
    assert opened <= 3


class _Responses:
    """Collects pipelined responses with httptools' own parser."""

    def __init__(self) -> None:
        self.items: list[tuple[int, bytes]] = []
        self._body: list[bytes] = []
        self.parser = httptools.HttpResponseParser(self)

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self.items.append((self.parser.get_status_code(), b"".join(self._body)))
        self._body = []


def test_pipelined_requests_answered_in_order(relay):
    requests = []
    for i in range(20):
        body = json.dumps({"model": f"model-{i}", "messages": [{"role": "user", "content": "x"}]}).encode()
        requests.append(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
    collected = _Responses()
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
        s.sendall(b"".join(requests))
        deadline = time.monotonic() + 10
        while len(collected.items) < 20 and time.monotonic() < deadline:
            data = s.recv(65536)
            if not data:
                break
            collected.parser.feed_data(data)
    assert [status for status, _ in collected.items] == [200] * 20
    assert [json.loads(body)["model"] for _, body in collected.items] == [f"model-{i}" for i in range(20)]


def test_headers_forwarded_and_hop_by_hop_dropped(relay, upstream):
    raw = (
        b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: relay.example\r\n"
        b"Authorization: Bearer sk-secret\r\nOpenAI-Organization: org-1\r\n"
        b"Connection: keep-alive, X-Drop-Me\r\nX-Drop-Me: 1\r\nKeep-Alive: timeout=5\r\n"
        b"TE: trailers\r\nX-Forwarded-For: 10.9.8.7\r\nX-Custom: kept\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
    ) % (len(json.dumps(CHAT)), json.dumps(CHAT).encode())
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
        s.sendall(raw)
        data = s.recv(65536)
    assert data.startswith(b"HTTP/1.1 200")
    got = upstream.requests[-1]
    headers = {k: v for k, v in got.headers}
    assert got.path == "/v1/chat/completions?x=1"
    assert headers["host"] == f"127.0.0.1:{upstream.port}"
    assert headers["authorization"] == "Bearer sk-secret"
    assert headers["openai-organization"] == "org-1"
    assert headers["x-custom"] == "kept"
    assert headers["x-forwarded-for"] == "10.9.8.7, 127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    for dropped in ("x-drop-me", "keep-alive", "te", "connection"):
        assert dropped not in headers
    head = data.split(b"\r\n\r\n", 1)[0].lower()
    assert b"x-relay-cache: bypass" in head


def test_routes_by_model_glob_and_path(upstream):
    with ThreadedFakeUpstream() as other:
        config = make_config(
            upstream.url,
            routes=[
                {"model": "claude-*", "target": other.url},
                {"path": "/v1/messages", "target": other.url},
            ],
        )
        with RelayThread(config) as relay:
            via, via_anthropic = _clients(relay.url)
            before_other = len(other.requests)
            via.chat.completions.create(model="claude-3-haiku", messages=[{"role": "user", "content": "x"}])
            via.chat.completions.create(**CHAT)
            via_anthropic.messages.create(model="some-model", max_tokens=8, messages=[{"role": "user", "content": "x"}])
            routed = [r.path for r in other.requests[before_other:]]
            assert routed == ["/v1/chat/completions", "/v1/messages"]
            assert json.loads(other.requests[before_other].body)["model"] == "claude-3-haiku"
            assert json.loads(upstream.requests[-1].body)["model"] == CHAT["model"]


def test_healthz_and_readyz(relay):
    conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=5)
    for path in ("/healthz", "/readyz"):
        conn.request("GET", path)
        resp = conn.getresponse()
        assert resp.status == 200, path
        resp.read()
    conn.close()


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_slow_reader_of_large_response_keeps_memory_bounded(upstream):
    """200 MB through a reader that stalls: relay pauses the upstream instead of buffering."""
    port = free_port()
    path = write_config({"server": {"port": f"127.0.0.1:{port}"}, "proxy": {"target": upstream.url},
                         "cache": {"enabled": False}, "ratelimit": {"enabled": False}})
    proc = start_relay_process(["--config", path])
    try:
        wait_for_port(port, proc=proc)
        size = 200 * 1024 * 1024
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            s.settimeout(20)
            s.connect(("127.0.0.1", port))
            s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: r\r\nx-fake-body-bytes: %d\r\n\r\n" % size)
            got = 0
            while got < 1024 * 1024:
                got += len(s.recv(65536))
            base = _rss_kib(proc.pid)
            time.sleep(2.0)  # stall: upstream keeps offering data
            stalled = _rss_kib(proc.pid)
            head_and_body = got
            deadline = time.monotonic() + 60
            peak = stalled
            while time.monotonic() < deadline:
                chunk = s.recv(1024 * 1024)
                if not chunk:
                    break
                head_and_body += len(chunk)
                if head_and_body >= size:
                    break
                if head_and_body % (16 * 1024 * 1024) < 1024 * 1024:
                    peak = max(peak, _rss_kib(proc.pid))
        assert head_and_body >= size
        assert stalled - base < 32 * 1024, (base, stalled)
        assert peak - base < 64 * 1024, (base, peak)
    finally:
        proc.terminate()
        proc.wait(15)
        os.unlink(path)


def _raw_stream(port: int, body: bytes) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return data


def test_usage_injection_is_invisible_to_the_client(relay, upstream):
    """The client's stream is byte-identical to what upstream sends without include_usage."""
    body = json.dumps({**CHAT, "stream": True}).encode()
    direct = _raw_stream(upstream.port, body)
    via = _raw_stream(relay.port, body)
    assert b'"usage"' not in direct
    # The fake upstream derives ids from the request body, which relay changed.
    mask = re.compile(rb'"id":"[^"]*"')
    assert mask.sub(b'"id":""', via) == mask.sub(b'"id":""', direct)
    # Yet relay got exact usage: the upstream saw include_usage.
    assert json.loads(upstream.requests[-1].body)["stream_options"] == {"include_usage": True}


def test_h2c_upgrade_offer_is_ignored(relay, upstream):
    """curl --http2 offers h2c on plain HTTP: relay answers in HTTP/1.1, then serves on."""
    raw = (
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n"
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    collected = _Responses()
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
        s.sendall(raw)
        deadline = time.monotonic() + 10
        while len(collected.items) < 2 and time.monotonic() < deadline:
            data = s.recv(65536)
            if not data:
                break
            collected.parser.feed_data(data)
    assert [status for status, _ in collected.items] == [200, 200]
    forwarded = dict(upstream.requests[-1].headers)
    assert "upgrade" not in forwarded and "http2-settings" not in forwarded
