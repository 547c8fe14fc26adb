"""relay against upstreams that behave like the real providers, through real
sockets on both loops and with the official SDKs: compressed bodies, cut
responses, per-caller headers, request headers that change the answer, and
exact cost for the Responses API, reasoning tokens and Anthropic prompt
caching.

The fake upstream's rules (relay.testing.responses): W = words in the
prompt, the reply is "Hello from fake upstream W" (5 words) unless
``x-fake-events`` makes it longer; ``x-fake-cached-tokens: C``,
``x-fake-cache-write-tokens: K`` and ``x-fake-reasoning-tokens: R`` add
to the counts as the providers do.
"""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import anthropic
import openai
import pytest

from relay.testing import ThreadedFakeUpstream
from tests.support import RelayThread
from tests.test_usage_e2e import counted, sample, scrape, wait_usage

if TYPE_CHECKING:
    from tests.conftest import RawClient, RelayFactory

GPT4O = {"input": 0.0025, "output": 0.01, "cached_input": 0.00125}
CLAUDE = {"input": 0.003, "output": 0.015, "cached_input": 0.0003, "cache_write_input": 0.00375}
MODELS = {"gpt-4o": GPT4O, "claude-sonnet-4": CLAUDE}
CACHE = {"enabled": True, "ttl": 60}


def post(path: str, body: dict[str, Any] | bytes, *headers: str) -> bytes:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    lines = [f"POST {path} HTTP/1.1", "Host: relay", "Content-Type: application/json",
             f"Content-Length: {len(data)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": content}], **extra}


def messages(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "claude-sonnet-4-20250514", "max_tokens": 64,
            "messages": [{"role": "user", "content": content}], **extra}


def sse_data(body: bytes) -> list[bytes]:
    return [e[6:] for e in body.split(b"\n\n") if e.startswith(b"data: ")]


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@pytest.fixture
def upstream() -> Iterator[ThreadedFakeUpstream]:
    """A fake upstream per test, so its request log is exact."""
    with ThreadedFakeUpstream() as fake:
        yield fake


@pytest.fixture
def relay(relay_factory: RelayFactory, upstream: ThreadedFakeUpstream) -> RelayThread:
    return relay_factory(upstream.url, cache=CACHE, models=MODELS)


def sdk(relay: RelayThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=relay.url + "/v1", api_key="sk-fidelity", max_retries=0,
                         timeout=10)


def claude(relay: RelayThread) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=relay.url, api_key="sk-ant-fidelity", max_retries=0,
                               timeout=10)


def totals(relay: RelayThread, n: int) -> dict[str, Any]:
    snap, _ = wait_usage(relay.port, counted(n))
    return snap


# --------------------------------------------------------------- compression

EXACT_BODY = json.dumps({
    "id": "chatcmpl-exact", "object": "chat.completion", "created": 1, "model": "gpt-4o",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "compressed hello"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1234, "completion_tokens": 567, "total_tokens": 1801},
}).encode()


def test_sdk_against_gzip_upstream_gets_content_and_exact_usage(
    relay: RelayThread, upstream: ThreadedFakeUpstream, connect: Callable[[int], RawClient],
) -> None:
    answer = sdk(relay).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "zip me"}],
        extra_headers={"x-fake-encoding": "gzip", "x-fake-body": EXACT_BODY.decode()},
    )
    assert answer.choices[0].message.content == "compressed hello"
    # relay asked for identity, whatever the SDK accepts.
    sent = upstream.requests[0].headers
    assert [v for k, v in sent if k == "accept-encoding"] == ["identity"]
    snap = totals(relay, 1)
    model = snap["models"]["gpt-4o"]
    assert (model["prompt_tokens"], model["completion_tokens"]) == (1234, 567)
    assert model["estimated_requests"] == 0
    assert model["cost_usd"] == pytest.approx(1234 / 1000 * 0.0025 + 567 / 1000 * 0.01)

    # A client that accepts no coding gets identity bytes from the cache.
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "zip me"}]})
    client = connect(relay.port)
    client.send(post("/v1/chat/completions", body.encode(), "Authorization: Bearer sk-fidelity"))
    hit = client.response()
    assert hit.complete and hit.status == 200
    assert hit.header("x-relay-cache") == "HIT"
    assert hit.header("content-encoding") is None
    assert hit.body == EXACT_BODY
    assert len(upstream.requests) == 1


