"""Incremental splitting of a ``text/event-stream`` into raw events.

The proxy forwards upstream bytes as they come, but it needs whole events to
read usage from them and to drop the one usage-only chunk it asked for. The
splitter therefore cuts the stream at event boundaries and hands back each
event's *exact* bytes, terminating blank line included, so that forwarding
the events one after the other reproduces the upstream stream byte for byte
(``b"".join(events) + flush()`` equals the input, whatever the chunking).

An event ends at a blank line. Lines end in ``\\r\\n``, ``\\n`` or ``\\r``
(the SSE grammar allows all three, mixed), so the end of an event is a line
terminator directly followed by another one. A lone terminator at the very
start of an event is a blank line of its own and is returned as a one-line
event (it carries no fields; SSE consumers ignore it).
"""

from __future__ import annotations

import re

__all__ = ["SSESplitter", "event_fields", "split_events"]

# Two consecutive line terminators. The groups are atomic so that "\r\n" is
# never re-read as "\r" followed by a separate "\n" line (which would be a
# false blank line).
_EVENT_END = re.compile(rb"(?>\r\n|\r|\n)(?>\r\n|\r|\n)")
_CR = 0x0D
_LF = 0x0A


class SSESplitter:
    """Cuts a byte stream into complete SSE events, bytes preserved exactly.

    Keeps the not-yet-complete bytes and only scans what is new since the
    last call (plus one byte of overlap, for a terminator split across
    chunks). While no ``\\r`` has been seen, which is every OpenAI and
    Anthropic stream, the scan is a plain ``find(b"\\n\\n")``.

    :meth:`feed` hands back each event (for whoever reads them one by one);
    :meth:`feed_span` hands back all the complete events of a read as one
    piece, for a stream forwarded unchanged: a read that ends at an event's
    end is returned as the same object, and only an event cut across reads
    is copied. The two cut at the same places.
    """

    __slots__ = ("_buf", "_scan", "_saw_cr")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._scan = 0  # where the next search may start (inside _buf)
        self._saw_cr = False

    @property
    def pending(self) -> int:
        """Bytes held back because their event is not complete yet."""
        return len(self._buf)

    @property
    def saw_cr(self) -> bool:
        """True once a ``\\r`` came: events may then end in more ways than ``\\n\\n``."""
        return self._saw_cr

    def feed(self, chunk: bytes) -> list[bytes]:
        """Add ``chunk``; return the events it completed (possibly none)."""
        if not chunk:
            return []
        buf = self._buf
        if (
            not buf
            and chunk[-1] == _LF
            and chunk[0] != _LF
            and chunk.find(b"\n\n") == len(chunk) - 2
            and not self._saw_cr
            and _CR not in chunk
        ):
            # The usual read: exactly one whole event. Handed back as the
            # same object, no copy.
            return [chunk]
        if not self._saw_cr and _CR in chunk:
            self._saw_cr = True
        ends: list[int] = []
        if not buf:
            # Cut from the read itself: one copy per event, one of the rest.
            start, scan = _walk(chunk, 0, self._saw_cr, ends)
            events = _slices(chunk, ends)
            if start < len(chunk):
                buf += memoryview(chunk)[start:]
            self._scan = scan - start
            return events
        buf += chunk
        start, scan = _walk(buf, self._scan, self._saw_cr, ends)
        with memoryview(buf) as view:
            events = [bytes(view[a:b]) for a, b in zip([0, *ends], ends, strict=False)]
        if start:
            del buf[:start]
        self._scan = scan - start
        return events

    def feed_span(self, chunk: bytes) -> bytes:
        """Add ``chunk``; return the complete events it finished as one piece
        (``b""`` if none): the bytes as they came, the incomplete rest kept."""
        if not chunk:
            return b""
        if not self._saw_cr and _CR in chunk:
            self._saw_cr = True
        buf = self._buf
        if not buf:
            if not self._saw_cr and chunk.endswith(b"\n\n"):
                # The usual read. Without CR, every end of a blank line ends
                # an event: the read is complete events only.
                return chunk
            end, scan = _walk(chunk, 0, self._saw_cr, None)
            if end == len(chunk):
                self._scan = 0
                return chunk  # the usual read: it ends where an event does
            buf += memoryview(chunk)[end:]
            self._scan = scan - end
            return chunk[:end]
        buf += chunk
        end, scan = _walk(buf, self._scan, self._saw_cr, None)
        if not end:
            self._scan = scan
            return b""
        with memoryview(buf) as view:
            span = bytes(view[:end])
        del buf[:end]
        self._scan = scan - end
        return span

    def flush(self) -> bytes:
        """Return and forget the incomplete rest (end of stream)."""
        rest = bytes(self._buf)
        self._buf.clear()
        self._scan = 0
        return rest


