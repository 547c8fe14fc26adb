"""A streamed response's text chunks are accounted, stripped and forwarded a
read at a time; the client and the usage must come out exactly as when every
event is handled on its own.

Both ways run the same exchange code: the bulk one is what a read goes
through (``on_body``), the reference feeds the same reads to the per-event
step after the splitter cut them. Every check runs on both twins of the
exchange (the pure source and the compiled one).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.accounting.usage import StreamUsage
from relay.http.sse import SSESplitter
from relay.upstream import _exchange_py
from relay.upstream._exchange_py import Outcome, ProxyExchange
from tests.support import compiled_twin_or_skip


def _text(word: bytes) -> bytes:
    return (
        b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,'
        b'"delta":{"content":"' + word + b'"}}],"usage":null}\n\n'
    )


USAGE_CHUNK = (
    b'data: {"id":"c","object":"chat.completion.chunk","choices":[],'
    b'"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}\n\n'
)
_EVENTS = st.lists(
    st.one_of(
        st.sampled_from([b"one", b"two words", b'a \\"quote\\"', b"usage", b""]).map(_text),
        st.sampled_from(
            [
                # "usage" as a value, not a key: no tail to strip
                b'data: {"choices":[{"delta":{"content":"x"}}],"note":"usage"}\n\n',
                # the null usage first, not last
                b'data: {"usage":null,"choices":[{"delta":{"content":"y"}}]}\n\n',
                b'data: {"choices":[{"delta":{"content":"z"}}], "usage": null}\n\n',
                b"\n",  # a blank line of its own
                b"data: one line\ndata: and another,\"usage\":null}\n\n",
                b": comment\n\n",
                # a named event repeating the text: never kept as text
                b'event: response.output_text.done\ndata: {"text":"whole"}\n\n',
                b"data: [DONE]\n\n",
                USAGE_CHUNK,
            ]
        ),
    ),
    max_size=30,
)


class _Client:
    """What an exchange writes to, kept in order."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.on_lost: object = None

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def write_many(self, chunks: list[bytes]) -> None:
        self.out.extend(chunks)

    def hold(self) -> None:
        pass

    def release(self) -> None:
        pass


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module", params=["pure", "compiled"])
def twin(request: pytest.FixtureRequest) -> ModuleType:
    """Each twin of the exchange in turn."""
    if request.param == "pure":
        return _exchange_py
    return compiled_twin_or_skip("relay.upstream._exchange_c")


def _exchange(
    twin: ModuleType, loop: asyncio.AbstractEventLoop, strip: bool
) -> tuple[ProxyExchange, _Client]:
    client = _Client()
    exchange: ProxyExchange = twin.ProxyExchange(
        client,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        lambda conn: None,
        [],
        record_limit=1 << 20,
        json_limit=0,
        strip_usage=strip,
        count_usage=True,
        observer=None,
        loop=loop,
    )
    exchange.recorded = []
    exchange.splitter = SSESplitter()
    exchange.stream_usage = StreamUsage("gpt-4o", "openai")
    return exchange, client


def _reads(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@settings(max_examples=300, deadline=None)
@given(events=_EVENTS, cuts=st.lists(st.integers(0, 4000), max_size=12), strip=st.booleans())
def test_reads_in_bulk_equal_events_one_by_one(
    twin: ModuleType,
    loop: asyncio.AbstractEventLoop,
    events: list[bytes],
    cuts: list[int],
    strip: bool,
) -> None:
    data = b"".join(events)
    bulk, bulk_client = _exchange(twin, loop, strip)
    each, each_client = _exchange(twin, loop, strip)
    for read in _reads(data, cuts):
        bulk._relay_stream(read)
        assert each.splitter is not None
        cut = each.splitter.feed(read)
        if cut:
            each._relay_events(cut)
    assert b"".join(bulk_client.out) == b"".join(each_client.out)
    assert b"".join(bulk.recorded or []) == b"".join(each.recorded or [])
    assert bulk.bytes_sent == each.bytes_sent
    assert bulk.stream_usage is not None and each.stream_usage is not None
    assert bulk.stream_usage.streamed_text() == each.stream_usage.streamed_text()
    assert bulk.stream_usage.result() == each.stream_usage.result()
    assert bulk.stream_usage.has_usage == each.stream_usage.has_usage
    bulk._settle(Outcome.OK)
    each._settle(Outcome.OK)


def test_a_read_of_text_chunks_leaves_in_one_write(
    twin: ModuleType, loop: asyncio.AbstractEventLoop
) -> None:
    exchange, client = _exchange(twin, loop, strip=True)
    exchange._relay_stream(_text(b"first"))  # the first event leaves on its own
    assert client.out == [_text(b"first")[: -len(b',"usage":null}\n\n')] + b"}\n\n"]
    client.out.clear()
    read = b"".join(_text(b"w%d" % i) for i in range(50)) + USAGE_CHUNK + b"data: [DONE]\n\n"
    exchange._relay_stream(read)
    # The text chunks in one write, [DONE] on its own; the usage chunk relay
    # asked for is gone and no chunk names usage any more.
    assert len(client.out) == 2
    assert client.out[1] == b"data: [DONE]\n\n"
    assert b"usage" not in client.out[0]
    assert client.out[0].count(b"\n\n") == 50
    assert exchange.stream_usage is not None and exchange.stream_usage.has_usage
    exchange._settle(Outcome.OK)
