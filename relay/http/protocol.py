"""The client connection, as the rest of relay takes it.

:class:`ClientConnection` has two twins of identical behaviour, one
source: ``_client_py`` (pure Python) and ``_client_c`` (the same source
compiled by Cython with ``_client_c.pxd``: a ``cdef class`` whose states,
offsets and sizes are C ints). This module takes the one
:func:`relay._fast.twin` chooses (the compiled one unless
``RELAY_NO_EXTENSIONS`` is set or it was not built), with its
:class:`ConnectionLimits`; the states, their transition tables and the
error a refused transition raises are shared by both (``states``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import _fast
from .._fast import HOP_BY_HOP as HOP_BY_HOP
from .flow import FlowListener
from .states import (
    ANSWER_MOVES,
    CONN_MOVES,
    READ_MOVES,
    AnswerState,
    ConnState,
    ProtocolStateError,
    ReadState,
)

__all__ = [
    "ANSWER_MOVES",
    "CONN_MOVES",
    "HOP_BY_HOP",
    "IMPLEMENTATION",
    "MAX_HEADERS",
    "MAX_PIPELINED",
    "READ_MOVES",
    "WRITE_HIGH_WATER",
    "WRITE_LOW_WATER",
    "AnswerState",
    "ClientConnection",
    "ConnState",
    "ConnectionLimits",
    "FlowListener",
    "Handler",
    "ProtocolStateError",
    "ReadState",
]

# Only the chosen twin is imported.
_chosen = _fast.twin("relay.http._client_py", "relay.http._client_c")
# "compiled" or "pure": which twin serves connections in this process.
IMPLEMENTATION: str = _fast.implementation_of(_chosen)

if TYPE_CHECKING:
    # The pure source is the typing reference for both twins.
    from ._client_py import (
        MAX_HEADERS,
        MAX_PIPELINED,
        WRITE_HIGH_WATER,
        WRITE_LOW_WATER,
        ClientConnection,
        ConnectionLimits,
        Handler,
    )
else:
    ClientConnection = _chosen.ClientConnection
    ConnectionLimits = _chosen.ConnectionLimits
    Handler = _chosen.Handler
    MAX_HEADERS = _chosen.MAX_HEADERS
    MAX_PIPELINED = _chosen.MAX_PIPELINED
    WRITE_HIGH_WATER = _chosen.WRITE_HIGH_WATER
    WRITE_LOW_WATER = _chosen.WRITE_LOW_WATER

del _chosen
