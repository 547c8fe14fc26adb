"""The parsed client request, as the rest of relay takes it.

:class:`Request` has two twins of identical behaviour, one source:
``_request_py`` (pure Python) and ``_request_c`` (the same source compiled by
Cython with ``_request_c.pxd``: a ``cdef class`` with typed fields). This
module takes the one :func:`relay._fast.twin` chooses: the compiled one
unless ``RELAY_NO_EXTENSIONS`` is set or it was not built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import _fast

__all__ = ["IMPLEMENTATION", "VARYING_HEADERS", "Request"]

# Only the chosen twin is imported.
_chosen = _fast.twin("relay.http._request_py", "relay.http._request_c")
# "compiled" or "pure": which twin holds requests in this process.
IMPLEMENTATION: str = _fast.implementation_of(_chosen)

if TYPE_CHECKING:
    # The pure source is the typing reference for both twins.
    from ._request_py import VARYING_HEADERS, Request
else:
    VARYING_HEADERS = _chosen.VARYING_HEADERS
    Request = _chosen.Request

del _chosen
