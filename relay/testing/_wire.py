"""Framing and fault plumbing for the fake upstream: response heads, chunked
encoding, the x-fake-* header parser, lazy large bodies and connection resets.
"""

from __future__ import annotations

import asyncio
import math
import socket
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from relay.testing.responses import ContentOptions, Reply, error_reply, reason_phrase

_NO_BODY_STATUSES = frozenset((204, 304))
_TERMINATOR = b"0\r\n\r\n"
_FILL = b"a" * 65536  # shared, immutable: safe to hand to write() repeatedly
TRUNCATE_EXTRA = 1024

GARBAGE = b"\x00\x16\x03\x01 this is not HTTP \xff\xfe\xfd\r\n\r\n"


def head(status: int, content_type: str, length: int | None, close: bool,
         extra: tuple[str, ...] = (), *, chunked: bool = True) -> bytes:
    """A response head; length None means chunked (or, with chunked=False,
    close-delimited: no framing header at all), -1 means no body at all."""
    lines = [f"HTTP/1.1 {status} {reason_phrase(status)}"]
    if length != -1:
        lines.append(f"content-type: {content_type}")
    if length is None:
        if chunked:
            lines.append("transfer-encoding: chunked")
        lines.append("cache-control: no-cache")
    elif length >= 0:
        lines.append(f"content-length: {length}")
    lines.extend(extra)
    if close:
        lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


ENCODINGS = ("gzip", "deflate", "br")


def encode_pieces(pieces: list[bytes], encoding: str) -> list[bytes]:
    """The pieces compressed as one stream, one flush per piece, so each
    still arrives on its own (an SSE event stays one read for the client).

    ``br`` is only a label: the pieces go out unchanged under a coding the
    gateway has no decoder for.
    """
    if encoding == "br":
        return list(pieces)
    z = zlib.compressobj(6, zlib.DEFLATED, 31 if encoding == "gzip" else 15)
    out = [z.compress(piece) + z.flush(zlib.Z_SYNC_FLUSH) for piece in pieces]
    tail = z.flush()
    if out:
        out[-1] += tail
    else:
        out.append(tail)
    if len(out) == 1 and len(out[0]) > 8:
        # A whole JSON body: send it in two reads to exercise incremental decoding.
        half = len(out[0]) // 2
        out = [out[0][:half], out[0][half:]]
    return out


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


class Canned:
    """A reply plus its wire bytes, encoded once per framing and reused."""

    __slots__ = ("reply", "_keep", "_close")

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self._keep: bytes | None = None
        self._close: bytes | None = None

    @classmethod
    def error(cls, status: int, message: str) -> Canned:
        return cls(error_reply(status, message))

    def wire(self, close: bool) -> bytes:
        data = self._close if close else self._keep
        if data is None:
            data = self._encode(close)
            if close:
                self._close = data
            else:
                self._keep = data
        return data

    def _encode(self, close: bool) -> bytes:
        reply = self.reply
        if reply.status in _NO_BODY_STATUSES:
            return head(reply.status, reply.content_type, -1, close)
        if reply.events is None:
            return head(reply.status, reply.content_type, len(reply.body), close) + reply.body
        parts = [head(reply.status, reply.content_type, None, close)]
        parts.extend(chunk(event) for event in reply.events)
        parts.append(_TERMINATOR)
        return b"".join(parts)


BAD_REQUEST = Canned.error(400, "Malformed HTTP request").wire(close=True)


def frame_slow(reply: Reply, close: bool, truncate: bool,
               faults: Faults | None = None) -> tuple[bytes, list[bytes]]:
    """The head and the body pieces (one per SSE event) of a slow response."""
    faults = faults or _NO_FAULTS
    extra: list[str] = []
    if faults.set_cookie is not None:
        extra.append("set-cookie: " + faults.set_cookie)
    if faults.retry_after is not None:
        seconds = faults.retry_after
        extra.append(f"retry-after: {int(seconds) if float(seconds).is_integer() else seconds}")
    if reply.status in _NO_BODY_STATUSES:
        return head(reply.status, reply.content_type, -1, close, tuple(extra)), []
    raw = [reply.body] if reply.events is None else list(reply.events)
    if faults.encoding is not None:
        raw = encode_pieces(raw, faults.encoding)
        extra.append("content-encoding: " + faults.encoding)
        extra.append("vary: accept-encoding")
    if faults.close_delimited:
        # No length, no chunks: the body ends when the connection closes.
        return head(reply.status, reply.content_type, None, True, tuple(extra),
                    chunked=False), raw
    if reply.events is None:
        declared = sum(map(len, raw)) + (TRUNCATE_EXTRA if truncate else 0)
        return head(reply.status, reply.content_type, declared, close, tuple(extra)), raw
    pieces = [chunk(piece) for piece in raw if piece]
    if truncate:
        pieces.pop()  # the closing event and the final chunk never come
    else:
        pieces[-1] += _TERMINATOR
    return head(reply.status, reply.content_type, None, close, tuple(extra)), pieces


def filler(n: int, chunked: bool, truncate: bool) -> Iterator[bytes]:
    """Exactly n body bytes (a JSON object when n >= 10), produced lazily."""
    if n >= 10:
        parts = (b'{"pad":"', n - 10, b'"}')
    else:
        parts = (b"", n, b"")
    prefix, middle, suffix = parts
    pieces: Iterator[bytes] = _fill_pieces(prefix, middle, suffix)
    for piece in pieces:
        yield chunk(piece) if chunked else piece
    if chunked and not truncate:
        yield _TERMINATOR