def test_sdk_stream_from_gzip_upstream_is_exact_and_replayed_as_identity(
    relay: RelayThread, upstream: ThreadedFakeUpstream, connect: Callable[[int], RawClient],
) -> None:
    stream = sdk(relay).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "stream me zipped"}], stream=True,
        extra_headers={"x-fake-encoding": "gzip", "x-fake-cached-tokens": "4"},
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "Hello from fake upstream 3"
    snap = totals(relay, 1)
    model = snap["models"]["gpt-4o"]
    assert (model["prompt_tokens"], model["completion_tokens"], model["cached_tokens"]) == (7, 5, 4)
    assert model["estimated_requests"] == 0

    body = chat("stream me zipped", stream=True)
    client = connect(relay.port)
    client.send(post("/v1/chat/completions", body, "Authorization: Bearer sk-fidelity"))
    hit = client.response()
    assert hit.complete and hit.header("x-relay-cache") == "HIT"
    assert hit.header("content-encoding") is None
    assert (hit.header("content-type") or "").startswith("text/event-stream")
    events = sse_data(hit.body)
    assert events[-1] == b"[DONE]"
    # The client did not ask for usage: the replay has none either.
    assert all(b'"usage"' not in e for e in events)
    assert "".join(
        json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1]
    ) == "Hello from fake upstream 3"
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
def test_encoded_json_reaches_a_plain_client_decoded(
    relay: RelayThread, connect: Callable[[int], RawClient], coding: str,
) -> None:
    client = connect(relay.port)
    client.send(post("/v1/chat/completions", chat("plain client " + coding),
                     f"x-fake-encoding: {coding}"))
    response = client.response()
    assert response.complete and response.status == 200
    assert response.header("content-encoding") is None
    assert response.header("x-relay-cache") == "MISS"
    doc = json.loads(response.body)
    assert doc["choices"][0]["message"]["content"] == "Hello from fake upstream 3"


def test_encoded_stream_is_decoded_event_by_event(
    relay: RelayThread, connect: Callable[[int], RawClient],
) -> None:
    client = connect(relay.port)
    client.send(post("/v1/chat/completions", chat("slow zipped stream", stream=True),
                     "x-fake-encoding: deflate", "x-fake-event-delay: 0.3"))
    while not sse_data(client._current.body if client._current else b""):
        assert client._recv()
    first = client._current
    assert first is not None and not first.complete  # 9 more events are 0.3 s apart
    assert first.body.startswith(b"data: {")
    assert first.header("content-encoding") is None
    response = client.response()
    assert response.complete and sse_data(response.body)[-1] == b"[DONE]"


def test_undecodable_coding_is_refused_before_any_byte(
    relay: RelayThread, upstream: ThreadedFakeUpstream, connect: Callable[[int], RawClient],
) -> None:
    client = connect(relay.port)
    for _ in range(2):
        client.send(post("/v1/chat/completions", chat("brotli please"), "x-fake-encoding: br"))
        response = client.response()
        assert response.complete and response.status == 502
        error = json.loads(response.body)["error"]
        assert "'br'" in error["message"] and error["type"]
    assert len(upstream.requests) == 2  # nothing was cached


def test_gzip_stream_cut_inside_the_coding_is_aborted(
    relay_factory: RelayFactory, connect: Callable[[int], RawClient],
) -> None:
    # The framing ends cleanly but the gzip member does not: not complete.
    from tests.test_upstream_faults import CannedUpstream

    packed = gzip.compress(b'{"id":"x","usage":{"prompt_tokens":1,"completion_tokens":1}}')
    cut = packed[: len(packed) - 6]
    server = CannedUpstream(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                            b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s"
                            % (len(cut), cut))
    try:
        relay = relay_factory(server.url, cache=CACHE)
        client = connect(relay.port)
        client.send(b"POST /v1/x HTTP/1.1\r\nHost: r\r\nContent-Length: 2\r\n\r\n{}")
        response = client.response()
        assert response.status == 200 and not response.complete
        assert client.closed
    finally:
        server.stop()


