"""The JSON facts scan: compiled vs pure vs json.loads, on chat requests and responses.

The pure twin is json.loads plus a few lookups by definition, so it shows
the cost the compiled walk replaces; the json.loads rows are the decode
alone, for scale.
"""

from __future__ import annotations

import json

import pytest

import relay._fast as fast
from benchmarks.bench_fast_cachekey import LARGE, SMALL
from relay.accounting.usage import usage_from_json, usage_from_mapping

STREAMED_SMALL = SMALL.replace(b'"stream": false', b'"stream": true')


def chat_response(words: int) -> bytes:
    """A deterministic chat.completion response, members in the order OpenAI sends them."""
    text = " ".join(f"word{i} caf\u00e9" for i in range(words))
    return json.dumps(
        {
            "id": "chatcmpl-AbCdEfGhIjKlMnOpQrStUvWxYz012",
            "object": "chat.completion",
            "created": 1733000000,
            "model": "gpt-4o-mini-2024-07-18",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": 1200,
                "completion_tokens": 30,
                "total_tokens": 1230,
                "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
            },
            "service_tier": "default",
            "system_fingerprint": "fp_0123456789",
        }
    ).encode()


RESPONSE_SMALL = chat_response(3)  # about 600 bytes
RESPONSE_LARGE = chat_response(86)  # about 2 KB


def test_response_sizes() -> None:
    assert 550 <= len(RESPONSE_SMALL) <= 650, len(RESPONSE_SMALL)
    assert 1900 <= len(RESPONSE_LARGE) <= 2100, len(RESPONSE_LARGE)


def _facts_by_loads(body: bytes) -> object:
    doc = json.loads(body)
    return doc.get("stream"), doc.get("model")


REQUESTS = {"300 B": SMALL, "20 KB": LARGE}
RESPONSES = {"600 B": RESPONSE_SMALL, "2 KB": RESPONSE_LARGE}


@pytest.mark.parametrize("size", REQUESTS)
def test_request_facts(benchmark, fast_impl: fast.Implementation, size: str) -> None:
    benchmark.group = f"request facts, {size} chat request"
    body = REQUESTS[size]
    facts = benchmark(fast_impl.request_facts, body)
    assert facts == fast.pure.request_facts(body) and facts.stream is False


@pytest.mark.parametrize("size", REQUESTS)
def test_request_json_loads(benchmark, size: str) -> None:
    benchmark.group = f"request facts, {size} chat request"
    body = REQUESTS[size]
    assert benchmark(_facts_by_loads, body) == (False, "gpt-4o-mini")


@pytest.mark.parametrize("size", RESPONSES)
def test_response_usage(benchmark, fast_impl: fast.Implementation, size: str) -> None:
    benchmark.group = f"response usage, {size} chat response"
    body = RESPONSES[size]
    found = benchmark(fast_impl.response_usage, body)
    assert found is not None and found.usage is not None
    assert found.usage["prompt_tokens"] == 1200


@pytest.mark.parametrize("size", RESPONSES)
def test_response_counts(benchmark, fast_impl: fast.Implementation, size: str) -> None:
    benchmark.group = f"response usage, {size} chat response"
    body = RESPONSES[size]
    found = benchmark(fast_impl.response_counts, body)
    assert isinstance(found, fast.ResponseCounts) and found.prompt_tokens == 1200


@pytest.mark.parametrize("size", RESPONSES)
def test_response_json_loads(benchmark, size: str) -> None:
    benchmark.group = f"response usage, {size} chat response"
    body = RESPONSES[size]
    assert benchmark(json.loads, body)["usage"]["prompt_tokens"] == 1200


@pytest.mark.parametrize("size", RESPONSES)
def test_usage_from_json(benchmark, size: str) -> None:
    """What accounting calls, on the chosen twin (scan, then Usage)."""
    benchmark.group = f"usage_from_json, {size} chat response"
    body = RESPONSES[size]
    assert benchmark(usage_from_json, body).prompt_tokens == 1200


@pytest.mark.parametrize("size", RESPONSES)
def test_usage_from_loads(benchmark, size: str) -> None:
    """The same Usage from a whole decode, for comparison."""
    benchmark.group = f"usage_from_json, {size} chat response"
    body = RESPONSES[size]
    usage = benchmark(lambda: usage_from_mapping(json.loads(body)))
    assert usage is not None and usage.prompt_tokens == 1200


def test_streamed_request_splice(benchmark, fast_impl: fast.Implementation) -> None:
    """Usage injection on a 300 B streamed request: facts, then the splice."""
    benchmark.group = "usage injection, 300 B streamed request"

    def inject() -> bytes:
        facts = fast_impl.request_facts(STREAMED_SMALL)
        cut = facts.insert_at
        return STREAMED_SMALL[:cut] + b'"stream_options":{"include_usage":true},' + STREAMED_SMALL[cut:]

    assert json.loads(benchmark(inject))["stream_options"] == {"include_usage": True}
