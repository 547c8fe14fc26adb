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
  answer, this process decides alone from its own view: the period's spend
  the store last reported, plus what this process recorded since and has
  not yet seen the store take, plus what this process holds reserved
  (budget); its last bucket levels, refilled (rpm, tpm). So admission keeps
  working (each instance then enforces limits on its own until the store is
  back). Until the store took this process's releases again, a budget
  refusal from the store may only reflect reservations this process is
  giving back; it is then decided from the same view.
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
from collections.abc import Callable
from typing import Any

from .. import debug
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
_REFUSAL_HOLD = 0.1  # seconds a store refusal is repeated without asking again


class _Delta:
    """What one key's finished requests used since the last flush."""

    __slots__ = ("cost", "prompt", "completion", "requests", "reservations", "tpm", "rpm",
                 "rpm_refund", "period")

    def __init__(self, tpm: int, rpm: int, period: int = 0) -> None:
        self.period = period
        self.cost = 0.0
        self.prompt = 0
        self.completion = 0
        self.requests = 0
        self.reservations: list[str] = []
        self.tpm = tpm
        self.rpm = rpm
        self.rpm_refund = 0


class Allowance:
    """Room this process reserved in the store for several requests of one key.

    Requests draw from it without a store round trip; when it cannot cover
    one, a new allowance is reserved and this one is released (store-side)
    once its last request settled. Its size is a small part of each limit
    (see ``_allowance_size``), so what one process holds and does not use
    is bounded, and it is given back within two ``FLUSH_INTERVAL``s once
    idle (no request drew from it during one whole interval).
    """

    __slots__ = ("reservation", "cost", "tokens", "requests", "outstanding", "open",
                 "released", "rpm", "tpm", "since", "drawn", "low", "_low_requests",
                 "_low_tokens", "_low_cost")

    def __init__(self, reservation: Reservation, rpm: int, tpm: int, since: float = 0.0) -> None:
        self.reservation = reservation
        self.since = since  # time.monotonic() when it was reserved
        self.cost = reservation.cost
        self.tokens = reservation.tokens
        self.requests = reservation.requests
        self.outstanding = 0
        self.open = True
        self.released = False
        self.rpm = rpm
        self.tpm = tpm
        # A request drew from it since the last flush: it is in use, even
        # when none is outstanding at that moment (cache hits settle at once).
        self.drawn = False
        # Half or less left (see running_low), set by take: the marks are
        # worked out once here, not per request. -1 is a mark never reached.
        self.low = False
        sizeable = reservation.requests >= 4
        self._low_requests = reservation.requests // 2 if sizeable else -1
        self._low_tokens = reservation.tokens // 2 if sizeable and reservation.tokens > 0 else -1
        self._low_cost = reservation.cost / 2 if sizeable and reservation.cost > 0 else -1.0

    @property
    def running_low(self) -> bool:
        """Half or less left of a sizeable allowance: time to get the next.

        Half, not less: under load the store's answer takes a while (its
        thread waits for the loop's turn to run), and requests that find the
        allowance spent before the next one came wait for the store.
        """
        return (
            self.requests <= self._low_requests
            or self.tokens <= self._low_tokens
            or self.cost <= self._low_cost
        )

    def take(self, tokens: int, cost: float, period: int) -> bool:
        if (
            not self.open
            or self.requests < 1
            or tokens > self.tokens
            or cost > self.cost + 1e-12
            or period != self.reservation.period
        ):
            return False
        self.requests -= 1
        self.tokens -= tokens
        self.cost -= cost
        self.outstanding += 1
        self.drawn = True
        if not self.low and (
            self.requests <= self._low_requests
            or self.tokens <= self._low_tokens
            or self.cost <= self._low_cost
        ):
            self.low = True  # running_low, kept: what is left only shrinks
        return True


# An allowance covers at most this many requests, and at most this part of
# the key's rpm, tpm or budget: small limits are checked request by request.
_ALLOWANCE_MAX = 256
_ALLOWANCE_SHARE = 20
# A key whose allowance was spent within ``_ALLOWANCE_FAST`` seconds gets one
# twice as large next (up to ``_ALLOWANCE_CEILING`` requests, and still
# within the share above): a busy key then asks the store a few times a
# second, not once per ``_ALLOWANCE_MAX`` requests. An idle one goes back.
_ALLOWANCE_CEILING = 4096
_ALLOWANCE_FAST = 0.25


