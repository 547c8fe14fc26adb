"""The upstream connection, as the rest of relay takes it.

:class:`UpstreamConnection` has two twins of identical behaviour, one
source: ``_conn_py`` (pure Python) and ``_conn_c`` (the same source compiled
by Cython with ``_conn_c.pxd``: a ``cdef class`` with typed fields). This
module takes the one :func:`relay._fast.twin` chooses (the compiled one
unless ``RELAY_NO_EXTENSIONS`` is set or it was not built). The error and
the sink interface are shared by both (``sink``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import _fast
from .sink import ResponseSink, UpstreamError

__all__ = ["IMPLEMENTATION", "ResponseSink", "UpstreamConnection", "UpstreamError"]

# Only the chosen twin is imported.
_chosen = _fast.twin("relay.upstream._conn_py", "relay.upstream._conn_c")
# "compiled" or "pure": which twin serves upstream connections in this process.
IMPLEMENTATION: str = _fast.implementation_of(_chosen)

if TYPE_CHECKING:
    # The pure source is the typing reference for both twins.
    from ._conn_py import UpstreamConnection
else:
    UpstreamConnection = _chosen.UpstreamConnection

del _chosen
