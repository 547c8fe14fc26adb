from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.http.sse import SSESplitter, event_fields


def split_all(data: bytes, cuts: list[int]) -> tuple[list[bytes], bytes]:
    splitter = SSESplitter()
    events: list[bytes] = []
    last = 0
    for cut in sorted(set(cuts)):
        events += splitter.feed(data[last:cut])
        last = cut
    events += splitter.feed(data[last:])
    return events, splitter.flush()


def reference_events(data: bytes) -> tuple[list[bytes], bytes]:
    """A slow, obviously-correct splitter: walk line by line."""
    events: list[bytes] = []
    lines = re.findall(rb"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+$", data)
    current = b""
    for line in lines:
        current += line
        if line in (b"\n", b"\r", b"\r\n"):
            events.append(current)
            current = b""
    # A trailing "\r" may still become "\r\n": the splitter holds such an event.
    if events and events[-1].endswith(b"\r") and not current and data.endswith(b"\r"):
        current = events.pop()
    return events, current


def test_lf_events_one_chunk() -> None:
    data = b'data: {"a":1}\n\ndata: {"b":2}\n\ndata: [DO'
    events, rest = split_all(data, [])
    assert events == [b'data: {"a":1}\n\n', b'data: {"b":2}\n\n']
    assert rest == b"data: [DO"


def test_crlf_and_cr_events() -> None:
    data = b"event: a\r\ndata: 1\r\n\r\nevent: b\rdata: 2\r\rdata: 3\n\r\n"
    events, rest = split_all(data, [])
    assert events == [
        b"event: a\r\ndata: 1\r\n\r\n",
        b"event: b\rdata: 2\r\r",
        b"data: 3\n\r\n",
    ]
    assert rest == b""


def test_crlf_split_between_cr_and_lf() -> None:
    splitter = SSESplitter()
    assert splitter.feed(b"data: 1\r\n\r") == []  # "\r" may be the start of "\r\n"
    assert splitter.pending == len(b"data: 1\r\n\r")
    assert splitter.feed(b"\ndata: 2\r\n\r\n") == [b"data: 1\r\n\r\n", b"data: 2\r\n\r\n"]
    assert splitter.flush() == b""


def test_cr_line_is_not_a_blank_line_with_following_lf() -> None:
    # "x\r\n" is one line end, not "\r" then an empty "\n" line.
    splitter = SSESplitter()
    assert splitter.feed(b"data: x\r") == []
    assert splitter.feed(b"\n") == []
    assert splitter.feed(b"data: y\r\n") == []
    assert splitter.feed(b"\r\n") == [b"data: x\r\ndata: y\r\n\r\n"]


def test_leading_blank_line_is_its_own_event() -> None:
    events, rest = split_all(b"\ndata: a\n\n\r\ndata: b\n\n", [])
    assert events == [b"\n", b"data: a\n\n", b"\r\n", b"data: b\n\n"]
    assert rest == b""


def test_lone_cr_after_event_waits_for_more() -> None:
    splitter = SSESplitter()
    assert splitter.feed(b"data: a\n\n\r") == [b"data: a\n\n"]
    assert splitter.feed(b"x") == [b"\r"]
    assert splitter.flush() == b"x"


def test_flush_resets() -> None:
    splitter = SSESplitter()
    splitter.feed(b"data: partial")
    assert splitter.flush() == b"data: partial"
    assert splitter.feed(b"data: next\n\n") == [b"data: next\n\n"]


def test_byte_by_byte_matches_one_chunk() -> None:
    data = b"data: a\r\n\r\n: comment\ndata: b\n\n\r\r\ndata: c\r\r" * 3
    whole = split_all(data, [])
    bytewise = split_all(data, list(range(len(data))))
    assert whole == bytewise
    assert b"".join(whole[0]) + whole[1] == data


