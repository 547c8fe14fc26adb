"""Request and response heads: what each twin finds, and twin agreement.

relay/_fast/_heads_py.py defines the results; the compiled twin must return
equal ones for every header list.
"""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import relay._fast as fast
from relay._fast import _heads_py
from tests.support import compiled_or_skip


@pytest.fixture(scope="module", params=["pure", "compiled"])
def impl(request: pytest.FixtureRequest) -> fast.Implementation:
    if request.param == "pure":
        return fast.pure
    return compiled_or_skip()



SDK_HEADERS = [
    (b"Host", b"127.0.0.1:8080"),
    (b"Accept-Encoding", b"gzip, deflate"),
    (b"Connection", b"keep-alive"),
    (b"Content-Type", b"application/json"),
    (b"Authorization", b"Bearer sk-1"),
    (b"X-Stainless-Lang", b"python"),
    (b"Cache-Control", b"No-Cache"),
    (b"Anthropic-Version", b" 2023-06-01 "),
    (b"x-api-key", b"k2"),
    (b"Api-Key", b"k3"),
    (b"X-Forwarded-For", b"10.0.0.1"),
    (b"Content-Length", b"42"),
]


def test_request_head_sdk_request(impl: fast.Implementation) -> None:
    (problem, forward, credentials, authorization, api_key, cache_control, length,
     chunked, host_seen, forwarded_for, varying, expect) = impl.request_head(SDK_HEADERS)
    assert problem == _heads_py.HEAD_OK
    assert forward == (
        b"Content-Type: application/json\r\nX-Stainless-Lang: python\r\n"
        b"Cache-Control: No-Cache\r\nAnthropic-Version:  2023-06-01 \r\n"
    )
    assert credentials == b"Authorization: Bearer sk-1\r\nx-api-key: k2\r\nApi-Key: k3\r\n"
    assert (authorization, api_key, cache_control) == (b"Bearer sk-1", b"k2", b"no-cache")
    assert (length, chunked, host_seen, forwarded_for) == (b"42", False, True, b"10.0.0.1")
    assert varying == [b"anthropic-version:2023-06-01"]
    assert expect is False


def test_request_head_connection_names_hop_by_hop_headers(impl: fast.Implementation) -> None:
    headers = [
        (b"X-Trace", b"1"),
        (b"Connection", b"close, X-Trace , x-other"),
        (b"X-Other", b"2"),
        (b"X-Kept", b"3"),
        (b"Authorization", b"a"),
    ]
    result = impl.request_head(headers)
    assert result[1] == b"X-Kept: 3\r\n"
    assert result[2] == b"Authorization: a\r\n"


@pytest.mark.parametrize(
    ("headers", "problem"),
    [
        ([(b"Transfer-Encoding", b"gzip, chunked")], _heads_py.BAD_TRANSFER_ENCODING),
        ([(b"Host", b"a"), (b"host", b"b")], _heads_py.DUPLICATE_HOST),
        ([(b"Expect", b"200-ok")], _heads_py.BAD_EXPECT),
        # The first problem in header order is the one reported.
        ([(b"Expect", b"x"), (b"Host", b"a"), (b"Host", b"b")], _heads_py.BAD_EXPECT),
    ],
)
def test_request_head_problems(impl: fast.Implementation, headers: list, problem: int) -> None:
    assert impl.request_head(headers)[0] == problem


def test_request_head_chunked_and_expect(impl: fast.Implementation) -> None:
    result = impl.request_head([(b"Transfer-Encoding", b" Chunked "), (b"Expect", b"100-Continue")])
    assert result[0] == _heads_py.HEAD_OK
    assert result[7] is True and result[11] is True


NGINX_HEADERS = [
    (b"Server", b"nginx/1.24.0"),
    (b"Date", b"Wed, 02 Dec 2026 00:00:00 GMT"),
    (b"Content-Type", b"Application/JSON"),
    (b"Content-Length", b"590"),
    (b"Connection", b"keep-alive"),
    (b"X-Relay-Cache", b"HIT"),
    (b"Content-Encoding", b"GZIP"),
]


def test_response_head_nginx_response(impl: fast.Implementation) -> None:
    kept, rendered, content_type, coding, length, chunked, per_caller = impl.response_head(
        NGINX_HEADERS
    )
    assert kept == tuple(NGINX_HEADERS[:3])
    assert rendered == (
        b"Server: nginx/1.24.0\r\nDate: Wed, 02 Dec 2026 00:00:00 GMT\r\n"
        b"Content-Type: Application/JSON\r\n"
    )
    assert (content_type, coding, length, chunked) == (b"application/json", b"gzip", b"590", False)
    assert per_caller is False


def test_response_head_connection_tokens(impl: fast.Implementation) -> None:
    headers = [
        (b"Close", b"x"),
        (b"X-Hop", b"1"),
        (b"Connection", b"x-hop"),
        (b"Connection", b"close"),  # only the last Connection header counts
        (b"Transfer-Encoding", b"chunked"),
        (b"Content-Encoding", b"identity"),
        (b"Content-Encoding", b"br"),
        (b"Content-Encoding", b"gzip"),
    ]
    kept, rendered, _, coding, length, chunked, _ = impl.response_head(headers)
    assert kept == ((b"X-Hop", b"1"),)
    assert rendered == b"X-Hop: 1\r\n"
    assert (coding, length, chunked) == (b"br, gzip", None, True)


