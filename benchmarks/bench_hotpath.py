"""Micro-benchmarks of the per-request hot path around relay._fast.

* request head handling: what one typical SDK request costs on the client
  side, from bytes to a ready :class:`~relay.http.request.Request`, against
  httptools alone (the C parser with do-nothing callbacks) as the floor;
* the per-request decisions (credential hash, cache key, rate-limit bucket,
  breaker), compiled vs pure twins (``fast_impl`` from conftest.py);
* SSE splitting of a 200-event chat stream, as one read per event and as
  16 KiB reads;
* usage parsing: a JSON completion, a whole stream through StreamUsage, and
  the include_usage rewrite of a streaming request.

Run with ``python -m benchmarks.run --micro`` (or ``pytest benchmarks``).
The parts without a compiled twin run once; their numbers show what pure
Python costs per request, next to the twins' numbers.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httptools
import pytest
import uvloop

import relay._fast as fast
from relay.accounting.usage import StreamUsage, inject_include_usage, usage_from_json
from relay.http.protocol import ClientConnection, ConnectionLimits, ConnState
from relay.http.request import Request
from relay.http.sse import SSESplitter

# --------------------------------------------------------------------- data

CHAT_BODY = json.dumps(
    {
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "In two sentences, why should an API gateway keep "
                                        "its upstream connections alive?"},
        ],
        "temperature": 0.2,
        "max_tokens": 120,
    },
    separators=(",", ":"),
).encode()

# The head the official openai Python SDK sends (values of this shape).
SDK_HEAD = (
    b"POST /v1/chat/completions HTTP/1.1\r\n"
    b"Host: 127.0.0.1:8080\r\n"
    b"Accept-Encoding: gzip, deflate\r\n"
    b"Connection: keep-alive\r\n"
    b"Accept: application/json\r\n"
    b"Content-Type: application/json\r\n"
    b"User-Agent: OpenAI/Python 1.59.7\r\n"
    b"X-Stainless-Lang: python\r\n"
    b"X-Stainless-Package-Version: 1.59.7\r\n"
    b"X-Stainless-OS: Linux\r\n"
    b"X-Stainless-Arch: x64\r\n"
    b"X-Stainless-Runtime: CPython\r\n"
    b"X-Stainless-Runtime-Version: 3.11.7\r\n"
    b"Authorization: Bearer sk-proj-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJ\r\n"
    b"X-Stainless-Async: false\r\n"
    b"X-Stainless-Retry-Count: 0\r\n"
    b"X-Stainless-Read-Timeout: 600\r\n"
    b"Content-Length: %d\r\n\r\n" % len(CHAT_BODY)
)
SDK_REQUEST = SDK_HEAD + CHAT_BODY

COMPLETION = (
    b'{"id":"chatcmpl-bench0000000000000000000000","object":"chat.completion","created":1735689600,'
    b'"model":"gpt-4o-2024-08-06","choices":[{"index":0,"message":{"role":"assistant","content":'
    b'"Reusing skips the handshakes.","refusal":null},"logprobs":null,"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":38,"completion_tokens":21,"total_tokens":59,"prompt_tokens_details":'
    b'{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,'
    b'"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},'
    b'"service_tier":"default","system_fingerprint":"fp_bench"}'
)


def _chunk(delta: str, finish: str | None = None, usage: bool = False) -> bytes:
    doc: dict[str, object] = {
        "id": "chatcmpl-bench0000000000000000000000",
        "object": "chat.completion.chunk",
        "created": 1735689600,
        "model": "gpt-4o-2024-08-06",
        "system_fingerprint": "fp_bench",
        "choices": [] if usage else [
            {"index": 0, "delta": json.loads(delta), "logprobs": None, "finish_reason": finish}
        ],
        "usage": {"prompt_tokens": 38, "completion_tokens": 200, "total_tokens": 238}
        if usage else None,
    }
    return b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"


# A streamed chat completion with 200 content events, as OpenAI sends it
# when stream_options.include_usage is set.
STREAM_EVENTS = (
    [_chunk('{"role":"assistant","content":"","refusal":null}')]
    + [_chunk(json.dumps({"content": f" word{i}"})) for i in range(200)]
    + [_chunk("{}", finish="stop"), _chunk("{}", usage=True), b"data: [DONE]\n\n"]
)
STREAM = b"".join(STREAM_EVENTS)
STREAM_16K = [STREAM[i : i + 16384] for i in range(0, len(STREAM), 16384)]


def test_data_shapes() -> None:
    """The inputs are what they claim to be (guards the numbers below)."""
    assert len(STREAM_EVENTS) == 204
    assert usage_from_json(COMPLETION) is not None
    assert 250 <= len(CHAT_BODY) <= 300


# ------------------------------------------------------------ request head


class _Transport(asyncio.Transport):
    """Just enough transport for a ClientConnection that is never answered."""

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 50000) if name == "peername" else default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        pass

    def writelines(self, list_of_data: object) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


class _HeadOnly(ClientConnection):
    """Parses and builds each request but dispatches nothing (no task, no answer)."""

    last: Request | None = None

    def _dispatch(self, request: Request) -> None:
        self.last = request


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    # Timers are armed per request on the loop relay runs on; it need not run.
    loop = uvloop.new_event_loop()
    yield loop
    loop.close()


async def _never(request: Request, client: ClientConnection) -> None:  # pragma: no cover
    raise AssertionError("dispatch is replaced")


@pytest.mark.benchmark(group="request head: SDK chat request, bytes to Request")
def test_head_relay_client_connection(benchmark, loop: asyncio.AbstractEventLoop) -> None:
    limits = ConnectionLimits(10 * 2**20, 65536, 10.0, 75.0)
    conn = _HeadOnly(_never, limits, set(), loop)
    conn.connection_made(_Transport())

    benchmark(conn.data_received, SDK_REQUEST)

    request = conn.last
    assert request is not None and request.body == CHAT_BODY
    assert request.authorization is not None and request.authorization.startswith(b"Bearer ")
    assert b"X-Stainless-Lang: python\r\n" in request.forward_headers
    assert b"Host:" not in request.forward_headers


async def _answer(request: Request, client: ClientConnection) -> None:
    client.respond(200, (b"Content-Type: application/json\r\n",), COMPLETION)


CYCLES = 1000


@pytest.mark.benchmark(group="client connection: open, one request answered, close (x1000)")
def test_client_connection_cycle(benchmark, loop: asyncio.AbstractEventLoop) -> None:
    """A connection's whole life with one request: accepted, parsed, its
    request task run and answered, lost. Every method relay's debug mode
    counts on the client side runs here (with debug off: unchanged)."""
    limits = ConnectionLimits(10 * 2**20, 65536, 10.0, 75.0)
    registry: set[ClientConnection] = set()
    transport = _Transport()

    async def cycles() -> int:
        served = 0
        for _ in range(CYCLES):
            conn = ClientConnection(_answer, limits, registry, loop)
            conn.connection_made(transport)
            conn.data_received(SDK_REQUEST)
            await asyncio.sleep(0)  # the request task runs and answers
            served += conn.state is ConnState.IDLE
            conn.connection_lost(None)
        return served

    served = benchmark(lambda: loop.run_until_complete(cycles()))
    assert served == CYCLES and not registry


class _Floor:
    """httptools callbacks that keep what relay keeps, and nothing else."""

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.url = b""

    def on_message_begin(self) -> None:
        self.headers = []

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body = body


@pytest.mark.benchmark(group="request head: SDK chat request, bytes to Request")
def test_head_httptools_floor(benchmark) -> None:
    floor = _Floor()
    parser = httptools.HttpRequestParser(floor)

    benchmark(parser.feed_data, SDK_REQUEST)

    assert floor.body == CHAT_BODY and len(floor.headers) == 17


# ------------------------------------------------------ per-request decisions


@pytest.mark.benchmark(group="decisions: credential hash + cache key + bucket + breaker")
def test_request_decisions(benchmark, fast_impl: fast.Implementation) -> None:
    """What the pipeline asks relay._fast for on every cache miss."""
    table = fast_impl.BucketTable(1e9, 1e9)
    breaker = fast_impl.CircuitBreaker(5, 30.0)
    credential = b"Bearer sk-proj-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJ"
    target = b"/v1/chat/completions"
    now = 1000.0

    def decide() -> bytes:
        scope = fast_impl.credential_hash(credential)
        table.acquire(scope, now)
        breaker.allow(now)
        key = fast_impl.cache_key(b"POST", target, CHAT_BODY, scope)
        breaker.record_success()
        return key

    key = benchmark(decide)
    assert key == fast.pure.cache_key(b"POST", target, CHAT_BODY, fast.pure.credential_hash(credential))


# ------------------------------------------------------------- SSE splitting


@pytest.mark.benchmark(group="SSE: split a 200-event chat stream")
def test_sse_split_one_read_per_event(benchmark) -> None:
    def split() -> int:
        splitter = SSESplitter()
        n = 0
        for event in STREAM_EVENTS:
            n += len(splitter.feed(event))
        return n

    assert benchmark(split) == len(STREAM_EVENTS)


@pytest.mark.benchmark(group="SSE: split a 200-event chat stream")
def test_sse_split_16k_reads(benchmark) -> None:
    def split() -> int:
        splitter = SSESplitter()
        n = 0
        for chunk in STREAM_16K:
            n += len(splitter.feed(chunk))
        return n

    assert benchmark(split) == len(STREAM_EVENTS)


# ------------------------------------------------------------- usage parsing


@pytest.mark.benchmark(group="usage: 590-byte JSON completion")
def test_usage_from_json(benchmark) -> None:
    usage = benchmark(usage_from_json, COMPLETION)
    assert usage is not None and usage.prompt_tokens == 38 and usage.completion_tokens == 21


@pytest.mark.benchmark(group="usage: 200-event stream through StreamUsage")
def test_stream_usage(benchmark) -> None:
    def account() -> int:
        usage = StreamUsage("gpt-4o")
        dropped = 0
        for event in STREAM_EVENTS:
            dropped += usage.on_event(event)
        assert usage.result().completion_tokens == 200
        return dropped

    assert benchmark(account) == 1  # the usage-only chunk


@pytest.mark.benchmark(group="usage: include_usage rewrite of a streaming request")
def test_inject_include_usage(benchmark) -> None:
    body = CHAT_BODY[:-1] + b',"stream":true}'
    rewritten = benchmark(inject_include_usage, body)
    assert rewritten is not None and json.loads(rewritten)["stream_options"]["include_usage"] is True
