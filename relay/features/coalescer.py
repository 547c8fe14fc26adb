"""Request coalescing, as the rest of relay takes it.

The leader, the follower and the coalescer have two twins of identical
behaviour, one source: ``_coalescer_py`` (pure Python) and ``_coalescer_c``
(the same source compiled by Cython with ``_coalescer_c.pxd``: ``cdef
class`` es with typed fields). This module takes the one
:func:`relay._fast.twin` chooses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import _fast

__all__ = ["IMPLEMENTATION", "OPEN", "Coalescer", "FlightAborted", "Follower", "Leader"]

# Only the chosen twin is imported.
_chosen = _fast.twin("relay.features._coalescer_py", "relay.features._coalescer_c")
# "compiled" or "pure": which twin coalesces misses in this process.
IMPLEMENTATION: str = _fast.implementation_of(_chosen)

if TYPE_CHECKING:
    # The pure source is the typing reference for both twins.
    from ._coalescer_py import OPEN, Coalescer, FlightAborted, Follower, Leader
else:
    OPEN = _chosen.OPEN
    Coalescer = _chosen.Coalescer
    FlightAborted = _chosen.FlightAborted
    Follower = _chosen.Follower
    Leader = _chosen.Leader

del _chosen
