"""Request and response heads, classified and rendered in one pass (pure twin).

The compiled twin (``_heads_c.pyx``) must return equal results for every
input; this module is the definition it is tested against.

:func:`request_head` reads the client's header list once: which headers
relay acts on (credentials, framing, Host, Expect, the cache-varying ones)
and the end-to-end rest rendered as ``Name: value\\r\\n`` lines, ready to be
written upstream. :func:`response_head` does the same for an upstream
response: its framing, content type and coding, and the end-to-end headers
a client is sent, kept as pairs and rendered once.

Names are compared ASCII-case-insensitively (``bytes.lower``); names and
values are forwarded with the spelling they came with.
"""

from __future__ import annotations

__all__ = [
    "CREDENTIAL_NAMES",
    "HEAD_OK",
    "NOT_FORWARDED",
    "NOT_RELAYED",
    "PER_CALLER_HEADERS",
    "BAD_EXPECT",
    "BAD_TRANSFER_ENCODING",
    "DUPLICATE_HOST",
    "REQUEST_NAMES",
    "RESPONSE_NAMES",
    "VARYING_NAMES",
    "request_head",
    "request_line",
    "response_head",
]

# What request_head found wrong (the first problem, in header order).
HEAD_OK = 0
BAD_TRANSFER_ENCODING = 1   # anything but exactly "chunked" (400)
DUPLICATE_HOST = 2          # (400)
BAD_EXPECT = 3              # anything but "100-continue" (417)

# Headers that describe one hop (RFC 9110 7.6.1) plus the framing headers
# relay recomputes itself.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
    }
)
# Request headers relay does not pass upstream: hop-by-hop ones, those it
# sets itself (Host, framing, X-Forwarded-*, Accept-Encoding: relay asks for
# identity) and Expect (the body is read before forwarding).
NOT_FORWARDED = HOP_BY_HOP | {
    b"host", b"expect", b"x-forwarded-for", b"x-forwarded-proto", b"accept-encoding"
}
# The client's credentials: kept apart, an upstream with its own key replaces them.
CREDENTIAL_NAMES = frozenset({b"authorization", b"x-api-key", b"api-key"})
# Request headers that change the answer to the same body (cache key parts).
VARYING_NAMES = frozenset(
    {b"anthropic-version", b"anthropic-beta", b"openai-organization", b"openai-project"}
)
# Response headers a client is not sent: hop-by-hop, X-Relay-Cache (relay
# sets its own) and Content-Encoding (bodies reach clients as identity).
NOT_RELAYED = HOP_BY_HOP | {b"x-relay-cache", b"content-encoding"}
# Response headers that belong to the one caller whose request produced the
# response: session cookies and authentication state. They never reach
# another caller, neither from the cache nor as a coalesced follower.
# (WWW-Authenticate and Proxy-Authenticate answer that caller's credentials;
# Proxy-Authenticate is hop-by-hop anyway.)
PER_CALLER_HEADERS = frozenset(
    {
        b"set-cookie",
        b"set-cookie2",
        b"authentication-info",
        b"proxy-authentication-info",
        b"www-authenticate",
    }
)

# Request header classes (lowercase name -> class; absent: forwarded as is).
R_FORWARD = 0
R_DROP = 1
R_AUTHORIZATION = 2
R_X_API_KEY = 3
R_API_KEY = 4
R_CACHE_CONTROL = 5
R_CONTENT_LENGTH = 6
R_TRANSFER_ENCODING = 7
R_HOST = 8
R_X_FORWARDED_FOR = 9
R_VARYING = 10
R_CONNECTION = 11
R_EXPECT = 12

REQUEST_NAMES: dict[bytes, int] = {name: R_DROP for name in NOT_FORWARDED}
REQUEST_NAMES.update(
    {
        b"authorization": R_AUTHORIZATION,
        b"x-api-key": R_X_API_KEY,
        b"api-key": R_API_KEY,
        b"cache-control": R_CACHE_CONTROL,
        b"content-length": R_CONTENT_LENGTH,
        b"transfer-encoding": R_TRANSFER_ENCODING,
        b"host": R_HOST,
        b"x-forwarded-for": R_X_FORWARDED_FOR,
        b"connection": R_CONNECTION,
        b"expect": R_EXPECT,
    }
)
REQUEST_NAMES.update(dict.fromkeys(VARYING_NAMES, R_VARYING))

