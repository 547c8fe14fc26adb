"""The fake upstream, exercised through real sockets on 127.0.0.1: the
official SDKs must parse what it says, and every fault header must do what
its documentation promises."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

import anthropic
import httptools
import openai
import pytest
import uvloop

from relay.testing import FakeUpstream, RecordedRequest, ThreadedFakeUpstream

TIMEOUT = 5.0
PROMPT = "one two three"  # 3 words -> reply "Hello from fake upstream 3"
REPLY = "Hello from fake upstream 3"


@pytest.fixture(params=["asyncio", "uvloop"])
def up(request: pytest.FixtureRequest) -> Iterator[ThreadedFakeUpstream]:
    with ThreadedFakeUpstream(use_uvloop=request.param == "uvloop") as server:
        yield server


@pytest.fixture
def oai(up: ThreadedFakeUpstream) -> openai.OpenAI:
    return openai.OpenAI(base_url=up.url + "/v1", api_key="sk-test", max_retries=0,
                         timeout=TIMEOUT)


@pytest.fixture
def ant(up: ThreadedFakeUpstream) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=up.url, api_key="sk-ant-test", max_retries=0,
                               timeout=TIMEOUT)


MESSAGES: Any = [{"role": "user", "content": PROMPT}]


# ------------------------------------------------------------------ raw HTTP helpers


class Response:
    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""
        self.chunks: list[bytes] = []


class ResponseReader:
    """Reads consecutive HTTP responses off one socket with httptools."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.done: list[Response] = []
        self.raw = b""
        self._current = Response()
        self._parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self._current = Response()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._current.headers[name.decode().lower()] = value.decode()

    def on_headers_complete(self) -> None:
        self._current.status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self._current.chunks.append(body)

    def on_message_complete(self) -> None:
        self._current.body = b"".join(self._current.chunks)
        self.done.append(self._current)

    def read(self, count: int = 1) -> list[Response]:
        while len(self.done) < count:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("connection closed before the response ended")
            self.raw += data
            self._parser.feed_data(data)
        return self.done[:count]


def connect(up: ThreadedFakeUpstream) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", up.port), timeout=TIMEOUT)
    return sock


