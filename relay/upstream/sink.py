"""What an upstream connection hands a response to, and how it says it failed.

Kept apart from the connection because the connection has two twins
(``_conn_py`` and the compiled ``_conn_c``): both raise and pass on this
one :class:`UpstreamError`, so ``except UpstreamError`` means the same
whichever runs.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["ResponseSink", "UpstreamError"]


class UpstreamError(Exception):
    """Why an upstream exchange failed; ``timeout`` maps to 504, else 502."""

    __slots__ = ("timeout", "reason", "exhausted", "connect")

    def __init__(
        self, reason: str, *, timeout: bool = False, exhausted: bool = False, connect: bool = False
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.timeout = timeout
        self.exhausted = exhausted  # no connection slot came free in time (503)
        self.connect = connect  # the connection could not be opened


class ResponseSink(Protocol):
    """Receives one upstream response as it arrives."""

    def on_head(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        length: int | None,
    ) -> None: ...

    def on_body(self, chunk: bytes) -> None: ...

    def on_complete(self) -> None: ...

    def on_error(self, error: UpstreamError) -> None: ...

    def on_read_end(self) -> None:
        """One socket read has been parsed (writes collected for it can go out)."""