def _fill_pieces(prefix: bytes, middle: int, suffix: bytes) -> Iterator[bytes]:
    if prefix:
        yield prefix
    full, rest = divmod(middle, len(_FILL))
    for _ in range(full):
        yield _FILL
    if rest:
        yield _FILL[:rest]
    if suffix:
        yield suffix


@dataclass(frozen=True, slots=True)
class Faults:
    """The fault headers that change how (not what) the answer is sent."""

    delay: float = 0.0
    event_delay: float = 0.0
    reset_after: int | None = None
    truncate: bool = False
    silence: bool = False
    garbage: bool = False
    body_bytes: int | None = None
    chunked: bool = False
    close: bool = False
    encoding: str | None = None
    set_cookie: str | None = None
    close_delimited: bool = False
    retry_after: float | None = None
    drop: bool = False
    drop_reused: bool = False

    @property
    def needs_task(self) -> bool:
        return bool(self.delay or self.event_delay or self.truncate
                    or self.reset_after is not None or self.body_bytes is not None
                    or self.encoding is not None or self.set_cookie is not None
                    or self.close_delimited or self.retry_after is not None)


_NO_FAULTS = Faults()


_TRUE = frozenset((b"1", b"true", b"yes"))
_FALSE = frozenset((b"0", b"false", b"no", b""))


def _flag(name: str, value: bytes) -> bool:
    value = value.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name} must be 1/true/yes or 0/false/no")


def _count(name: str, value: bytes) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{name} must be a whole number") from None
    if number < 0:
        raise ValueError(f"{name} must not be negative")
    return number


def _seconds(name: str, value: bytes) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds") from None
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{name} must be a non-negative number of seconds")
    return number


def _encoding(name: str, value: bytes) -> str:
    coding = value.strip().lower().decode("latin-1")
    if coding not in ENCODINGS:
        raise ValueError(f"{name} must be one of {', '.join(ENCODINGS)}")
    return coding


def _text(name: str, value: bytes) -> str:
    return value.decode("latin-1")


def _status(name: str, value: bytes) -> int:
    number = _count(name, value)
    if not 200 <= number <= 599:
        raise ValueError(f"{name} must be between 200 and 599")
    return number


_CONTENT_PARSERS: dict[bytes, tuple[str, Callable[[str, bytes], object]]] = {
    b"x-fake-status": ("status", _status),
    b"x-fake-events": ("events", _count),
    b"x-fake-cached-tokens": ("cached_tokens", _count),
    b"x-fake-cache-write-tokens": ("cache_write_tokens", _count),
    b"x-fake-reasoning-tokens": ("reasoning_tokens", _count),
    b"x-fake-usage-on-last-chunk": ("usage_on_last_chunk", _flag),
}
_FAULT_PARSERS: dict[bytes, tuple[str, Callable[[str, bytes], object]]] = {
    b"x-fake-delay": ("delay", _seconds),
    b"x-fake-event-delay": ("event_delay", _seconds),
    b"x-fake-reset-after": ("reset_after", _count),
    b"x-fake-truncate": ("truncate", _flag),
    b"x-fake-silence": ("silence", _flag),
    b"x-fake-garbage": ("garbage", _flag),
    b"x-fake-body-bytes": ("body_bytes", _count),
    b"x-fake-chunked": ("chunked", _flag),
    b"x-fake-close": ("close", _flag),
    b"x-fake-encoding": ("encoding", _encoding),
    b"x-fake-set-cookie": ("set_cookie", _text),
    b"x-fake-close-delimited": ("close_delimited", _flag),
    b"x-fake-retry-after": ("retry_after", _seconds),
    b"x-fake-drop": ("drop", _flag),
    b"x-fake-drop-reused": ("drop_reused", _flag),
}


def parse_faults(fake: dict[bytes, bytes], default_events: int) -> tuple[ContentOptions, Faults]:
    """Read the x-fake-* headers (names lowercased). ValueError names the bad one."""
    content: dict[str, object] = {"events": default_events}
    faults: dict[str, object] = {}
    for name, value in fake.items():
        label = name.decode("latin-1")
        if name == b"x-fake-body":
            content["body"] = value
        elif name == b"x-fake-no-usage":
            content["usage"] = not _flag(label, value)
        elif name in _CONTENT_PARSERS:
            field, parse = _CONTENT_PARSERS[name]
            content[field] = parse(label, value)
        elif name in _FAULT_PARSERS:
            field, parse = _FAULT_PARSERS[name]
            faults[field] = parse(label, value)
        else:
            raise ValueError(f"unknown fault header {label}")
    return ContentOptions(**content), Faults(**faults)  # type: ignore[arg-type]


def unsent_bytes(transport: asyncio.Transport) -> int:
    """Bytes still in the kernel's send queue (Linux); 0 when unknown."""
    sock = transport.get_extra_info("socket")
    try:
        import fcntl
        import termios

        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        return int(struct.unpack("i", raw)[0])
    except (ImportError, AttributeError, OSError, ValueError):
        return 0


def reset_transport(transport: asyncio.Transport) -> None:
    """Close with RST: SO_LINGER 0 makes the kernel abort instead of FIN."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except (OSError, AttributeError):
            pass
    transport.abort()