# Response header classes.
S_RELAY = 0
S_DROP = 1
S_CONNECTION = 2
S_CONTENT_TYPE = 3
S_CONTENT_ENCODING = 4
S_CONTENT_LENGTH = 5
S_TRANSFER_ENCODING = 6
S_PER_CALLER = 7  # relayed to its caller, kept from every other (see PER_CALLER_HEADERS)

RESPONSE_NAMES: dict[bytes, int] = {name: S_DROP for name in NOT_RELAYED}
RESPONSE_NAMES.update(
    {
        b"connection": S_CONNECTION,
        b"content-type": S_CONTENT_TYPE,
        b"content-encoding": S_CONTENT_ENCODING,
        b"content-length": S_CONTENT_LENGTH,
        b"transfer-encoding": S_TRANSFER_ENCODING,
    }
)
RESPONSE_NAMES.update(dict.fromkeys(PER_CALLER_HEADERS, S_PER_CALLER))

_NOT_TOKENS = frozenset({b"close", b"keep-alive", b""})
_IDENTITY = b"identity"

RequestHead = tuple[
    int,                  # problem: HEAD_OK or the first one found
    bytes,                # forwarded headers, rendered
    bytes,                # credential headers, rendered
    "bytes | None",       # Authorization value (the last one)
    "bytes | None",       # x-api-key value (the last one)
    "bytes | None",       # Cache-Control value, lowercased
    "bytes | None",       # Content-Length value as it came
    bool,                 # Transfer-Encoding: chunked
    bool,                 # a Host header was seen
    "bytes | None",       # X-Forwarded-For value (the last one)
    "list[bytes] | None", # b"name:value" of each varying header, in order
    bool,                 # Expect: 100-continue
]

ResponseHead = tuple[
    "tuple[tuple[bytes, bytes], ...]",  # the headers a client is sent
    bytes,                # the same, rendered
    "bytes | None",       # Content-Type, lowercased
    "bytes | None",       # the coding: None for identity, else lowercased
    "bytes | None",       # Content-Length value as it came (the last one)
    bool,                 # Transfer-Encoding present
    bool,                 # a per-caller header is among the first (PER_CALLER_HEADERS)
]


def request_head(headers: list[tuple[bytes, bytes]]) -> RequestHead:
    """What relay needs from a client request's headers, in one pass.

    Headers named in a Connection header are hop-by-hop too (RFC 9110
    7.6.1) and are left out of the forwarded ones. On a problem the other
    fields are incomplete: the request is refused.
    """
    names = REQUEST_NAMES
    forward: list[bytes] = []
    credentials: list[bytes] = []
    authorization = api_key = cache_control = content_length = forwarded_for = None
    varying: list[bytes] | None = None
    chunked = host_seen = expect_continue = False
    tokens: set[bytes] | None = None
    lowered: list[bytes | None] = []
    for name, value in headers:
        lname = name.lower()
        kind = names.get(lname, R_FORWARD)
        if kind == R_FORWARD:
            forward.append(name + b": " + value + b"\r\n")
            lowered.append(lname)
            continue
        lowered.append(None)
        if kind == R_DROP:
            continue
        if kind == R_AUTHORIZATION:
            credentials.append(name + b": " + value + b"\r\n")
            authorization = value
        elif kind == R_X_API_KEY:
            credentials.append(name + b": " + value + b"\r\n")
            api_key = value
        elif kind == R_API_KEY:
            credentials.append(name + b": " + value + b"\r\n")
        elif kind == R_CACHE_CONTROL:
            forward.append(name + b": " + value + b"\r\n")
            lowered[-1] = lname
            cache_control = value.lower()
        elif kind == R_VARYING:
            forward.append(name + b": " + value + b"\r\n")
            lowered[-1] = lname
            line = lname + b":" + value.strip()
            if varying is None:
                varying = [line]
            else:
                varying.append(line)
        elif kind == R_CONTENT_LENGTH:
            content_length = value
        elif kind == R_TRANSFER_ENCODING:
            # llhttp accepts "gzip, chunked"; relay would have to forward a
            # body coded in a way it cannot frame faithfully: refused.
            if value.strip().lower() != b"chunked":
                return _refused(BAD_TRANSFER_ENCODING)
            chunked = True
        elif kind == R_HOST:
            if host_seen:
                return _refused(DUPLICATE_HOST)
            host_seen = True
        elif kind == R_X_FORWARDED_FOR:
            forwarded_for = value
        elif kind == R_CONNECTION:
            named = {t.strip().lower() for t in value.split(b",")} - _NOT_TOKENS
            if named:
                tokens = named
        elif kind == R_EXPECT:
            if value.lower() != b"100-continue":
                return _refused(BAD_EXPECT)
            expect_continue = True
    if tokens is not None:
        # The last Connection header naming headers decides (as it always has).
        forward = [
            line for line, lname in zip(_rendered(headers), lowered, strict=True)
            if lname is not None and lname not in tokens
        ]
    return (
        HEAD_OK,
        b"".join(forward),
        b"".join(credentials),
        authorization,
        api_key,
        cache_control,
        content_length,
        chunked,
        host_seen,
        forwarded_for,
        varying,
        expect_continue,
    )