_pieces = st.lists(
    st.sampled_from(
        [
            b"data: x",
            b"event: e",
            b":c",
            b"data:",
            b"\n",
            b"\r",
            b"\r\n",
            b"\n\n",
            b"\r\r",
            b"\r\n\r\n",
            b"a",
            b"{}",
            b" ",
        ]
    ),
    max_size=40,
).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(data=_pieces, cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=20))
def test_any_chunking_preserves_bytes_and_boundaries(data: bytes, cuts: list[int]) -> None:
    events, rest = split_all(data, [c for c in cuts if c <= len(data)])
    assert b"".join(events) + rest == data
    assert (events, rest) == reference_events(data)
    for event in events:
        assert event.endswith((b"\n", b"\r"))


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200), cuts=st.lists(st.integers(0, 200), max_size=30))
def test_arbitrary_bytes_roundtrip(data: bytes, cuts: list[int]) -> None:
    events, rest = split_all(data, [c for c in cuts if c <= len(data)])
    assert b"".join(events) + rest == data
    assert (events, rest) == reference_events(data)


def test_event_fields_common_shape() -> None:
    assert event_fields(b'data: {"a":1}\n\n') == (None, b'{"a":1}')
    assert event_fields(b"data: [DONE]\n\n") == (None, b"[DONE]")


def test_event_fields_named_and_multiline() -> None:
    raw = b'event: message_start\r\ndata: {"x":\r\ndata:1}\r\n: note\r\nid: 7\r\n\r\n'
    assert event_fields(raw) == (b"message_start", b'{"x":\n1}')


def test_event_fields_without_data() -> None:
    assert event_fields(b": keep-alive\n\n") == (None, None)
    assert event_fields(b"\n") == (None, None)
    assert event_fields(b"event: ping\n\n") == (b"ping", None)


def test_event_fields_data_without_space() -> None:
    assert event_fields(b"data:x\ndata:  y\n\n") == (None, b"x\n y")


def test_a_read_of_exactly_one_event_is_returned_uncopied() -> None:
    splitter = SSESplitter()
    event = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
    assert splitter.feed(event)[0] is event
    # Not taken for one event: a part, two events, a blank line, CR line ends.
    assert splitter.feed(b"data: a\n") == []
    assert splitter.feed(b"\n") == [b"data: a\n\n"]
    assert splitter.feed(b"data: a\n\ndata: b\n\n") == [b"data: a\n\n", b"data: b\n\n"]
    assert splitter.feed(b"\n\n") == [b"\n", b"\n"]
    crlf = b"data: c\r\n\r\n"
    assert splitter.feed(crlf) == [crlf]
    assert splitter.feed(b"data: d\n\n") == [b"data: d\n\n"]  # the CR path from now on
    assert splitter.pending == 0


def spans_all(data: bytes, cuts: list[int]) -> tuple[list[bytes], bytes, list[int]]:
    splitter = SSESplitter()
    spans: list[bytes] = []
    pending: list[int] = []
    last = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        spans.append(splitter.feed_span(data[last:cut]))
        pending.append(splitter.pending)
        last = cut
    return spans, splitter.flush(), pending


@settings(max_examples=400, deadline=None)
@given(data=_pieces, cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=20))
def test_spans_cut_where_events_do(data: bytes, cuts: list[int]) -> None:
    """feed_span hands back, per read, exactly the events feed would."""
    cuts = [c for c in cuts if c <= len(data)]
    spans, rest, pending = spans_all(data, cuts)
    splitter = SSESplitter()
    last = 0
    for cut, span, held in zip([*sorted(set(cuts)), len(data)], spans, pending, strict=True):
        assert span == b"".join(splitter.feed(data[last:cut]))
        assert type(span) is bytes and held == splitter.pending
        last = cut
    assert rest == splitter.flush()
    assert b"".join(spans) + rest == data


def test_a_read_that_ends_an_event_is_forwarded_uncopied() -> None:
    splitter = SSESplitter()
    two = b"data: a\n\ndata: b\n\n"
    assert splitter.feed_span(two) is two
    assert splitter.feed_span(b"data: c\n\ndata: d") == b"data: c\n\n"
    assert splitter.pending == len(b"data: d")
    assert splitter.feed_span(b"\n\n") == b"data: d\n\n"
    assert splitter.pending == 0
    assert splitter.feed_span(b"") == b""