def test_corrupt_gzip_body_is_aborted_and_not_cached(
    relay_factory: RelayFactory, connect: Callable[[int], RawClient],
) -> None:
    from tests.test_upstream_faults import CannedUpstream

    good = gzip.compress(b'{"id":"x"}')
    corrupt = good[:10] + b"\xff" * 8 + good[18:]
    server = CannedUpstream(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                            b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s"
                            % (len(corrupt), corrupt))
    try:
        relay = relay_factory(server.url, cache=CACHE)
        for cache in ("MISS", "MISS"):
            client = connect(relay.port)
            client.send(b"POST /v1/x HTTP/1.1\r\nHost: r\r\nContent-Length: 2\r\n\r\n{}")
            response = client.response()
            assert response.status == 200 and not response.complete
            assert response.header("x-relay-cache") == cache
            assert client.closed
    finally:
        server.stop()


@pytest.mark.parametrize("method", ["HEAD", "GET"])
def test_encoded_head_and_empty_encoded_body_are_not_cuts(
    relay_factory: RelayFactory, method: str,
) -> None:
    # HEAD: no body follows the coding; GET: a coded body of zero bytes.
    import http.client

    from tests.test_upstream_faults import CannedUpstream

    server = CannedUpstream(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                            b"Content-Encoding: gzip\r\nContent-Length: %s\r\n\r\n"
                            % (b"31" if method == "HEAD" else b"0"))
    try:
        relay = relay_factory(server.url)
        conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=10)
        for _ in range(2):  # the connection stays usable: the response ended cleanly
            conn.request(method, "/v1/models")
            response = conn.getresponse()
            assert response.status == 200 and response.read() == b""
            assert response.getheader("content-encoding") is None
            # The upstream's length was that of the coded body: not passed on.
            assert response.getheader("content-length") in (None, "0")
        conn.close()
    finally:
        server.stop()


# --------------------------------------------------------------- cut responses

CUTS = {
    # name: (request body, fault headers)
    "content-length": (chat("cut with a length"), ("x-fake-reset-after: 40",)),
    "chunked": (chat("cut chunked"), ("x-fake-body-bytes: 5000", "x-fake-chunked: 1",
                                      "x-fake-reset-after: 1000")),
    "close-delimited": (chat("cut without length"), ("x-fake-close-delimited: 1",
                                                     "x-fake-reset-after: 40")),
    "sse": (chat("cut stream", stream=True), ("x-fake-reset-after: 300",
                                             "x-fake-event-delay: 0.01")),
}


@pytest.mark.parametrize("kind", sorted(CUTS))
def test_cut_response_is_aborted_never_cached_and_a_breaker_failure(
    relay_factory: RelayFactory, upstream: ThreadedFakeUpstream,
    connect: Callable[[int], RawClient], kind: str,
) -> None:
    relay = relay_factory(upstream.url, cache=CACHE, models=MODELS, circuit_breaker={
        "enabled": True, "failure_threshold": 2, "recovery_timeout": 30})
    body, faults = CUTS[kind]
    for _ in range(2):
        client = connect(relay.port)
        client.send(post("/v1/chat/completions", body, *faults))
        response = client.response()
        assert response.status == 200 and not response.complete, kind
        # Not cached: the identical second request went upstream again.
        assert response.header("x-relay-cache") == "MISS"
        assert client.closed
        length = response.header("content-length")
        if length is not None:
            assert len(response.body) < int(length)
        if kind == "sse":
            last = sse_data(response.body)[-1]
            assert json.loads(last)["error"]["type"] == "upstream_error"
            assert b"[DONE]" not in response.body
    assert len(upstream.requests) == 2
    # Both cuts were upstream failures: the breaker (threshold 2) is open.
    client = connect(relay.port)
    client.send(post("/v1/chat/completions", body))
    refused = client.response()
    assert refused.status == 503
    assert json.loads(refused.body)["error"]["code"] == "circuit_breaker_open"

    def cut_count() -> float:
        _, samples, _ = scrape(relay.port)
        return sample(samples, "relay_requests_total", route=f"127.0.0.1:{upstream.port}",
                      method="POST", status="502")

    # Counted once accounting is done (an estimate may first load the tokenizer).
    assert wait_for(lambda: cut_count() == 2)