def _rendered(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [name + b": " + value + b"\r\n" for name, value in headers]


def _refused(problem: int) -> RequestHead:
    return (problem, b"", b"", None, None, None, None, False, False, None, None, False)


def response_head(headers: list[tuple[bytes, bytes]]) -> ResponseHead:
    """What relay needs from an upstream response's headers, in one pass.

    Headers named in a Connection header are dropped too (RFC 9110 7.6.1).
    """
    names = RESPONSE_NAMES
    kept: list[tuple[bytes, bytes]] = []
    lines: list[bytes] = []
    content_type = coding = content_length = None
    chunked = per_caller = False
    tokens: set[bytes] | None = None
    for pair in headers:
        name, value = pair
        kind = names.get(name.lower(), S_RELAY)
        if kind == S_RELAY:
            kept.append(pair)
            lines.append(name + b": " + value + b"\r\n")
            continue
        if kind == S_CONTENT_TYPE:
            kept.append(pair)
            lines.append(name + b": " + value + b"\r\n")
            content_type = value.lower()
        elif kind == S_PER_CALLER:
            kept.append(pair)
            lines.append(name + b": " + value + b"\r\n")
            per_caller = True
        elif kind == S_CONNECTION:
            # Only the last Connection header's tokens count (as they always have).
            tokens = {t.strip().lower() for t in value.split(b",")}
        elif kind == S_CONTENT_ENCODING:
            value = value.strip().lower()
            if value and value != _IDENTITY:
                coding = value if coding is None else coding + b", " + value
        elif kind == S_CONTENT_LENGTH:
            content_length = value
        elif kind == S_TRANSFER_ENCODING:
            chunked = True
    if tokens is not None:
        kept = [pair for pair in kept if pair[0].lower() not in tokens]
        lines = [name + b": " + value + b"\r\n" for name, value in kept]
        per_caller = any(name.lower() in PER_CALLER_HEADERS for name, _ in kept)
    return tuple(kept), b"".join(lines), content_type, coding, content_length, chunked, per_caller


def request_line(data: bytes, start: int) -> tuple[int, int]:
    """(index of the CRLF ending the request line at *start*, the HTTP minor
    version) for the common line, ``METHOD SP TARGET SP HTTP/1.1`` (or
    ``/1.0``) with exactly those two spaces; (-1, -1) for anything else,
    which the client connection checks in full."""
    end = data.find(b"\r\n", start)
    first = data.find(b" ", start, end)
    last = data.rfind(b" ", start, end)
    if first > start and end - last == 9 and last > first + 1 and data.find(b" ", first + 1, last) < 0:
        if data.startswith(b"HTTP/1.1", last + 1):
            return end, 1
        if data.startswith(b"HTTP/1.0", last + 1):
            return end, 0
    return -1, -1