def request(path: str, body: Any = None, *, method: str = "POST",
            headers: dict[str, str] | None = None) -> bytes:
    data = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    lines = [f"{method} {path} HTTP/1.1", "host: fake"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if method != "GET" or data:
        lines.append(f"content-length: {len(data)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


def chat(prompt: str = PROMPT, **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": prompt}], **extra}


def roundtrip(up: ThreadedFakeUpstream, raw: bytes) -> Response:
    with connect(up) as sock:
        sock.sendall(raw)
        return ResponseReader(sock).read()[0]


def read_until_closed(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    data = b""
    while len(data) < limit:
        piece = sock.recv(65536)
        if not piece:
            return data
        data += piece
    raise AssertionError("peer kept sending")


def sse_data(body: bytes) -> list[str]:
    return [line[6:] for line in body.decode().split("\n") if line.startswith("data: ")]


def wait_for(predicate: Any, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


# ------------------------------------------------------------------ OpenAI SDK


def test_openai_chat_json(up: ThreadedFakeUpstream, oai: openai.OpenAI) -> None:
    resp = oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert resp.object == "chat.completion"
    assert resp.id.startswith("chatcmpl-")
    assert resp.model == "gpt-4o-mini"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == REPLY
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (3, 5)
    assert resp.usage.total_tokens == 8
    assert resp.usage.prompt_tokens_details is not None
    assert resp.usage.prompt_tokens_details.cached_tokens == 0

    recorded = up.requests[-1]
    assert isinstance(recorded, RecordedRequest)
    assert (recorded.method, recorded.path) == ("POST", "/v1/chat/completions")
    assert recorded.header("Authorization") == "Bearer sk-test"
    assert all(name == name.lower() for name, _ in recorded.headers)
    assert recorded.json()["model"] == "gpt-4o-mini"


def test_openai_identical_requests_get_identical_bodies(up: ThreadedFakeUpstream) -> None:
    raw = request("/v1/chat/completions", chat())
    first, second = roundtrip(up, raw), roundtrip(up, raw)
    assert first.body == second.body
    other = roundtrip(up, request("/v1/chat/completions", chat("a b c d")))
    assert json.loads(other.body)["id"] != json.loads(first.body)["id"]


def test_openai_chat_stream_without_usage(up: ThreadedFakeUpstream, oai: openai.OpenAI) -> None:
    chunks = list(oai.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    assert all(c.object == "chat.completion.chunk" and c.model == "gpt-4o" for c in chunks)
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == REPLY
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    # 1 role chunk + 5 content chunks + 1 finish chunk
    assert len(chunks) == 7

    raw = roundtrip(up, request("/v1/chat/completions", chat(stream=True)))
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.headers["transfer-encoding"] == "chunked"
    assert b'"usage"' not in raw.body
    assert sse_data(raw.body)[-1] == "[DONE]"


def test_openai_chat_stream_include_usage(up: ThreadedFakeUpstream, oai: openai.OpenAI) -> None:
    chunks = list(oai.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True,
        stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (3, 5)
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == REPLY

    raw = roundtrip(up, request("/v1/chat/completions",
                                chat(stream=True, stream_options={"include_usage": True})))
    events = sse_data(raw.body)
    assert events[-1] == "[DONE]"
    usage_chunk = json.loads(events[-2])
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["total_tokens"] == 8


def test_openai_cached_tokens_and_events(oai: openai.OpenAI) -> None:
    resp = oai.chat.completions.create(model="gpt-4o", messages=MESSAGES,
                                       extra_headers={"x-fake-cached-tokens": "7"})
    assert resp.usage is not None and resp.usage.prompt_tokens_details is not None
    assert resp.usage.prompt_tokens == 3 + 7
    assert resp.usage.prompt_tokens_details.cached_tokens == 7

    chunks = list(oai.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True},
        extra_headers={"x-fake-events": "12"}))
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) == 12
    text = "".join(c.choices[0].delta.content or "" for c in content)
    assert len(text.split()) == 12 and text.startswith(REPLY)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12


def test_openai_no_usage(oai: openai.OpenAI) -> None:
    resp = oai.chat.completions.create(model="gpt-4o", messages=MESSAGES,
                                       extra_headers={"x-fake-no-usage": "1"})
    assert resp.usage is None
    chunks = list(oai.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True},
        extra_headers={"x-fake-no-usage": "1"}))
    assert all(c.usage is None and c.choices for c in chunks)


def test_openai_max_tokens_cuts_reply(oai: openai.OpenAI) -> None:
    resp = oai.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=2)
    assert resp.choices[0].message.content == "Hello from"
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None and resp.usage.completion_tokens == 2


def test_openai_completions_embeddings_models(oai: openai.OpenAI) -> None:
    comp = oai.completions.create(model="gpt-3.5-turbo-instruct", prompt="a b")
    assert comp.object == "text_completion"
    assert comp.choices[0].text == "Hello from fake upstream 2"
    assert comp.usage is not None and comp.usage.prompt_tokens == 2

    streamed = list(oai.completions.create(model="gpt-3.5-turbo-instruct", prompt="a b",
                                           stream=True))
    assert "".join(c.choices[0].text for c in streamed) == "Hello from fake upstream 2"
    assert streamed[-1].choices[0].finish_reason == "stop"

    emb = oai.embeddings.create(model="text-embedding-3-small", input=["a b", "c"])
    assert [d.index for d in emb.data] == [0, 1]
    assert len(emb.data[0].embedding) == 8
    assert emb.usage.prompt_tokens == 3
    floats = oai.embeddings.create(model="text-embedding-3-small", input="a b",
                                   dimensions=4, encoding_format="float")
    assert len(floats.data[0].embedding) == 4
    # base64 (the SDK's default) and float carry the same vector
    b64 = oai.embeddings.create(model="text-embedding-3-small", input="a b", dimensions=4)
    assert list(b64.data[0].embedding) == floats.data[0].embedding

    ids = [m.id for m in oai.models.list()]
    assert "gpt-4o" in ids
    assert oai.models.retrieve("gpt-4o-mini").id == "gpt-4o-mini"


def test_openai_errors_parse(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as server_error:
        oai.chat.completions.create(model="gpt-4o", messages=MESSAGES,
                                    extra_headers={"x-fake-status": "500"})
    assert server_error.value.status_code == 500
    assert "status 500" in server_error.value.message
    with pytest.raises(openai.RateLimitError) as limited:
        oai.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True,
                                    extra_headers={"x-fake-status": "429"})
    assert limited.value.code == "rate_limit_exceeded"
    with pytest.raises(openai.NotFoundError):
        oai.post("/nowhere", cast_to=object, body={})


# ------------------------------------------------------------------ Anthropic SDK


def test_anthropic_message_json(up: ThreadedFakeUpstream, ant: anthropic.Anthropic) -> None:
    msg = ant.messages.create(model="claude-test", max_tokens=100, messages=MESSAGES,
                              system="be brief", extra_headers={"x-fake-cached-tokens": "4"})
    assert msg.type == "message" and msg.role == "assistant"
    assert msg.id.startswith("msg_")
    assert msg.model == "claude-test"
    assert msg.content[0].type == "text"
    assert msg.content[0].text == "Hello from fake upstream 5"  # system words count too
    assert msg.stop_reason == "end_turn"
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (5, 5)
    assert msg.usage.cache_read_input_tokens == 4
    recorded = up.requests[-1]
    assert recorded.path == "/v1/messages"
    # the SDK sends the key as x-api-key or as a bearer token, depending on its version
    assert "sk-ant-test" in (recorded.header("x-api-key") or recorded.header("authorization") or "")
    assert recorded.header("anthropic-version") is not None


def test_anthropic_message_stream(ant: anthropic.Anthropic) -> None:
    with ant.messages.stream(model="claude-test", max_tokens=100,
                             messages=MESSAGES) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == REPLY
    assert final.content[0].text == REPLY
    assert final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (3, 5)

    cut = ant.messages.create(model="claude-test", max_tokens=2, messages=MESSAGES)
    assert cut.stop_reason == "max_tokens" and cut.content[0].text == "Hello from"


def test_anthropic_stream_event_sequence(up: ThreadedFakeUpstream) -> None:
    body = {"model": "claude-x", "max_tokens": 50, "stream": True, "messages": MESSAGES}
    resp = roundtrip(up, request("/v1/messages", body, headers={"anthropic-version": "2023-06-01"}))
    names = [line[7:] for line in resp.body.decode().split("\n") if line.startswith("event: ")]
    assert names == ["message_start", "content_block_start", "ping", *["content_block_delta"] * 5,
                     "content_block_stop", "message_delta", "message_stop"]
    datas = [json.loads(d) for d in sse_data(resp.body)]
    assert [d["type"] for d in datas] == names
    assert datas[0]["message"]["usage"]["input_tokens"] == 3
    assert datas[-2]["usage"] == {"output_tokens": 5}

    quiet = roundtrip(up, request("/v1/messages", body, headers={"x-fake-no-usage": "1"}))
    assert b'"usage"' not in quiet.body


def test_anthropic_errors_and_models(ant: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.RateLimitError) as limited:
        ant.messages.create(model="claude-x", max_tokens=10, messages=MESSAGES,
                            extra_headers={"x-fake-status": "429"})
    assert limited.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    with pytest.raises(anthropic.InternalServerError):
        ant.messages.create(model="claude-x", max_tokens=10, messages=MESSAGES,
                            extra_headers={"x-fake-status": "529"})
    ids = [m.id for m in ant.models.list()]
    assert ids and all(i.startswith("claude") for i in ids)
    assert ant.messages.count_tokens(model="claude-x", messages=MESSAGES).input_tokens == 3


# ------------------------------------------------------------------ HTTP behaviour


def test_keep_alive_reuses_one_connection(up: ThreadedFakeUpstream) -> None:
    up.reset_stats()
    with connect(up) as sock:
        reader = ResponseReader(sock)
        for i in range(3):
            sock.sendall(request("/v1/chat/completions", chat("w " * (i + 1))))
            resp = reader.read(i + 1)[i]
            assert resp.status == 200
            assert json.loads(resp.body)["usage"]["prompt_tokens"] == i + 1
    assert up.connections_opened == 1
    assert len(up.requests) == 3
    wait_for(lambda: up.active_connections == 0)


def test_pipelined_requests_answered_in_order(up: ThreadedFakeUpstream) -> None:
    chunked = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: fake\r\n"
               b"transfer-encoding: chunked\r\n\r\n")
    payload = json.dumps(chat("a b c d e f")).encode()
    chunked += b"%x\r\n%b\r\n%x\r\n%b\r\n0\r\n\r\n" % (5, payload[:5], len(payload) - 5,
                                                         payload[5:])
    batch = (
        request("/v1/chat/completions", chat("a"), headers={"x-fake-delay": "0.1"})
        + request("/v1/chat/completions", chat("a b"))
        + request("/v1/models", method="GET")
        + chunked
        + request("/v1/chat/completions", chat("a b c", stream=True),
                  headers={"x-fake-event-delay": "0.01"})
        + request("/v1/chat/completions", chat("a b c d e f g"))
    )
    with connect(up) as sock:
        sock.sendall(batch)
        responses = ResponseReader(sock).read(6)
    assert [r.status for r in responses] == [200] * 6
    assert json.loads(responses[0].body)["usage"]["prompt_tokens"] == 1
    assert json.loads(responses[1].body)["usage"]["prompt_tokens"] == 2
    assert json.loads(responses[2].body)["object"] == "list"
    assert json.loads(responses[3].body)["usage"]["prompt_tokens"] == 6
    assert sse_data(responses[4].body)[-1] == "[DONE]"
    assert json.loads(responses[5].body)["usage"]["prompt_tokens"] == 7
    assert up.requests[-3].body == payload  # chunked body recorded de-chunked