def test_clean_close_still_ends_a_close_delimited_body(
    relay: RelayThread, connect: Callable[[int], RawClient],
) -> None:
    client = connect(relay.port)
    client.send(post("/v1/chat/completions", chat("ends with a FIN"),
                     "x-fake-close-delimited: 1"))
    response = client.response()
    assert response.complete and response.status == 200
    assert json.loads(response.body)["usage"]["completion_tokens"] == 5
    again = connect(relay.port)
    again.send(post("/v1/chat/completions", chat("ends with a FIN")))
    assert again.response().header("x-relay-cache") == "HIT"


def test_anthropic_stream_cut_ends_with_an_error_event(
    relay: RelayThread, connect: Callable[[int], RawClient],
) -> None:
    client = connect(relay.port)
    client.send(post("/v1/messages", messages("cut claude", stream=True),
                     "anthropic-version: 2023-06-01", "x-fake-reset-after: 700",
                     "x-fake-event-delay: 0.01"))
    response = client.response()
    assert response.status == 200 and not response.complete
    tail = response.body.rsplit(b"\n\n", 2)[-2]
    name, data = tail.split(b"\n", 1)
    assert name == b"event: error"
    error = json.loads(data[6:])
    assert error["type"] == "error" and error["error"]["type"] == "api_error"
    assert b"message_stop" not in response.body


def test_openai_sdk_raises_on_a_cut_stream(relay: RelayThread) -> None:
    stream = sdk(relay).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "sdk cut"}], stream=True,
        extra_headers={"x-fake-reset-after": "300", "x-fake-event-delay": "0.01"},
    )
    with pytest.raises(openai.APIError, match="broke off"):
        for _ in stream:
            pass


def test_anthropic_sdk_raises_on_a_cut_stream(relay: RelayThread) -> None:
    with pytest.raises(anthropic.APIError, match="broke off"):  # noqa: PT012
        with claude(relay).messages.stream(
            model="claude-sonnet-4-20250514", max_tokens=64,
            messages=[{"role": "user", "content": "sdk cut claude"}],
            extra_headers={"x-fake-reset-after": "700", "x-fake-event-delay": "0.01"},
        ) as stream:
            for _ in stream.text_stream:
                pass


def test_coalesced_follower_of_a_cut_stream_sees_it_cut(
    relay: RelayThread, upstream: ThreadedFakeUpstream, connect: Callable[[int], RawClient],
) -> None:
    body = chat("shared cut stream", stream=True)
    leader = connect(relay.port)
    leader.send(post("/v1/chat/completions", body, "x-fake-events: 40",
                     "x-fake-event-delay: 0.05", "x-fake-reset-after: 2500"))
    assert wait_for(lambda: len(upstream.requests) == 1)
    follower = connect(relay.port)
    follower.send(post("/v1/chat/completions", body))
    for client, cache in ((leader, "MISS"), (follower, "HIT")):
        response = client.response()
        assert response.status == 200 and not response.complete
        assert response.header("x-relay-cache") == cache
        assert "error" in json.loads(sse_data(response.body)[-1])
    assert len(upstream.requests) == 1
    late = connect(relay.port)
    late.send(post("/v1/chat/completions", body))
    whole = late.response()
    assert whole.complete and whole.header("x-relay-cache") == "MISS"


# --------------------------------------------------------------- per-caller headers


def test_set_cookie_reaches_only_the_caller_it_was_for(
    relay: RelayThread, upstream: ThreadedFakeUpstream, connect: Callable[[int], RawClient],
) -> None:
    body = chat("cookie jar")
    leader = connect(relay.port)
    leader.send(post("/v1/chat/completions", body, "x-fake-set-cookie: session=leader-only",
                     "x-fake-delay: 1"))
    assert wait_for(lambda: len(upstream.requests) == 1)
    coalescer = relay.gateway.runtime.coalescer  # type: ignore[union-attr]
    follower = connect(relay.port)
    follower.send(post("/v1/chat/completions", body))

    def joined() -> int:
        return sum(f.joined for f in coalescer._flights.values())

    assert wait_for(lambda: relay.call(joined) == 1)  # really coalesced, not a later hit
    first = leader.response()
    assert first.header("x-relay-cache") == "MISS"
    assert first.header("set-cookie") == "session=leader-only"
    second = follower.response()
    assert second.complete and second.header("x-relay-cache") == "HIT"
    assert second.header("set-cookie") is None
    assert second.body == first.body
    later = connect(relay.port)
    later.send(post("/v1/chat/completions", body))
    third = later.response()
    assert third.header("x-relay-cache") == "HIT" and third.header("set-cookie") is None
    assert len(upstream.requests) == 1