def _walk(
    buf: bytes | bytearray, scan: int, saw_cr: bool, ends: list[int] | None
) -> tuple[int, int]:
    """Find the complete events at the start of *buf*.

    *scan*: where a search for an event's end may begin (bytes before it
    were searched already). Appends each event's end to *ends* (if given);
    returns the end of the last complete event (0: none) and where the next
    search may begin.
    """
    size = len(buf)
    if ends is None and not saw_cr and buf[0] != _LF and b"\n\n\n" not in buf:
        # No blank line starts an event: every "\n\n" ends one, and the last
        # complete event ends at the last of them.
        end = buf.rfind(b"\n\n", scan) + 2
        if end < 2:
            end = 0
        return end, max(end, size - 1)
    start = 0  # start of the current (incomplete) event in buf
    while start < size:
        first = buf[start]
        if scan == start and (first == _LF or first == _CR):
            # Blank line at the start of an event: an event of its own.
            if first == _LF:
                end = start + 1
            elif start + 1 < size:
                end = start + 2 if buf[start + 1] == _LF else start + 1
            else:
                break  # "\r" at the end: wait to see whether "\n" follows
        elif saw_cr:
            m = _EVENT_END.search(buf, scan)
            if m is None:
                scan = max(start, size - 1)
                break
            end = m.end()
            if buf[end - 1] == _CR and end == size:
                # The blank line may be "\r\n" with "\n" still to come.
                scan = m.start()
                break
        else:
            pos = buf.find(b"\n\n", scan)
            if pos < 0:
                scan = max(start, size - 1)
                break
            end = pos + 2
        if ends is not None:
            ends.append(end)
        start = scan = end
    return start, scan


def split_events(span: bytes) -> list[bytes]:
    """The events of *span*, whole events without ``\\r`` (what
    :meth:`SSESplitter.feed_span` returns while no ``\\r`` came), cut where
    :meth:`SSESplitter.feed` would have cut them."""
    ends: list[int] = []
    _walk(span, 0, False, ends)
    return _slices(span, ends)


def _slices(data: bytes, ends: list[int]) -> list[bytes]:
    events = []
    start = 0
    for end in ends:
        events.append(data[start:end])
        start = end
    return events


def event_fields(raw: bytes) -> tuple[bytes | None, bytes | None]:
    """``(event name, data)`` of one raw event; ``None`` where absent.

    ``data`` joins several ``data:`` lines with ``\\n`` as the SSE spec says;
    one space after the colon is dropped; comment lines (``:``) are skipped.
    """
    if raw.startswith(b"data: ") and raw.find(b"\n", 6, len(raw) - 2) < 0 and b"\r" not in raw:
        # The overwhelmingly common shape: one "data: ..." line then "\n\n".
        return None, raw[6:].rstrip(b"\n")
    name: bytes | None = None
    data: list[bytes] = []
    for line in raw.splitlines():
        if not line or line[0] == 0x3A:  # blank or ":" comment
            continue
        field, sep, value = line.partition(b":")
        if sep and value[:1] == b" ":
            value = value[1:]
        if field == b"data":
            data.append(value)
        elif field == b"event":
            name = value
    return name, (b"\n".join(data) if data else None)