def test_expect_100_continue(up: ThreadedFakeUpstream) -> None:
    body = json.dumps(chat()).encode()
    with connect(up) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: f\r\nexpect: 100-continue\r\n"
                     b"content-length: %d\r\n\r\n" % len(body))
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        assert ResponseReader(sock).read()[0].status == 200


def test_unknown_path_bad_json_bad_header(up: ThreadedFakeUpstream) -> None:
    missing = roundtrip(up, request("/v2/whatever", {}))
    assert missing.status == 404
    assert set(json.loads(missing.body)["error"]) >= {"message", "type", "code"}
    bad_json = roundtrip(up, request("/v1/chat/completions", b"{nope"))
    assert bad_json.status == 400 and "error" in json.loads(bad_json.body)
    no_model = roundtrip(up, request("/v1/chat/completions", {"messages": []}))
    assert no_model.status == 400
    typo = roundtrip(up, request("/v1/models", method="GET", headers={"x-fake-stauts": "500"}))
    assert typo.status == 400 and b"x-fake-stauts" in typo.body
    bad_value = roundtrip(up, request("/v1/models", method="GET", headers={"x-fake-delay": "soon"}))
    assert bad_value.status == 400


def test_malformed_http_gets_400_and_close(up: ThreadedFakeUpstream) -> None:
    with connect(up) as sock:
        sock.sendall(b"NOT AN HTTP REQUEST\r\n\r\n")
        data = read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 400 ")
    assert b"connection: close" in data


