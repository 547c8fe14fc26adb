"""A process's view of the key store: cached lookups, reserve/settle, merge-back.

:class:`KeyService` lives as long as its store (it belongs to the
:class:`~relay.runtime.Runtime`, shared by config generations):

- **Lookups** come from a per-process map of secret hash -> record. A
  background check reads the store's generation counter every
  ``REFRESH_INTERVAL`` seconds and reloads the records when it moved, so a
  revocation or edit made anywhere reaches this process well within 1 s.
  An unknown hash is looked up in the store once (a key created a moment
  ago elsewhere) and remembered as unknown for a short while.
- **Reserve** goes to the store (one atomic step). When the store cannot
  answer, this process decides alone from the last state it saw, so
  admission keeps working (each instance then enforces limits on its own
  until the store is back).
- **Settle** adds a finished request's exact usage to a per-key sum that is
  written every ``FLUSH_INTERVAL`` seconds as one settlement (which also
  releases the requests' reservations: until then they still hold their
  reserved amount, which only errs on the safe side). A settlement the
  store could not take is kept and merged back when it answers again. Each
  has a unique id and the store applies an id once, so a retry never
  doubles.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from .buckets import KeyState, apply_settlement, decide
from .model import KeyRecord
from .store import KeyStore, Reservation, ReserveResult, Settlement, StoreUnavailable

__all__ = ["KeyService"]

log = logging.getLogger("relay.keys")

REFRESH_INTERVAL = 0.3  # seconds between generation checks
# Settled usage is written this often, one write per key: the store's load
# does not grow with the request rate, and a kill -9 loses at most this much.
FLUSH_INTERVAL = 0.2
MERGE_INTERVAL = 0.5  # seconds between merge-back attempts while some wait
_MISS_TTL = 0.5  # an unknown hash is asked again after this
_MISS_MAX = 4096
_PENDING_MAX = 200_000


class _Delta:
    """What one key's finished requests used since the last flush."""

    __slots__ = ("cost", "prompt", "completion", "requests", "reservations", "tpm")

    def __init__(self, tpm: int) -> None:
        self.cost = 0.0
        self.prompt = 0
        self.completion = 0
        self.requests = 0
        self.reservations: list[str] = []
        self.tpm = tpm


