"""The client connection's three state sets and their transition tables.

Kept apart from the connection itself because the connection has two twins
(``_client_py`` imported as is, ``_client_c`` compiled from the same source):
both take these enums, tables and the error from here, so a state reads the
same and a refused transition raises the same class whichever twin runs.

A connection holds its states as plain ints (the enums' values): the
compiled twin keeps them as C ints (``_client_c.pxd`` declares the same
names as a C enum), the enums give them their names.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import TypeVar

__all__ = [
    "ANSWER_MOVES",
    "CONN_MOVES",
    "READ_MOVES",
    "AnswerState",
    "ConnState",
    "ProtocolStateError",
    "ReadState",
    "refused",
    # The values under short names, for the connection's hot path (a star
    # import: the compiled twin's .pxd declares them as a C enum instead).
    "_OPEN",
    "_IDLE",
    "_CLOSING",
    "_HALF_CLOSED",
    "_CLOSED",
    "_AWAIT",
    "_HEAD",
    "_BODY",
    "_CONTINUE",
    "_UPGRADE",
    "_NONE",
    "_PENDING",
    "_STREAMING",
    "_CHUNKING",
]


class ConnState(enum.IntEnum):
    """Per connection. Ordered: from ``CLOSING`` on, no new request is read."""

    OPEN = 0         # reading requests; one may be being answered
    IDLE = 1         # keep-alive between requests: the idle timer is the armed one
    CLOSING = 2      # no new requests (refused one, close asked, shutdown, timeout)
    HALF_CLOSED = 3  # the client sent EOF: as CLOSING, and an unanswered request is gone
    CLOSED = 4       # the connection is lost: writes are dropped


class ReadState(enum.IntEnum):
    """The request being read."""

    AWAIT = 0        # between requests: the next byte begins a request line
    HEAD = 1
    BODY = 2
    CONTINUE = 3     # asked for 100 Continue before its turn: the interim answer waits
    UPGRADE = 4      # an h2c offer relay declined; llhttp hands back the bytes after it


class AnswerState(enum.IntEnum):
    """The request being answered (the head of the pipeline)."""

    NONE = 0         # nothing is being answered
    PENDING = 1      # dispatched or refused; no byte of its response written
    BODY = 2         # head written; body with a length, or until the close
    CHUNKED = 3      # head written; chunked body


class ProtocolStateError(RuntimeError):
    """A state change the transition tables do not allow: a bug in relay."""


_OPEN, _IDLE, _CLOSING, _HALF_CLOSED, _CLOSED = (int(s) for s in ConnState)
_AWAIT, _HEAD, _BODY, _CONTINUE, _UPGRADE = (int(s) for s in ReadState)
_NONE, _PENDING, _STREAMING, _CHUNKING = (int(s) for s in AnswerState)

_S = TypeVar("_S", bound=enum.IntEnum)


def _moves(table: Mapping[_S, tuple[_S, ...]]) -> tuple[int, ...]:
    """Allowed transitions as one bit mask per state (one shift to check)."""
    return tuple(sum(1 << new for new in table.get(state, ())) for state in type(next(iter(table))))


CONN_MOVES = _moves({
    ConnState.OPEN: (ConnState.IDLE, ConnState.CLOSING, ConnState.HALF_CLOSED, ConnState.CLOSED),
    ConnState.IDLE: (ConnState.OPEN, ConnState.CLOSING, ConnState.HALF_CLOSED, ConnState.CLOSED),
    ConnState.CLOSING: (ConnState.HALF_CLOSED, ConnState.CLOSED),
    ConnState.HALF_CLOSED: (ConnState.CLOSED,),
})
READ_MOVES = _moves({
    ReadState.AWAIT: (ReadState.HEAD,),
    ReadState.HEAD: (ReadState.BODY, ReadState.CONTINUE, ReadState.UPGRADE),
    ReadState.BODY: (ReadState.AWAIT,),
    ReadState.CONTINUE: (ReadState.BODY, ReadState.AWAIT),
    ReadState.UPGRADE: (ReadState.AWAIT,),
})
ANSWER_MOVES = _moves({
    AnswerState.NONE: (AnswerState.PENDING,),
    AnswerState.PENDING: (AnswerState.BODY, AnswerState.CHUNKED, AnswerState.NONE),
    AnswerState.BODY: (AnswerState.NONE,),
    AnswerState.CHUNKED: (AnswerState.NONE,),
})

_KINDS = {"connection": ConnState, "read": ReadState, "answer": AnswerState}


def refused(kind: str, old: int, new: int) -> ProtocolStateError:
    """The error for a transition of *kind* ("connection", "read", "answer") not in its table."""
    names = _KINDS[kind]
    return ProtocolStateError(
        f"{kind} state {names(old).name} -> {names(new).name} is not a valid transition"
    )