def test_client_connection_close(up: ThreadedFakeUpstream) -> None:
    with connect(up) as sock:
        sock.sendall(request("/v1/models", method="GET", headers={"connection": "close"}))
        data = read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 200 ") and b"connection: close" in data


# ------------------------------------------------------------------ fault headers


def test_fake_status_with_body(up: ThreadedFakeUpstream) -> None:
    resp = roundtrip(up, request("/v1/chat/completions", chat(),
                                 headers={"x-fake-status": "418", "x-fake-body": '{"teapot":1}'}))
    assert (resp.status, resp.body) == (418, b'{"teapot":1}')
    plain = roundtrip(up, request("/v1/chat/completions", chat(), headers={"x-fake-status": "503"}))
    assert plain.status == 503 and json.loads(plain.body)["error"]["type"] == "server_error"
    anth = roundtrip(up, request("/v1/messages", {}, headers={"x-fake-status": "401"}))
    assert json.loads(anth.body) == {"type": "error", "error": {
        "type": "authentication_error", "message": "fake upstream error (status 401)"}}
    empty = roundtrip(up, request("/v1/models", method="GET", headers={"x-fake-status": "204"}))
    assert (empty.status, empty.body) == (204, b"")


def test_fake_delay(up: ThreadedFakeUpstream) -> None:
    started = time.monotonic()
    resp = roundtrip(up, request("/v1/chat/completions", chat(), headers={"x-fake-delay": "0.2"}))
    assert resp.status == 200
    assert time.monotonic() - started >= 0.2