# --------------------------------------------------------------- varying request headers


@pytest.mark.parametrize(
    ("header", "first", "second"),
    [
        ("anthropic-version", "2023-06-01", "2023-01-01"),
        ("anthropic-beta", "prompt-caching-2024-07-31", "output-128k-2025-02-19"),
        ("OpenAI-Organization", "org-one", "org-two"),
        ("OpenAI-Project", "proj_one", "proj_two"),
    ],
)
def test_headers_that_change_the_answer_key_the_cache(
    relay: RelayThread, upstream: ThreadedFakeUpstream, connect: Callable[[int], RawClient],
    header: str, first: str, second: str,
) -> None:
    body = chat(f"varies by {header}")
    seen = []
    for value in (first, second, first, second, None):
        client = connect(relay.port)
        extra = (f"{header}: {value}",) if value is not None else ()
        client.send(post("/v1/chat/completions", body, *extra))
        response = client.response()
        assert response.complete and response.status == 200
        seen.append(response.header("x-relay-cache"))
    assert seen == ["MISS", "MISS", "HIT", "HIT", "MISS"]
    assert len(upstream.requests) == 3


def test_varying_headers_key_the_cache_whatever_their_order(
    relay: RelayThread, connect: Callable[[int], RawClient],
) -> None:
    body = chat("two varying headers")
    one, two = "OpenAI-Organization: org-a", "OpenAI-Project: proj-b"
    seen = []
    for headers in ((one, two), (two, one)):
        client = connect(relay.port)
        client.send(post("/v1/chat/completions", body, *headers))
        seen.append(client.response().header("x-relay-cache"))
    assert seen == ["MISS", "HIT"]


# --------------------------------------------------------------- exact cost


def gpt4o_cost(prompt: int, completion: int, cached: int) -> float:
    return ((prompt - cached) / 1000 * GPT4O["input"] + cached / 1000 * GPT4O["cached_input"]
            + completion / 1000 * GPT4O["output"])


def claude_cost(uncached: int, read: int, written: int, completion: int) -> float:
    return (uncached / 1000 * CLAUDE["input"] + read / 1000 * CLAUDE["cached_input"]
            + written / 1000 * CLAUDE["cache_write_input"] + completion / 1000 * CLAUDE["output"])


def test_responses_api_json_and_stream_cost_the_same(relay: RelayThread) -> None:
    client = sdk(relay)
    faults = {"x-fake-cached-tokens": "6", "x-fake-reasoning-tokens": "11",
              "cache-control": "no-store"}
    answer = client.responses.create(model="gpt-4o", input="three little words",
                                     extra_headers=faults)
    assert answer.output_text == "Hello from fake upstream 3"
    assert answer.usage is not None
    assert answer.usage.output_tokens_details.reasoning_tokens == 11
    prompt, completion, cached = 3 + 6, 5 + 11, 6
    one = gpt4o_cost(prompt, completion, cached)
    snap = totals(relay, 1)
    assert snap["models"]["gpt-4o"]["cost_usd"] == pytest.approx(one, rel=1e-12)

    stream = client.responses.create(model="gpt-4o", input="three little words", stream=True,
                                     extra_headers=faults)
    kinds = [event.type for event in stream]
    assert kinds[-1] == "response.completed" and "response.output_text.delta" in kinds
    row = totals(relay, 2)["models"]["gpt-4o"]
    assert (row["prompt_tokens"], row["completion_tokens"], row["cached_tokens"]) == (
        2 * prompt, 2 * completion, 2 * cached)
    assert row["estimated_requests"] == 0
    assert row["cost_usd"] == pytest.approx(2 * one, rel=1e-12)


