"""The exchange that relays one upstream response, as the rest of relay takes it.

:class:`ProxyExchange` has two twins of identical behaviour, one source:
``_exchange_py`` (pure Python) and ``_exchange_c`` (the same source compiled
by Cython with ``_exchange_c.pxd``: a ``cdef class`` with typed fields). This
module takes the one :func:`relay._fast.twin` chooses, as
``relay.upstream.protocol`` does for the connection: the compiled one unless
``RELAY_NO_EXTENSIONS`` is set or it was not built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import _fast

__all__ = [
    "ACCEPT_IDENTITY",
    "IMPLEMENTATION",
    "ExchangeObserver",
    "Outcome",
    "ProxyExchange",
    "stream_cut_event",
]

# Only the chosen twin is imported.
_chosen = _fast.twin("relay.upstream._exchange_py", "relay.upstream._exchange_c")
# "compiled" or "pure": which twin relays responses in this process.
IMPLEMENTATION: str = _fast.implementation_of(_chosen)

if TYPE_CHECKING:
    # The pure source is the typing reference for both twins.
    from ._exchange_py import (
        ACCEPT_IDENTITY,
        ExchangeObserver,
        Outcome,
        ProxyExchange,
        stream_cut_event,
    )
else:
    ACCEPT_IDENTITY = _chosen.ACCEPT_IDENTITY
    ExchangeObserver = _chosen.ExchangeObserver
    Outcome = _chosen.Outcome
    ProxyExchange = _chosen.ProxyExchange
    stream_cut_event = _chosen.stream_cut_event

del _chosen