def test_response_head_says_when_a_per_caller_header_is_kept(impl: fast.Implementation) -> None:
    cookie = [(b"Content-Type", b"application/json"), (b"Set-Cookie", b"session=1")]
    kept, rendered, *_, per_caller = impl.response_head(cookie)
    assert kept == tuple(cookie) and per_caller is True
    assert rendered == b"Content-Type: application/json\r\nSet-Cookie: session=1\r\n"
    for name in fast.PER_CALLER_HEADERS:
        assert impl.response_head([(name.upper(), b"x")])[-1] is True, name
    # Named in Connection, the cookie is dropped: nothing per caller is left.
    named = [*cookie, (b"Connection", b"set-cookie")]
    kept, *_, per_caller = impl.response_head(named)
    assert kept == tuple(cookie[:1]) and per_caller is False


def test_every_special_name_is_classed_alike() -> None:
    compiled = compiled_or_skip()
    heads_c = __import__("relay._fast._heads_c", fromlist=["x"])
    assert compiled.request_head is heads_c.request_head
    for name, kind in _heads_py.REQUEST_NAMES.items():
        for spelling in (name, name.upper(), name.title()):
            assert heads_c.request_class(spelling) == kind, spelling
    for name, kind in _heads_py.RESPONSE_NAMES.items():
        for spelling in (name, name.upper(), name.title()):
            assert heads_c.response_class(spelling) == kind, spelling


# Names drawn mostly from the ones relay acts on (any case), plus near misses.
_SPECIAL = sorted(set(_heads_py.REQUEST_NAMES) | set(_heads_py.RESPONSE_NAMES) | {b"close"})
_names = st.one_of(
    st.sampled_from(_SPECIAL).flatmap(
        lambda n: st.sampled_from([n, n.upper(), n.title(), n[:-1], n + b"s"])
    ),
    st.binary(min_size=1, max_size=24),
    st.sampled_from([b"X-Stainless-Lang", b"Content-Type", b"\xc3\x84uthorization"]),
)
_values = st.one_of(
    st.sampled_from(
        [b"chunked", b" Chunked", b"gzip, chunked", b"100-continue", b"keep-alive", b"close",
         b"close, x-hop", b"X-Stainless-Lang", b"gzip", b"identity", b"", b"12", b" br , "]
    ),
    st.binary(max_size=20),
)
_headers = st.lists(st.tuples(_names, _values), max_size=80)


@settings(max_examples=400, deadline=None)
@given(_headers)
@example([(b"connection", b"content-type"), (b"Content-Type", b"x")])
@example([(b"X-A", b"1")] * 70 + [(b"Connection", b"x-a")])
def test_twins_agree_on_request_heads(headers: list[tuple[bytes, bytes]]) -> None:
    assert compiled_or_skip().request_head(headers) == fast.pure.request_head(headers)


@settings(max_examples=400, deadline=None)
@given(_headers)
@example([(b"close", b"1"), (b"Connection", b"close")])
@example([(b"X-A", b"1")] * 70 + [(b"Content-Type", b"T")])
def test_twins_agree_on_response_heads(headers: list[tuple[bytes, bytes]]) -> None:
    assert compiled_or_skip().response_head(headers) == fast.pure.response_head(headers)


def test_twins_agree_on_unusual_input() -> None:
    """Not a list of (bytes, bytes) pairs: the compiled twin defers to the pure one."""
    compiled = compiled_or_skip()
    for headers in ([(bytearray(b"Host"), b"a")], ((b"Host", b"a"),), [[b"Host", b"a"]]):
        for name in ("request_head", "response_head"):
            try:
                expected = getattr(fast.pure, name)(headers)
            except Exception as exc:  # the same error, then
                with pytest.raises(type(exc)):
                    getattr(compiled, name)(headers)
            else:
                assert getattr(compiled, name)(headers) == expected


_line_parts = st.lists(
    st.sampled_from([b"GET", b"POST", b" ", b"  ", b"/v1/chat", b"\r", b"\n", b"\r\n", b"x",
                     b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.", b"\r\n\r\n"]),
    max_size=12,
)


@given(parts=_line_parts, start=st.integers(-3, 40))
@example(parts=[b"POST", b" ", b"/v1/chat", b" ", b"HTTP/1.1", b"\r\n"], start=0)
@example(parts=[b"x", b"GET", b" ", b"/", b" ", b"HTTP/1.0", b"\r\n"], start=1)
def test_twins_agree_on_request_lines(parts: list[bytes], start: int) -> None:
    data = b"".join(parts)
    assert compiled_or_skip().request_line(data, start) == fast.pure.request_line(data, start)


def test_request_line_reads_the_common_line_only(impl: fast.Implementation) -> None:
    assert impl.request_line(b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\n", 0) == (34, 1)
    assert impl.request_line(b"xxGET / HTTP/1.0\r\n", 2) == (16, 0)
    for line in (b"GET  / HTTP/1.1\r\n", b" GET / HTTP/1.1\r\n", b"GET / HTTP/2.0\r\n",
                 b"GET / HTTP/1.1", b"GET /a b HTTP/1.1\r\n", b"GET HTTP/1.1\r\n"):
        assert impl.request_line(line, 0) == (-1, -1), line