def _allowance_size(record: KeyRecord, tokens: int, cost: float, most: int = _ALLOWANCE_MAX) -> int:
    size = most
    if record.rpm:
        size = min(size, record.rpm // _ALLOWANCE_SHARE)
    if record.tpm and tokens:
        size = min(size, record.tpm // (_ALLOWANCE_SHARE * tokens))
    if record.budget_usd is not None and cost > 0:
        size = min(size, int(record.budget_usd / (_ALLOWANCE_SHARE * cost)))
    return max(1, size)


class KeyService:
    """Cached key lookups and reserve/settle with outage handling, for one store."""

    @debug.opens("key_services")
    def __init__(
        self,
        store: KeyStore,
        loop: asyncio.AbstractEventLoop,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.loop = loop
        self._tasks: set[asyncio.Task[Any]] = set()
        self._settling: set[asyncio.Task[Any]] = set()  # settlements on their way
        self._clock = clock
        self._by_hash: dict[str, KeyRecord] = {}
        self._misses: dict[str, float] = {}
        self._generation: int | None = None
        self._pending: list[Settlement] = []
        self._deltas: dict[tuple[str, int], _Delta] = {}
        # key id -> its latest entry of _deltas: a settle finds it without
        # building the (key, period) slot (emptied with _deltas).
        self._key_deltas: dict[str, _Delta] = {}
        self._allowances: dict[str, Allowance] = {}
        self._sizes: dict[str, int] = {}  # key id -> its allowance size, when grown
        self._acquiring: dict[str, asyncio.Future[None]] = {}
        # key id -> (until, refusal, its tokens, its cost): a store refusal
        # repeated for a moment to requests at least as large.
        self._refused: dict[str, tuple[float, ReserveResult, int, float]] = {}
        self._flush_timer: asyncio.TimerHandle | None = None
        self._merging = False
        self._local: dict[str, KeyState] = {}  # while the store is away
        # key id -> (period, spend base, rpm left, tpm left, when) from the
        # store's last answer; the spend as this process sees it is the base
        # plus ``_recorded`` now (see ``_new_allowance``).
        self._seen: dict[str, tuple[int, float, int, int, float]] = {}
        # USD per key this process recorded (a running total), and the part
        # of it the store has not yet confirmed taking.
        self._recorded: dict[str, float] = {}
        self._unconfirmed: dict[str, float] = {}
        # Reservation releases per key handed to settlements not yet confirmed.
        self._releasing: dict[str, int] = {}
        self._refresher: asyncio.Task[None] | None = None
        self._closed = False
        self._store_down_logged = False

    # -- lookups ------------------------------------------------------------
    def start(self) -> None:
        if self._refresher is None and not self._closed:
            self._refresher = self.loop.create_task(self._refresh_loop(), name="relay-keys-refresh")

    @debug.during("tasks")
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
        if self._generation is not None:
            # Some key changed: allowances reserved under its old settings
            # (a larger budget, a higher rpm) must not outlive the edit.
            self._retire_all()
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
        self._refused.pop(record.id, None)
        allowance = self._allowances.pop(record.id, None)
        if allowance is not None:
            self._retire(record.id, allowance)

    def _retire_all(self) -> None:
        self._refused.clear()
        for key_id, allowance in list(self._allowances.items()):
            del self._allowances[key_id]
            self._retire(key_id, allowance)

    # -- reserve / settle ---------------------------------------------------
    def reserve_now(
        self, record: KeyRecord, tokens: int, cost: float, period: int
    ) -> Allowance | None:
        """The key's allowance when it covers the request (drawn from it, no
        wait), else None: :meth:`reserve` must ask the store."""
        key_id = record.id
        allowance = self._allowances.get(key_id)
        if allowance is not None and allowance.take(tokens, cost, period):
            if allowance.low and key_id not in self._acquiring:
                # Reserve the next one while this one still serves, so a
                # steady stream of requests never waits for the store.
                # Marked before the task runs: the requests that arrive until
                # it does must not each spawn one of their own.
                done = self._acquiring[key_id] = self.loop.create_future()
                task = self._spawn(self._prefetch(record, tokens, cost, period))
                task.add_done_callback(lambda _: self._acquired(key_id, done))
            return allowance
        return None

    async def reserve(
        self, record: KeyRecord, tokens: int, cost: float, period: int
    ) -> tuple[ReserveResult | None, Allowance | None, Reservation | None]:
        """Admit one request of ``tokens`` and ``cost``.

        Returns ``(refusal, allowance, local_reservation)``: a refusal (None
        when admitted); the allowance it was drawn from (None when decided
        locally because the store could not answer, then
        ``local_reservation`` is what was held locally).
        """
        key_id = record.id
        allowance = self.reserve_now(record, tokens, cost, period)
        if allowance is not None:
            return None, allowance, None
        refused = self._refused.get(key_id)
        if refused is not None:
            until, refusal, least_tokens, least_cost = refused
            if time.monotonic() < until and (
                refusal.reason == "rpm" or (tokens >= least_tokens and cost >= least_cost)
            ):
                # Refused a moment ago and nothing this small got in since:
                # answer the same without asking the store again, so a flood
                # of over-limit requests costs the store nothing.
                return refusal, None, None
            del self._refused[key_id]
        # One new allowance at a time per key: a burst of requests that find
        # the old one spent waits for the one being reserved instead of each
        # reserving its own (which would hold far more than the burst needs).
        acquiring = self._acquiring.get(key_id)
        while acquiring is not None:
            await asyncio.shield(acquiring)
            allowance = self._allowances.get(key_id)
            if allowance is not None and allowance.take(tokens, cost, period):
                return None, allowance, None
            acquiring = self._acquiring.get(key_id)
        done = self._acquiring[key_id] = self.loop.create_future()
        try:
            return await self._new_allowance(record, tokens, cost, period)
        finally:
            del self._acquiring[key_id]
            done.set_result(None)

    async def _prefetch(self, record: KeyRecord, tokens: int, cost: float, period: int) -> None:
        await self._new_allowance(record, tokens, cost, period, for_request=False)

    def _acquired(self, key_id: str, done: asyncio.Future[None]) -> None:
        """A prefetch ended (even cancelled before it ran): the next may start."""
        if self._acquiring.get(key_id) is done:
            del self._acquiring[key_id]
        if not done.done():
            done.set_result(None)

    async def _new_allowance(
        self, record: KeyRecord, tokens: int, cost: float, period: int, for_request: bool = True
    ) -> tuple[ReserveResult | None, Allowance | None, Reservation | None]:
        previous = self._allowances.get(record.id)
        most = self._sizes.get(record.id, _ALLOWANCE_MAX)
        if previous is not None and time.monotonic() - previous.since < _ALLOWANCE_FAST:
            most = min(most * 2, _ALLOWANCE_CEILING)
            if len(self._sizes) >= _MISS_MAX:
                self._sizes.clear()
            self._sizes[record.id] = most
        size = _allowance_size(record, tokens, cost, most)
        reservation = Reservation(self.new_id(), tokens * size, cost * size, period, size)
        # What the store's answer cannot contain yet: what this process
        # recorded from now on, and (unless the store took it before this
        # call ran: then it is counted twice, on the safe side) what it has
        # recorded but the store has not yet confirmed.
        mark = self._recorded.get(record.id, 0.0) - self._unconfirmed.get(record.id, 0.0)
        try:
            result = await self.store.reserve(record, reservation)
            if result.reason is not None and size > 1 and for_request:
                # Not room for a whole allowance: this one request may still fit.
                size = 1
                reservation = Reservation(self.new_id(), tokens, cost, period, 1)
                result = await self.store.reserve(record, reservation)
        except StoreUnavailable as exc:
            self._store_down(exc)
            # A reserve that timed out may still have reached the store:
            # release it there with the next settlement.
            self._orphan(record, reservation.id, period)
            if not for_request:
                return None, None, None
            one = Reservation(reservation.id, tokens, cost, period, 1)
            refusal = self._reserve_locally(record, one)
            return (refusal if refusal.reason is not None else None), None, one
        self._seen[record.id] = (
            period, result.spend - mark, result.rpm_remaining, result.tpm_remaining, self._clock()
        )
        if self._local and not self._pending:
            self._local.pop(record.id, None)
        if result.reason == "budget" and for_request and self._releasing.get(record.id):
            # The store still holds reservations this process is giving back
            # (released by settlements not yet written, or waiting since an
            # outage). Hand them back now and ask the store again: only the
            # store sees the other processes' reservations, so deciding from
            # this process's view here would let two of them overspend.
            if await self._hand_back_now():
                reservation = Reservation(self.new_id(), tokens, cost, period, 1)
                try:
                    result = await self.store.reserve(record, reservation)
                except StoreUnavailable as exc:
                    self._store_down(exc)
                    self._orphan(record, reservation.id, period)
                    refusal = self._reserve_locally(record, reservation)
                    return (refusal if refusal.reason is not None else None), None, reservation
                self._seen[record.id] = (
                    period, result.spend - mark, result.rpm_remaining, result.tpm_remaining,
                    self._clock(),
                )
            else:
                # The store took no writes just now: it is away again, and
                # this process decides alone until it is back.
                one = Reservation(reservation.id, tokens, cost, period, 1)
                refusal = self._reserve_locally(record, one)
                if refusal.reason is None:
                    return None, None, one
                return refusal, None, None
        if result.reason is not None:
            if for_request:
                hold = min(_REFUSAL_HOLD, result.retry_after or _REFUSAL_HOLD)
                self._refused[record.id] = (time.monotonic() + hold, result, tokens, cost)
            return result, None, None
        self._refused.pop(record.id, None)
        fresh = Allowance(reservation, record.rpm or 0, record.tpm or 0, time.monotonic())
        if for_request:
            fresh.take(tokens, cost, period)
        previous = self._allowances.get(record.id)
        self._allowances[record.id] = fresh
        if previous is not None:
            self._retire(record.id, previous)
        return None, fresh, None

    def _reserve_locally(self, record: KeyRecord, reservation: Reservation) -> ReserveResult:
        """Decide from this process's view (the store's last answer and what
        this process did since); see the module docstring."""
        key_id = record.id
        seen = self._seen.get(key_id)
        state = self._local.get(key_id)
        if state is None:
            if len(self._local) >= 100_000:
                self._local.clear()
            state = self._local[key_id] = KeyState(period=reservation.period)
            if seen is not None:
                _, _, rpm_left, tpm_left, when = seen
                if record.rpm and rpm_left >= 0:
                    state.rpm_tokens, state.rpm_ts = float(rpm_left), when
                if record.tpm and tpm_left >= 0:
                    state.tpm_tokens, state.tpm_ts = float(tpm_left), when
        if seen is not None and seen[0] == reservation.period:
            spend = seen[1] + self._recorded.get(key_id, 0.0)
        else:  # nothing seen in this period: what this process has not yet seen taken
            spend = self._unconfirmed.get(key_id, 0.0)
        state.period = reservation.period
        state.spend = spend
        held = 0.0  # what this process's allowance of the key still holds
        allowance = self._allowances.get(key_id)
        if allowance is not None and allowance.open and allowance.reservation.period == state.period:
            full = allowance.reservation
            held = allowance.cost + allowance.outstanding * full.cost / max(1, full.requests)
        state.reserved += held
        try:
            return decide(state, record.budget_usd, record.rpm, record.tpm, reservation, self._clock())
        finally:
            state.reserved = max(0.0, state.reserved - held)

    def _retire(self, key_id: str, allowance: Allowance) -> None:
        """No new request draws from it; released once its last one settled."""
        allowance.open = False
        if allowance.outstanding == 0:
            self._release(key_id, allowance)

    def _release(self, key_id: str, allowance: Allowance) -> None:
        if allowance.released:
            return
        allowance.released = True
        delta = self._delta(key_id, allowance.reservation.period, allowance.tpm, allowance.rpm)
        delta.reservations.append(allowance.reservation.id)
        self._releasing[key_id] = self._releasing.get(key_id, 0) + 1
        delta.rpm_refund += allowance.requests

    def _orphan(self, record: KeyRecord, reservation_id: str, period: int) -> None:
        delta = self._delta(record.id, period, record.tpm or 0, record.rpm or 0)
        delta.reservations.append(reservation_id)
        self._releasing[record.id] = self._releasing.get(record.id, 0) + 1

    def _delta(self, key_id: str, period: int, tpm: int, rpm: int) -> _Delta:
        slot = (key_id, period)
        delta = self._deltas.get(slot)
        if delta is None:
            delta = self._deltas[slot] = _Delta(tpm, rpm, period)
        self._key_deltas[key_id] = delta
        if self._flush_timer is None and not self._closed:
            self._flush_timer = self.loop.call_later(FLUSH_INTERVAL, self._flush)
        return delta

    def settle(
        self,
        record: KeyRecord,
        allowance: Allowance | None,
        local: Reservation | None,
        cost: float,
        prompt: int,
        completion: int,
        period: int,
    ) -> None:
        """Count one finished request; written to the store within
        ``FLUSH_INTERVAL`` seconds, together with this key's others."""
        key_id = record.id
        if local is not None:
            state = self._local.get(key_id)
            if state is not None:
                apply_settlement(state, (local.cost, local.tokens), cost, prompt, completion,
                                 period, record.tpm or 0)
        # The key's current entry while it stays the one of this period
        # (while it is in _deltas, the flush timer is armed).
        delta = self._key_deltas.get(key_id)
        if delta is None or delta.period != period:
            delta = self._delta(key_id, period, record.tpm or 0, record.rpm or 0)
        delta.cost += cost
        if cost:
            self._recorded[key_id] = self._recorded.get(key_id, 0.0) + cost
            self._unconfirmed[key_id] = self._unconfirmed.get(key_id, 0.0) + cost
        delta.prompt += prompt
        delta.completion += completion
        delta.requests += 1
        if allowance is not None:
            allowance.outstanding -= 1
            if not allowance.open and allowance.outstanding == 0:
                self._release(key_id, allowance)

    def _flush(self, hand_back: bool = False) -> None:
        """Write what the requests of the last interval used, one settlement
        per key. ``hand_back``: every allowance no request holds goes back
        too, even one drawn from a moment ago."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        # Idle allowances go back now, so other instances can use their room.
        # One drawn from during the interval, with room left, stays: a
        # steady stream of requests that each end at once (cache hits) would
        # otherwise give it back every interval and reserve a new one (a
        # store round trip the requests meanwhile wait for).
        held = False
        for key_id, allowance in list(self._allowances.items()):
            if allowance.outstanding == 0 and (
                hand_back or not allowance.drawn or allowance.requests < 1
            ):
                del self._allowances[key_id]
                self._sizes.pop(key_id, None)
                self._retire(key_id, allowance)
            else:
                allowance.drawn = False
                held = True
        if self._flush_timer is not None:  # _retire scheduled one: this flush covers it
            self._flush_timer.cancel()
            self._flush_timer = None
        if held and not self._closed:  # the next flush gives back what stays idle
            self._flush_timer = self.loop.call_later(FLUSH_INTERVAL, self._flush)
        deltas, self._deltas = self._deltas, {}
        self._key_deltas.clear()
        for (key_id, period), d in deltas.items():
            settlement = Settlement(
                self.new_id(), key_id, tuple(d.reservations), d.cost, d.prompt, d.completion,
                d.requests, period, d.tpm, d.rpm, d.rpm_refund,
            )
            if self._pending:
                self._queue(settlement)  # keep order behind what waits already
            else:
                task = self._spawn(self._settle(settlement))
                self._settling.add(task)
                task.add_done_callback(self._settling.discard)

    async def _hand_back_now(self) -> bool:
        """Write every settlement now (releases included), in order; False
        when the store could not take them all."""
        self._flush(hand_back=True)
        if self._settling:
            await asyncio.wait(list(self._settling), timeout=5.0)
        while self._pending and not self._closed:
            settlement = self._pending[0]
            try:
                await self.store.settle(settlement)
            except StoreUnavailable:
                return False
            if self._pending and self._pending[0] is settlement:
                self._pending.pop(0)
                self._confirmed(settlement)
        return not self._settling

    async def _settle(self, settlement: Settlement) -> None:
        try:
            await self.store.settle(settlement)
        except StoreUnavailable as exc:
            self._store_down(exc)
            self._queue(settlement)
            return
        self._confirmed(settlement)

    def _confirmed(self, settlement: Settlement) -> None:
        """The store took (or will never take) this settlement: this
        process's view no longer adds it on top of the store's."""
        key_id = settlement.key_id
        if settlement.cost:
            left = self._unconfirmed.get(key_id, 0.0) - settlement.cost
            if left > 1e-12:
                self._unconfirmed[key_id] = left
            else:
                self._unconfirmed.pop(key_id, None)
        if settlement.reservation_ids:
            count = self._releasing.get(key_id, 0) - len(settlement.reservation_ids)
            if count > 0:
                self._releasing[key_id] = count
            else:
                self._releasing.pop(key_id, None)

    def _queue(self, settlement: Settlement) -> None:
        if len(self._pending) >= _PENDING_MAX:
            log.error("keys: %d settlements wait for the store; dropping the oldest", len(self._pending))
            for dropped in self._pending[: _PENDING_MAX // 10]:
                self._confirmed(dropped)
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
                    # A budget refusal may have handed it back meanwhile: the
                    # store applies an id once, the queue drops it once.
                    if self._pending and self._pending[0] is settlement:
                        self._pending.pop(0)
                        self._confirmed(settlement)
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

    @debug.spawns("tasks")
    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @staticmethod
    def new_id() -> str:
        import uuid

        return uuid.uuid4().hex

    async def flush(self, timeout: float = 5.0) -> None:
        """Wait (bounded) until settlements that wait for the store reached it."""
        deadline = time.monotonic() + timeout
        while self._pending and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    @debug.closes("key_services")
    async def close(self) -> None:
        # Settlements on their way finish first (bounded): spend answered
        # before a stop is never lost.
        if self._flush_timer is not None:
            self._flush_timer.cancel()
        self._flush()
        self._retire_all()  # whatever is still open goes back
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
