"""Cache keys: compiled vs pure, on bodies shaped like real chat requests."""

from __future__ import annotations

import hashlib
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


_SHA256_WAYS = ["cpython", "compiled", "compiled-portable"]


@pytest.mark.benchmark(group="SHA-256 of a 300 B key buffer")
@pytest.mark.parametrize("way", _SHA256_WAYS)
def test_sha256(benchmark, way: str) -> None:
    """The compiled key's own SHA-256 (SHA-NI where present, else its
    portable C compression) against CPython's, which the pure twin uses."""
    if fast.compiled is None and way != "cpython":
        pytest.skip("the extensions are not built")
    data = SMALL
    if way == "cpython":
        from relay._fast._cachekey_py import sha256

        digest = benchmark(lambda: sha256(data).digest())
    else:
        from relay._fast import _cachekey_c

        portable = way == "compiled-portable"
        digest = benchmark(_cachekey_c.sha256_digest, data, portable)
    assert digest == hashlib.sha256(data).digest()