def test_chat_reasoning_tokens_and_usage_on_the_last_chunk_cost_the_same(
    relay: RelayThread,
) -> None:
    client = sdk(relay)
    faults = {"x-fake-reasoning-tokens": "64", "x-fake-usage-on-last-chunk": "1",
              "x-fake-cached-tokens": "2", "cache-control": "no-store"}
    answer = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "think hard"}], extra_headers=faults)
    assert answer.usage is not None
    assert answer.usage.completion_tokens_details is not None
    assert answer.usage.completion_tokens_details.reasoning_tokens == 64
    one = gpt4o_cost(2 + 2, 5 + 64, 2)
    assert totals(relay, 1)["models"]["gpt-4o"]["cost_usd"] == pytest.approx(one, rel=1e-12)

    chunks = list(client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "think hard"}], stream=True,
        stream_options={"include_usage": True}, extra_headers=faults))
    last = chunks[-1]
    assert last.choices and last.choices[0].finish_reason == "stop"
    assert last.usage is not None and last.usage.completion_tokens == 69
    row = totals(relay, 2)["models"]["gpt-4o"]
    assert row["estimated_requests"] == 0
    assert (row["prompt_tokens"], row["completion_tokens"]) == (8, 138)
    assert row["cost_usd"] == pytest.approx(2 * one, rel=1e-12)


def test_usage_relay_asked_for_is_removed_from_a_last_chunk_with_choices(
    relay: RelayThread,
) -> None:
    client = sdk(relay)
    chunks = list(client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "no usage wanted"}], stream=True,
        extra_headers={"x-fake-usage-on-last-chunk": "1", "x-fake-reasoning-tokens": "9"}))
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(chunk.usage is None for chunk in chunks)  # the client did not ask for it
    row = totals(relay, 1)["models"]["gpt-4o"]
    assert (row["prompt_tokens"], row["completion_tokens"], row["estimated_requests"]) == (
        3, 5 + 9, 0)


def test_anthropic_prompt_caching_json_and_stream_cost_the_same(relay: RelayThread) -> None:
    client = claude(relay)
    faults = {"x-fake-cache-write-tokens": "1500", "x-fake-cached-tokens": "300",
              "cache-control": "no-store"}
    content = [{"type": "text", "text": "cache this prompt",
                "cache_control": {"type": "ephemeral"}}]
    message = client.messages.create(model="claude-sonnet-4-20250514", max_tokens=64,
                                     messages=[{"role": "user", "content": content}],
                                     extra_headers=faults)
    assert message.usage.cache_creation_input_tokens == 1500
    assert message.usage.cache_read_input_tokens == 300
    one = claude_cost(3, 300, 1500, 5)
    model = "claude-sonnet-4-20250514"
    assert totals(relay, 1)["models"][model]["cost_usd"] == pytest.approx(one, rel=1e-12)

    with client.messages.stream(model="claude-sonnet-4-20250514", max_tokens=64,
                                messages=[{"role": "user", "content": content}],
                                extra_headers=faults) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Hello from fake upstream 3"
    assert final.usage.cache_creation_input_tokens == 1500
    row = totals(relay, 2)["models"][model]
    assert row["estimated_requests"] == 0
    assert (row["prompt_tokens"], row["cached_tokens"]) == (2 * 1803, 2 * 300)
    assert row["cost_usd"] == pytest.approx(2 * one, rel=1e-12)


def test_cache_hit_of_an_anthropic_cache_write_saves_its_exact_cost(
    relay: RelayThread, connect: Callable[[int], RawClient],
) -> None:
    body = messages("saved cache write")
    for _ in range(2):
        client = connect(relay.port)
        client.send(post("/v1/messages", body, "anthropic-version: 2023-06-01",
                         "x-fake-cache-write-tokens: 1000"))
        assert client.response().complete
    row = totals(relay, 2)["models"]["claude-sonnet-4-20250514"]
    assert row["saved_usd"] == pytest.approx(claude_cost(3, 0, 1000, 5), rel=1e-12)
    assert row["cost_usd"] == pytest.approx(claude_cost(3, 0, 1000, 5), rel=1e-12)