def test_fake_event_delay_spaces_events(up: ThreadedFakeUpstream) -> None:
    with connect(up) as sock:
        sock.sendall(request("/v1/chat/completions", chat(stream=True),
                             headers={"x-fake-event-delay": "0.05", "x-fake-events": "3"}))
        started = time.monotonic()
        first = sock.recv(65536)
        first_at = time.monotonic() - started
        rest = read_until_closed_or_done(sock)
    total = time.monotonic() - started
    assert first.startswith(b"HTTP/1.1 200 ")
    assert b"[DONE]" not in first  # the stream did not arrive in one piece
    # 1 role + 3 content + 1 finish events, 4 gaps between them
    assert total >= 4 * 0.05
    assert first_at < total
    assert (first + rest).count(b"data: ") == 6


def read_until_closed_or_done(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"0\r\n\r\n"):
        piece = sock.recv(65536)
        if not piece:
            break
        data += piece
    return data


def test_fake_reset_after(up: ThreadedFakeUpstream) -> None:
    full = roundtrip(up, request("/v1/chat/completions", chat()))
    with connect(up) as sock:
        sock.sendall(request("/v1/chat/completions", chat(),
                             headers={"x-fake-reset-after": "10"}))
        data = b""
        with pytest.raises(ConnectionResetError):
            for _ in range(100):
                piece = sock.recv(65536)
                if not piece:
                    break
                data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    assert f"content-length: {len(full.body)}".encode() in head
    assert body == full.body[:10]


def test_fake_reset_mid_stream(up: ThreadedFakeUpstream) -> None:
    with connect(up) as sock:
        sock.sendall(request("/v1/chat/completions", chat(stream=True),
                             headers={"x-fake-reset-after": "300"}))
        data = b""
        with pytest.raises(ConnectionResetError):
            for _ in range(100):
                piece = sock.recv(65536)
                if not piece:
                    break
                data += piece
    assert len(data.partition(b"\r\n\r\n")[2]) == 300


