"""The short hash that stands for a credential in usage rows and request logs."""

from __future__ import annotations

from .. import _fast

__all__ = ["KeyHashes"]


class KeyHashes:
    """Credential -> short hash, memoized (bounded).

    Most traffic comes from a few keys, and hashing per request showed in
    profiles. The memo holds at most ``limit`` credentials and starts over
    when full (an attacker cycling keys costs a hash each, as without it).
    """

    __slots__ = ("_known", "_limit")

    def __init__(self, limit: int = 4096) -> None:
        self._known: dict[bytes, str] = {}
        self._limit = limit

    def of(self, credential: bytes) -> str:
        known = self._known.get(credential)
        if known is None:
            if len(self._known) >= self._limit:
                self._known.clear()
            known = self._known[credential] = _fast.credential_hash(credential).decode()
        return known
