"""A stream's first event reaches the client on its own, ahead of the rest of
the upstream read it came in, and before the upstream sends anything more.

The upstream here writes the response head and three events in one piece,
then waits until the test has seen the client's first chunk before it sends
the end of the stream; relay asks for usage itself (the client did not), so
every event passes through usage accounting and the injected usage chunk is
taken out again.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from tests.support import RelayThread, make_config

EVENTS = [
    b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"%s"}}]}\n\n'
    % word
    for word in (b"one", b"two", b"three")
]
USAGE_CHUNK = (
    b'data: {"id":"c1","object":"chat.completion.chunk","choices":[],'
    b'"usage":{"prompt_tokens":3,"completion_tokens":3,"total_tokens":6}}\n\n'
)
DONE = b"data: [DONE]\n\n"
WAIT_S = 10.0


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class HoldingUpstream:
    """Answers one streamed request: head and three events in one write, the
    rest only once ``proceed`` is set."""

    def __init__(self) -> None:
        self.proceed = threading.Event()
        self.request = b""
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(WAIT_S)
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(WAIT_S)
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            while len(body) < length:
                body += conn.recv(65536)
            self.request = head + b"\r\n\r\n" + body
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n" + _chunk(b"".join(EVENTS))
            )
            if self.proceed.wait(WAIT_S):
                conn.sendall(_chunk(USAGE_CHUNK + DONE) + b"0\r\n\r\n")
            conn.recv(65536)  # until relay closes (or the timeout)

    def stop(self) -> None:
        self.proceed.set()
        self._listener.close()
        self._thread.join(WAIT_S)


@pytest.fixture
def upstream() -> Iterator[HoldingUpstream]:
    server = HoldingUpstream()
    try:
        yield server
    finally:
        server.stop()


class _ChunkReader:
    """Reads a chunked response from a socket, one chunk at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("relay closed the connection")
        self.buf += data

    def head(self) -> bytes:
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        return head

    def chunk(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        size_line, _, self.buf = self.buf.partition(b"\r\n")
        size = int(size_line, 16)
        while len(self.buf) < size + 2:
            self._fill()
        data, self.buf = self.buf[:size], self.buf[size + 2:]
        return data


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_first_event_leaves_alone_before_the_upstream_sends_more(upstream, loop):
    config = make_config(upstream.url, cache={"enabled": True})
    with RelayThread(config, loop=loop) as relay:
        body = b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"stream":true}'
        with socket.create_connection(("127.0.0.1", relay.port), timeout=WAIT_S) as sock:
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: relay\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body)
            )
            reader = _ChunkReader(sock)
            head = reader.head()
            assert head.startswith(b"HTTP/1.1 200 ")
            # The upstream is still holding the end of the stream back: what
            # arrived came from its one write of three events.
            first = reader.chunk()
            assert first == EVENTS[0]
            upstream.proceed.set()
            chunks = [first]
            while chunk := reader.chunk():
                chunks.append(chunk)
    assert b'"include_usage":true' in upstream.request  # relay asked for usage itself...
    assert b"".join(chunks) == b"".join(EVENTS) + DONE  # ...and the client never sees it
