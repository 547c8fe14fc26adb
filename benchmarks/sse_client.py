"""A streaming client that times every SSE event as it arrives.

It speaks HTTP/1.1 over a plain socket (httptools parses the response, so
chunked framing is undone exactly) and keeps the connection alive between
streams, as an SDK would.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import httptools

__all__ = ["StreamResult", "StreamClient"]


@dataclass(slots=True)
class StreamResult:
    status: int = 0
    events: int = 0                    # data events, [DONE] not counted
    first_event_s: float | None = None  # request sent -> first complete event
    last_event_s: float | None = None
    arrivals: list[float] = field(default_factory=list)
    error: str | None = None
    body_head: bytes = b""

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 200 and self.events > 0

    @property
    def events_per_s(self) -> float | None:
        if not self.events or not self.last_event_s:
            return None
        return self.events / self.last_event_s

    @property
    def spread_s(self) -> float:
        """Time between the first and the last event's arrival."""
        return self.arrivals[-1] - self.arrivals[0] if len(self.arrivals) > 1 else 0.0


class _Response:
    """httptools callbacks: counts events in the decoded body as it arrives."""

    def __init__(self, result: StreamResult, started: float) -> None:
        self.result = result
        self.started = started
        self.pending = b""
        self.done = False
        self.keep_alive = True
        self.parser: httptools.HttpResponseParser | None = None

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        self.result.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        result = self.result
        if result.status != 200:
            result.body_head = (result.body_head + body)[:300]
            return
        now = time.perf_counter() - self.started
        buf = self.pending + body
        # Events end with a blank line; OpenAI streams use "\n" only.
        buf = buf.replace(b"\r\n", b"\n")
        *complete, self.pending = buf.split(b"\n\n")
        for event in complete:
            if b"data:" not in event or event.endswith(b"[DONE]"):
                continue
            result.events += 1
            result.arrivals.append(now)
            if result.first_event_s is None:
                result.first_event_s = now
            result.last_event_s = now

    def on_message_complete(self) -> None:
        self.done = True


class StreamClient:
    """One keep-alive connection to ``127.0.0.1:port``; one stream at a time."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.port = port
        self.timeout = timeout
        self._sock: socket.socket | None = None

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.create_connection(("127.0.0.1", self.port), self.timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock = sock
        return self._sock

    def stream(self, path: str, headers: Mapping[str, str], body: bytes) -> StreamResult:
        result = StreamResult()
        head = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{self.port}",
                "Content-Type: application/json", "Accept: text/event-stream",
                f"Content-Length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        request = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        for attempt in range(2):  # a kept-alive socket the server closed: retry once
            try:
                sock = self._connect()
                started = time.perf_counter()
                sock.sendall(request)
                response = _Response(result, started)
                parser = httptools.HttpResponseParser(response)
                response.parser = parser
                got_bytes = False
                while not response.done:
                    data = sock.recv(65536)
                    if not data:
                        if not got_bytes and attempt == 0:
                            raise ConnectionResetError("closed before answering")
                        parser.feed_data(b"")  # let the parser see EOF
                        if not response.done:
                            result.error = "connection closed mid-response"
                        break
                    got_bytes = True
                    parser.feed_data(data)
                if not response.keep_alive or not response.done:
                    self.close()
                return result
            except (ConnectionResetError, BrokenPipeError) as exc:
                self.close()
                if attempt == 1 or result.status:
                    result.error = f"{type(exc).__name__}: {exc}"
                    return result
                result = StreamResult()
            except (OSError, httptools.HttpParserError) as exc:
                self.close()
                result.error = f"{type(exc).__name__}: {exc}"
                return result
        return result