def test_fake_truncate(up: ThreadedFakeUpstream) -> None:
    with connect(up) as sock:
        sock.sendall(request("/v1/chat/completions", chat(), headers={"x-fake-truncate": "1"}))
        data = read_until_closed(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    declared = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
    assert declared == len(body) + 1024
    assert json.loads(body)["object"] == "chat.completion"

    with connect(up) as sock:
        sock.sendall(request("/v1/chat/completions", chat(stream=True),
                             headers={"x-fake-truncate": "1"}))
        stream = read_until_closed(sock)
    assert b"transfer-encoding: chunked" in stream
    assert not stream.endswith(b"0\r\n\r\n") and b"[DONE]" not in stream


def test_fake_silence(up: ThreadedFakeUpstream) -> None:
    up.reset_stats()
    with connect(up) as sock:
        sock.sendall(request("/v1/chat/completions", chat(), headers={"x-fake-silence": "1"})
                     + request("/v1/models", method="GET"))
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(100)
    assert len(up.requests) == 2  # both were read, neither answered


def test_stop_with_silent_connection_open() -> None:
    server = ThreadedFakeUpstream().start()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
    try:
        sock.sendall(request("/v1/models", method="GET", headers={"x-fake-silence": "1"}))
        wait_for(lambda: len(server.requests) == 1)
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < TIMEOUT
        assert sock.recv(100) == b""
    except ConnectionResetError:
        pass  # aborted: also a valid way to learn the server went away
    finally:
        sock.close()
        server.stop()


def test_fake_garbage(up: ThreadedFakeUpstream) -> None:
    with connect(up) as sock:
        sock.sendall(request("/v1/chat/completions", chat(), headers={"x-fake-garbage": "1"}))
        data = read_until_closed(sock)
    assert data and not data.startswith(b"HTTP/")
    parser = httptools.HttpResponseParser(ResponseReader(sock))
    with pytest.raises(httptools.HttpParserError):
        parser.feed_data(data)


def test_fake_close(up: ThreadedFakeUpstream) -> None:
    with connect(up) as sock:
        sock.sendall(request("/v1/chat/completions", chat(), headers={"x-fake-close": "1"})
                     + request("/v1/models", method="GET"))
        data = read_until_closed(sock)
    assert data.count(b"HTTP/1.1 ") == 1  # the pipelined second request is dropped
    assert b"connection: close" in data


@pytest.mark.parametrize("size", [0, 5, 10, 100_003])
@pytest.mark.parametrize("chunked", [False, True])
def test_fake_body_bytes_exact(up: ThreadedFakeUpstream, size: int, chunked: bool) -> None:
    headers = {"x-fake-body-bytes": str(size), "x-fake-chunked": "1" if chunked else "0"}
    with connect(up) as sock:
        sock.sendall(request("/v1/chat/completions", chat(), headers=headers)
                     + request("/v1/models", method="GET"))
        first, second = ResponseReader(sock).read(2)
    assert len(first.body) == size
    assert ("transfer-encoding" in first.headers) == chunked
    if size >= 10:
        assert json.loads(first.body)["pad"] == "a" * (size - 10)
    assert second.status == 200  # the connection stays usable


@pytest.mark.parametrize("use_uvloop", [False, True], ids=["asyncio", "uvloop"])
def test_large_body_slow_reader_stays_bounded(use_uvloop: bool) -> None:
    size = 200 * 1024 * 1024
    tracemalloc.start()
    try:
        with ThreadedFakeUpstream(use_uvloop=use_uvloop) as server:
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
            with sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
                sock.sendall(request("/v1/models", method="GET",
                                     headers={"x-fake-body-bytes": str(size)}))
                buf = bytearray(1 << 20)
                view = memoryview(buf)
                received = sock.recv_into(view)
                time.sleep(0.3)  # a stalled reader: the server must stop, not buffer
                (conn,) = server.upstream._connections
                buffered = conn._transport.get_write_buffer_size()
                assert buffered <= 1024 * 1024
                assert tracemalloc.get_traced_memory()[1] < 32 * 1024 * 1024
                deadline = time.monotonic() + 60
                head_len = bytes(buf[:received]).index(b"\r\n\r\n") + 4
                total = received - head_len
                while total < size and time.monotonic() < deadline:
                    n = sock.recv_into(view)
                    if not n:
                        break
                    total += n
                assert total == size
        assert tracemalloc.get_traced_memory()[1] < 32 * 1024 * 1024
    finally:
        tracemalloc.stop()


# ------------------------------------------------------------------ lifecycle


def test_stats_and_reset(up: ThreadedFakeUpstream) -> None:
    roundtrip(up, request("/v1/models", method="GET"))
    roundtrip(up, request("/v1/models?limit=2", method="GET"))
    assert up.connections_opened >= 2
    assert up.requests[-1].path == "/v1/models?limit=2"
    wait_for(lambda: up.active_connections == 0)
    up.reset_stats()
    assert (up.requests, up.connections_opened) == ([], 0)
    with connect(up) as sock:
        wait_for(lambda: up.active_connections == 1)
        sock.sendall(request("/v1/models", method="GET"))
        ResponseReader(sock).read()
    wait_for(lambda: up.active_connections == 0)
    assert up.connections_opened == 1


@pytest.mark.parametrize("use_uvloop", [False, True], ids=["asyncio", "uvloop"])
def test_async_api_on_both_loops(use_uvloop: bool) -> None:
    async def scenario() -> tuple[int, int, bytes]:
        async with FakeUpstream(record=False) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(request("/v1/chat/completions", chat()))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
            length = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
            body = await asyncio.wait_for(reader.readexactly(length), TIMEOUT)
            writer.close()
            return server.connections_opened, len(server.requests), body

    factory = uvloop.new_event_loop if use_uvloop else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        opened, recorded, body = runner.run(scenario())
    assert (opened, recorded) == (1, 0)  # record=False keeps no log
    assert json.loads(body)["choices"][0]["message"]["content"] == REPLY


def test_threaded_start_failure_is_reported(up: ThreadedFakeUpstream) -> None:
    clash = ThreadedFakeUpstream(port=up.port, timeout=2.0)
    with pytest.raises(RuntimeError) as failed:
        clash.start()
    assert isinstance(failed.value.__cause__, OSError)
    clash.stop()


def test_cli_serves_until_sigterm() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(
        [sys.executable, "-m", "relay.testing.fake_upstream", "--host", "127.0.0.1",
         "--port", "0", "--loop", "asyncio"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    ) as proc:
        _check_cli(proc)


def _check_cli(proc: subprocess.Popen[bytes]) -> None:
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        assert ready, "no start line"
        line = proc.stdout.readline().decode()
        url = line.split()[-1]
        assert url.startswith("http://127.0.0.1:")
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
            sock.sendall(request("/v1/models", method="GET"))
            assert ResponseReader(sock).read()[0].status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert proc.stderr is not None and b"Warning" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)


def test_base64_embedding_matches_float_layout(up: ThreadedFakeUpstream) -> None:
    body = {"model": "e", "input": "x y", "dimensions": 3}
    floats = json.loads(roundtrip(up, request("/v1/embeddings", body)).body)
    encoded = json.loads(roundtrip(up, request("/v1/embeddings",
                                               {**body, "encoding_format": "base64"})).body)
    raw = base64.b64decode(encoded["data"][0]["embedding"])
    assert list(struct.unpack("<3f", raw)) == floats["data"][0]["embedding"]


# ------------------------------------------------------------------ provider-like behaviours


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
def test_fake_encoding_compresses_json_and_streams_even_for_identity(
    up: ThreadedFakeUpstream, coding: str,
) -> None:
    import zlib

    wbits = 31 if coding == "gzip" else 15
    plain = roundtrip(up, request("/v1/chat/completions", chat()))
    packed = roundtrip(up, request("/v1/chat/completions", chat(), headers={
        "accept-encoding": "identity", "x-fake-encoding": coding}))
    assert packed.headers["content-encoding"] == coding
    assert int(packed.headers["content-length"]) == len(packed.body)
    assert zlib.decompress(packed.body, wbits) == plain.body

    plain_stream = roundtrip(up, request("/v1/chat/completions", chat(stream=True)))
    stream = roundtrip(up, request("/v1/chat/completions", chat(stream=True), headers={
        "x-fake-encoding": coding}))
    assert stream.headers["content-encoding"] == coding
    assert stream.headers["transfer-encoding"] == "chunked"
    # One chunk per event, each decodable as it arrives (sync flush).
    z = zlib.decompressobj(wbits)
    decoded = [z.decompress(c) for c in stream.chunks]
    assert all(d.endswith(b"\n\n") for d in decoded)
    assert b"".join(decoded) == plain_stream.body and z.eof


def test_fake_br_label_and_bad_encoding(up: ThreadedFakeUpstream) -> None:
    labelled = roundtrip(up, request("/v1/chat/completions", chat(),
                                     headers={"x-fake-encoding": "br"}))
    assert labelled.headers["content-encoding"] == "br"
    assert json.loads(labelled.body)["object"] == "chat.completion"  # a label only
    bad = roundtrip(up, request("/v1/chat/completions", chat(),
                                headers={"x-fake-encoding": "lzma"}))
    assert bad.status == 400 and b"x-fake-encoding" in bad.body


def test_fake_set_cookie_and_close_delimited(up: ThreadedFakeUpstream) -> None:
    with connect(up) as sock:
        sock.sendall(request("/v1/chat/completions", chat(), headers={
            "x-fake-set-cookie": "session=abc; Path=/", "x-fake-close-delimited": "1"}))
        data = read_until_closed(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"set-cookie: session=abc; Path=/\r\n" in head + b"\r\n"
    assert b"content-length" not in head and b"transfer-encoding" not in head
    assert b"connection: close" in head
    assert json.loads(body)["usage"]["completion_tokens"] == 5


def test_fake_close_delimited_reset(up: ThreadedFakeUpstream) -> None:
    with connect(up) as sock:
        sock.sendall(request("/v1/chat/completions", chat(), headers={
            "x-fake-close-delimited": "1", "x-fake-reset-after": "20"}))
        data = b""
        with pytest.raises(ConnectionResetError):
            for _ in range(100):
                piece = sock.recv(65536)
                if not piece:
                    break
                data += piece
    assert len(data.partition(b"\r\n\r\n")[2]) == 20


def test_responses_api_json_and_stream(oai: openai.OpenAI) -> None:
    faults = {"x-fake-cached-tokens": "4", "x-fake-reasoning-tokens": "7"}
    answer = oai.responses.create(model="gpt-4o", input=PROMPT, extra_headers=faults)
    assert answer.output_text == REPLY and answer.status == "completed"
    assert answer.usage is not None
    assert (answer.usage.input_tokens, answer.usage.output_tokens) == (3 + 4, 5 + 7)
    assert answer.usage.input_tokens_details.cached_tokens == 4
    assert answer.usage.output_tokens_details.reasoning_tokens == 7
    events = list(oai.responses.create(model="gpt-4o", input=PROMPT, stream=True,
                                       extra_headers=faults))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == REPLY
    final = events[-1]
    assert final.type == "response.completed"
    assert final.response.usage == answer.usage
    assert events[0].type == "response.created" and events[0].response.usage is None


def test_chat_reasoning_tokens_and_usage_on_last_chunk(oai: openai.OpenAI) -> None:
    chunks = list(oai.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True},
        extra_headers={"x-fake-reasoning-tokens": "12", "x-fake-usage-on-last-chunk": "1"}))
    last = chunks[-1]
    assert last.choices[0].finish_reason == "stop"
    assert last.usage is not None and last.usage.completion_tokens == 5 + 12
    assert last.usage.completion_tokens_details is not None
    assert last.usage.completion_tokens_details.reasoning_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


def test_anthropic_cache_write_tokens(ant: anthropic.Anthropic) -> None:
    faults = {"x-fake-cache-write-tokens": "100", "x-fake-cached-tokens": "20"}
    message = ant.messages.create(model="claude-sonnet-4-5", max_tokens=64, messages=MESSAGES,
                                  extra_headers=faults)
    usage = message.usage
    assert (usage.input_tokens, usage.cache_creation_input_tokens,
            usage.cache_read_input_tokens, usage.output_tokens) == (3, 100, 20, 5)
    with ant.messages.stream(model="claude-sonnet-4-5", max_tokens=64, messages=MESSAGES,
                             extra_headers=faults) as stream:
        final = stream.get_final_message()
    assert final.usage.cache_creation_input_tokens == 100
    assert final.usage.cache_read_input_tokens == 20 and final.usage.output_tokens == 5