class KeyService:
    """Cached key lookups and reserve/settle with outage handling, for one store."""

    def __init__(
        self,
        store: KeyStore,
        loop: asyncio.AbstractEventLoop,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.loop = loop
        self._tasks: set[asyncio.Task[Any]] = set()
        self._clock = clock
        self._by_hash: dict[str, KeyRecord] = {}
        self._misses: dict[str, float] = {}
        self._generation: int | None = None
        self._pending: list[Settlement] = []
        self._deltas: dict[tuple[str, int], _Delta] = {}
        self._flush_timer: asyncio.TimerHandle | None = None
        self._merging = False
        self._local: dict[str, KeyState] = {}  # while the store is away
        self._seen: dict[str, float] = {}  # committed USD per key, as last seen
        self._refresher: asyncio.Task[None] | None = None
        self._closed = False
        self._store_down_logged = False

    # -- lookups ------------------------------------------------------------
    def start(self) -> None:
        if self._refresher is None and not self._closed:
            self._refresher = self.loop.create_task(self._refresh_loop(), name="relay-keys-refresh")

    async def _refresh_loop(self) -> None:
        while not self._closed:
            try:
                await self.refresh()
            except StoreUnavailable:
                pass  # keep serving from the cache
            except Exception:  # never let the refresher die
                log.exception("keys: refreshing the key cache failed")
            await asyncio.sleep(REFRESH_INTERVAL)

    async def refresh(self, force: bool = False) -> None:
        """Reload every record when the store's generation moved."""
        generation = await self.store.generation()
        if not force and generation == self._generation:
            return
        records = await self.store.list()
        self._by_hash = {r.secret_sha256: r for r in records}
        self._misses.clear()
        self._generation = generation

    def cached(self, secret_sha256: str) -> KeyRecord | None:
        return self._by_hash.get(secret_sha256)

    async def lookup(self, secret_sha256: str) -> KeyRecord | None:
        record = self._by_hash.get(secret_sha256)
        if record is not None:
            return record
        now = time.monotonic()
        until = self._misses.get(secret_sha256)
        if until is not None and until > now:
            return None
        try:
            record = await self.store.by_hash(secret_sha256)
        except StoreUnavailable:
            return None
        if record is None:
            if len(self._misses) >= _MISS_MAX:
                self._misses.clear()
            self._misses[secret_sha256] = now + _MISS_TTL
            return None
        self._by_hash[secret_sha256] = record
        return record

    def changed(self, record: KeyRecord, old_hash: str | None = None) -> None:
        """A record changed through this process: apply it at once."""
        if old_hash is not None:
            self._by_hash.pop(old_hash, None)
        self._by_hash[record.secret_sha256] = record
        self._misses.pop(record.secret_sha256, None)

    def forget(self, record: KeyRecord) -> None:
        self._by_hash.pop(record.secret_sha256, None)

    # -- reserve / settle ---------------------------------------------------
    async def reserve(self, record: KeyRecord, reservation: Reservation) -> tuple[ReserveResult, bool]:
        """``(result, local)``; ``local`` when decided without the store."""
        try:
            result = await self.store.reserve(record, reservation)
        except StoreUnavailable as exc:
            self._store_down(exc)
            return self._reserve_locally(record, reservation), True
        self._seen[record.id] = result.committed
        if self._local and not self._pending:
            self._local.pop(record.id, None)
        return result, False

    def _reserve_locally(self, record: KeyRecord, reservation: Reservation) -> ReserveResult:
        state = self._local.get(record.id)
        if state is None:
            if len(self._local) >= 100_000:
                self._local.clear()
            state = self._local[record.id] = KeyState(
                period=reservation.period, spend=self._seen.get(record.id, 0.0)
            )
        return decide(state, record.budget_usd, record.rpm, record.tpm, reservation, self._clock())

    def settle(
        self,
        key_id: str,
        reservation: Reservation | None,
        local: bool,
        cost: float,
        prompt: int,
        completion: int,
        period: int,
        tpm: int,
    ) -> None:
        """Count one finished request; written to the store within
        ``FLUSH_INTERVAL`` seconds, together with this key's others."""
        if local:
            state = self._local.get(key_id)
            if state is not None:
                held = (reservation.cost, reservation.tokens) if reservation is not None else None
                apply_settlement(state, held, cost, prompt, completion, period, tpm)
        slot = (key_id, period)
        delta = self._deltas.get(slot)
        if delta is None:
            delta = self._deltas[slot] = _Delta(tpm)
        delta.cost += cost
        delta.prompt += prompt
        delta.completion += completion
        delta.requests += 1
        delta.tpm = tpm
        if reservation is not None:
            # Named even when admitted locally: a reserve that timed out may
            # still have reached the store, and this releases it there too.
            delta.reservations.append(reservation.id)
        if self._flush_timer is None and not self._closed:
            self._flush_timer = self.loop.call_later(FLUSH_INTERVAL, self._flush)

    def _flush(self) -> None:
        """Write what the requests of the last interval used, one settlement per key."""
        self._flush_timer = None
        deltas, self._deltas = self._deltas, {}
        for (key_id, period), d in deltas.items():
            settlement = Settlement(
                self.new_id(), key_id, tuple(d.reservations), d.cost, d.prompt, d.completion,
                d.requests, period, d.tpm,
            )
            if self._pending:
                self._queue(settlement)  # keep order behind what waits already
            else:
                self._spawn(self._settle(settlement))

    async def _settle(self, settlement: Settlement) -> None:
        try:
            await self.store.settle(settlement)
        except StoreUnavailable as exc:
            self._store_down(exc)
            self._queue(settlement)

    def _queue(self, settlement: Settlement) -> None:
        if len(self._pending) >= _PENDING_MAX:
            log.error("keys: %d settlements wait for the store; dropping the oldest", len(self._pending))
            del self._pending[: _PENDING_MAX // 10]
        self._pending.append(settlement)
        if not self._merging:
            self._merging = True
            self._spawn(self._merge_back())

    async def _merge_back(self) -> None:
        try:
            while self._pending and not self._closed:
                await asyncio.sleep(MERGE_INTERVAL)
                while self._pending:
                    settlement = self._pending[0]
                    try:
                        await self.store.settle(settlement)
                    except StoreUnavailable:
                        break
                    self._pending.pop(0)
                if not self._pending:
                    log.info("keys: store is back; spend recorded meanwhile is merged")
                    self._store_down_logged = False
                    self._local.clear()
        finally:
            self._merging = False

    @property
    def pending(self) -> int:
        """Settlements waiting for the store."""
        return len(self._pending)

    def _store_down(self, exc: StoreUnavailable) -> None:
        if not self._store_down_logged:
            self._store_down_logged = True
            log.warning("keys: store unavailable (%s); admitting from this process's cache", exc)

    def _spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex

    async def flush(self, timeout: float = 5.0) -> None:
        """Wait (bounded) until settlements that wait for the store reached it."""
        deadline = time.monotonic() + timeout
        while self._pending and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        # Settlements on their way finish first (bounded): spend answered
        # before a stop is never lost.
        if self._flush_timer is not None:
            self._flush_timer.cancel()
        self._flush()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5.0)
        await self.flush(timeout=2.0)
        self._closed = True
        task, self._refresher = self._refresher, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.store.close()
