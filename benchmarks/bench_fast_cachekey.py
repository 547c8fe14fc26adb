"""Cache keys: compiled vs pure, on bodies shaped like real chat requests."""

from __future__ import annotations

import json

import pytest

import relay._fast as fast

METHOD = b"POST"
TARGET = b"/v1/chat/completions"
SCOPE = b"Bearer sk-proj-0123456789abcdefghijklmnopqrstuvwxyz"


def chat_body(turns: int, words: int) -> bytes:
    """A deterministic chat/completions body, keys in the order SDKs send them."""
    sentence = "Tell me about the history of caf\u00e9s in Vienna and their pastries. "
    messages = [{"role": "system", "content": "You are a concise, helpful assistant."}]
    for turn in range(turns):
        role = "user" if turn % 2 == 0 else "assistant"
        messages.append({"role": role, "content": (sentence * words)[: 60 * words]})
    body = {
        "model": "gpt-4o-mini",
        "messages": messages,
        "temperature": 0.2,
        "max_tokens": 256,
        "stream": False,
    }
    if turns > 4:
        body["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Current weather for a city.",
                    "parameters": {
                        "type": "object",
                        "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                        "required": ["city"],
                    },
                },
            }
        ]
    return json.dumps(body).encode()


SMALL = chat_body(turns=1, words=2)  # about 300 bytes
LARGE = chat_body(turns=36, words=8)  # about 20 KB


def test_body_sizes() -> None:
    assert 250 <= len(SMALL) <= 350, len(SMALL)
    assert 19_000 <= len(LARGE) <= 21_000, len(LARGE)


@pytest.mark.benchmark(group="cache_key 300 B chat body")
def test_cache_key_small(benchmark, fast_impl: fast.Implementation) -> None:
    key = benchmark(fast_impl.cache_key, METHOD, TARGET, SMALL, SCOPE)
    assert key == fast.pure.cache_key(METHOD, TARGET, SMALL, SCOPE)


@pytest.mark.benchmark(group="cache_key 20 KB chat body")
def test_cache_key_large(benchmark, fast_impl: fast.Implementation) -> None:
    key = benchmark(fast_impl.cache_key, METHOD, TARGET, LARGE, SCOPE)
    assert key == fast.pure.cache_key(METHOD, TARGET, LARGE, SCOPE)


@pytest.mark.benchmark(group="cache_key 20 KB non-JSON body")
def test_cache_key_raw(benchmark, fast_impl: fast.Implementation) -> None:
    raw = b"--boundary\r\n" + LARGE[1:]  # e.g. a multipart upload: hashed raw
    key = benchmark(fast_impl.cache_key, METHOD, TARGET, raw, SCOPE)
    assert key == fast.pure.cache_key(METHOD, TARGET, raw, SCOPE)


@pytest.mark.benchmark(group="credential_hash")
def test_credential_hash(benchmark, fast_impl: fast.Implementation) -> None:
    label = benchmark(fast_impl.credential_hash, SCOPE)
    assert len(label) == 16
