"""Head classification and rendering: compiled vs pure, per request and per response.

A request head as the openai Python SDK sends it (17 headers) and the head
of an nginx response: what the client side and the upstream side each do
once per request with the header list llhttp reported.
"""

from __future__ import annotations

import httptools
import pytest

import relay._fast as fast
from benchmarks.bench_hotpath import SDK_HEAD

NGINX_RESPONSE = [
    (b"Server", b"nginx/1.24.0"),
    (b"Date", b"Wed, 02 Dec 2026 00:00:00 GMT"),
    (b"Content-Type", b"application/json"),
    (b"Content-Length", b"590"),
    (b"Connection", b"keep-alive"),
]


def _sdk_headers() -> list[tuple[bytes, bytes]]:
    headers: list[tuple[bytes, bytes]] = []

    class Collect:
        def on_header(self, name: bytes, value: bytes) -> None:
            headers.append((name, value))

    httptools.HttpRequestParser(Collect()).feed_data(SDK_HEAD)
    return headers


SDK_HEADERS = _sdk_headers()


def test_inputs() -> None:
    assert len(SDK_HEADERS) == 17
    assert fast.pure.request_head(SDK_HEADERS)[0] == fast.HEAD_OK


@pytest.mark.benchmark(group="request head: SDK headers classified and rendered")
def test_request_head(benchmark, fast_impl: fast.Implementation) -> None:
    result = benchmark(fast_impl.request_head, SDK_HEADERS)
    assert result == fast.pure.request_head(SDK_HEADERS)


@pytest.mark.benchmark(group="response head: nginx headers filtered and rendered")
def test_response_head(benchmark, fast_impl: fast.Implementation) -> None:
    result = benchmark(fast_impl.response_head, NGINX_RESPONSE)
    assert result == fast.pure.response_head(NGINX_RESPONSE)
