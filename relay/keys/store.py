"""The key store interface, shared by the SQLite and Redis backends.

A store keeps key records (settings and the secret's SHA-256), each key's
counters, its ``rpm``/``tpm`` buckets and its outstanding reservations.
``reserve`` and ``settle`` are each one atomic step on the store (one
transaction on SQLite, one Lua script on Redis), so budgets and token
limits hold across every worker and instance sharing it.

A reservation holds ``tokens`` and ``cost`` until it is settled; one that
is never settled (its process was killed) lapses after ``lease`` seconds,
so a crash cannot block a budget for good.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .model import KeyRecord, KeySpend

__all__ = ["KeyStore", "Reservation", "ReserveResult", "Settlement", "StoreUnavailable"]

# Seconds an unsettled reservation keeps its place (a streamed answer may
# run long; a killed process's reservations lapse after this).
LEASE_SECONDS = 900.0


class StoreUnavailable(Exception):
    """The store could not answer this call (Redis down, SQLite locked too long)."""


@dataclass(frozen=True, slots=True)
class Reservation:
    """What one request holds until it ends."""

    id: str
    tokens: int
    cost: float
    period: int  # start of the budget period it was made in (0: lifetime)
    requests: int = 1  # rpm tokens taken (a process's allowance holds several)


@dataclass(frozen=True, slots=True)
class ReserveResult:
    """``reason`` is None when granted, else ``budget`` | ``rpm`` | ``tpm``.

    ``retry_after`` is in seconds; ``*_remaining`` are whole units left in
    the buckets (-1 when the key has no such limit); ``*_reset`` the
    seconds until that bucket is full again. ``committed`` is the period's
    spend plus outstanding reservations after this call; ``spend`` the
    period's spend alone (where a process's view starts while the store
    cannot answer).
    """

    reason: str | None
    retry_after: float = 0.0
    rpm_remaining: int = -1
    tpm_remaining: int = -1
    rpm_reset: float = 0.0
    tpm_reset: float = 0.0
    committed: float = 0.0
    spend: float = 0.0


@dataclass(frozen=True, slots=True)
class Settlement:
    """The exact outcome of one or more finished requests of one key,
    replacing their reservations.

    A process adds up what its requests used and writes it every fraction
    of a second as one settlement per key (``requests`` of them), so the
    store takes one write per key and interval, not one per request.
    ``reservation_ids`` are the reservations to release (unknown or lapsed
    ones are skipped: a request admitted while the store was away had none).
    """

    id: str  # unique per settlement: applying it twice changes nothing
    key_id: str
    reservation_ids: tuple[str, ...]
    cost: float
    prompt_tokens: int
    completion_tokens: int
    requests: int
    period: int
    tpm: int  # the key's tpm (0: none), to give back what was reserved but not used
    rpm: int = 0  # the key's rpm (0: none)
    rpm_refund: int = 0  # requests reserved but never made, given back to the rpm bucket


class KeyStore(Protocol):
    """What admission, the admin API and the CLI need from a backend."""

    kind: str

    async def create(self, record: KeyRecord) -> None: ...

    async def get(self, key_id: str) -> KeyRecord | None: ...

    async def by_hash(self, secret_sha256: str) -> KeyRecord | None: ...

    async def list(self) -> list[KeyRecord]: ...

    async def update(self, record: KeyRecord, old_hash: str | None = None) -> None:
        """Replace a record (settings, revocation, a new secret hash)."""

    async def delete(self, key_id: str) -> None: ...

    async def spend(self, key_id: str, period: int) -> KeySpend: ...

    async def generation(self) -> int:
        """A number that changes whenever any key record changes."""

    async def reserve(self, record: KeyRecord, reservation: Reservation) -> ReserveResult: ...

    async def settle(self, settlement: Settlement) -> None: ...

    async def close(self) -> None: ...
