"""The key store backends (SQLite and Redis) through one interface: the same
cases run on both, and the period and field rules they rely on."""

from __future__ import annotations

import calendar
import contextlib
import dataclasses
import os
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from relay.keys.model import (
    KeyError_,
    KeyRecord,
    new_secret,
    parse_fields,
    period_start,
    secret_hash,
)
from relay.keys.redis_store import RedisKeyStore
from relay.keys.sqlite_store import SQLiteKeyStore
from relay.keys.store import LEASE_SECONDS, Reservation, Settlement
from relay.redisconn import RedisConnection
from tests.redis_server import RedisServer


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(params=["sqlite", "redis", "redis-sentinel", "redis-cluster"])
def backend(request: pytest.FixtureRequest, tmp_path: Any) -> Callable[[], Any]:
    """``async with backend() as (store, clock)``; the clock moves time on both.

    The Redis store runs the same cases on one server, behind Sentinel and
    on a three-master cluster (the topologies of tests/conftest.py): its
    scripts touch one key id's hash tag, so they run unchanged on all three.
    """
    kind = request.param
    server = request.getfixturevalue("redis_server") if kind == "redis" else None
    topology: dict[str, Any] = {}
    if kind == "redis-sentinel":
        sentinels = request.getfixturevalue("sentinel_setup")
        topology = {"mode": "sentinel", "addresses": sentinels.addresses,
                    "master_name": sentinels.master_name}  # fmt: skip
    elif kind == "redis-cluster":
        nodes = request.getfixturevalue("cluster_setup")
        topology = {"mode": "cluster", "addresses": nodes.addresses[:1]}

    @contextlib.asynccontextmanager
    async def make() -> AsyncIterator[tuple[Any, Clock]]:
        clock = Clock()
        if kind == "sqlite":
            store: Any = SQLiteKeyStore(os.path.join(str(tmp_path), "keys.db"), clock=clock)
            try:
                yield store, clock
            finally:
                await store.close()
            return
        if topology:
            conn = RedisConnection("localhost:6379", timeout=2.0, **topology)
        else:
            assert server is not None
            conn = RedisConnection(server.address, timeout=2.0)
        await conn.client.flushdb()
        redis_store = RedisKeyStore(conn)
        original = redis_store.reserve

        async def reserve_at_clock(record: KeyRecord, reservation: Reservation) -> Any:
            return await redis_store._reserve_at(record, reservation, repr(clock.now))

        redis_store.reserve = reserve_at_clock  # type: ignore[method-assign]
        try:
            yield redis_store, clock
        finally:
            redis_store.reserve = original  # type: ignore[method-assign]
            await conn.close()

    return make


def _key(key_id: str = "key_a", **fields: Any) -> tuple[KeyRecord, str]:
    secret = new_secret()
    return KeyRecord(id=key_id, name=fields.pop("name", "app"), secret_sha256=secret_hash(secret),
                     created_at=1.0, **fields), secret


def _res(n: int, tokens: int, cost: float, period: int = 0) -> Reservation:
    return Reservation(f"r{n}", tokens, cost, period)


def _recording_reserves(store: Any) -> list[Reservation]:
    """Every reservation *store* is asked for from now on, in order."""
    asked: list[Reservation] = []
    reserve = store.reserve

    async def recorded(record: KeyRecord, reservation: Reservation) -> Any:
        asked.append(reservation)
        return await reserve(record, reservation)

    store.reserve = recorded
    return asked


def _settle(n: int, key: KeyRecord, cost: float, prompt: int, completion: int,
            reservation: str | None = None, period: int = 0) -> Settlement:
    reservations = (f"r{n}",) if reservation is None else ((reservation,) if reservation else ())
    return Settlement(f"s{n}", key.id, reservations, cost, prompt, completion, 1, period,
                      key.tpm or 0)


def test_store_records_round_trip(backend, run):
    async def main() -> None:
        async with backend() as (store, _):
            gen0 = await store.generation()
            record, secret = _key(budget_usd=2.5, budget_period="daily", rpm=10, tpm=1000,
                                  models=("gpt-4o*",), metadata={"team": "search"})
            await store.create(record)
            assert await store.generation() != gen0
            assert await store.get("key_a") == record
            assert await store.by_hash(secret_hash(secret)) == record
            assert await store.by_hash(secret_hash("rk-other")) is None
            assert await store.get("missing") is None
            other, _ = _key("key_b", name="other")
            await store.create(other)
            assert [r.id for r in await store.list()] == ["key_a", "key_b"]
            # Rotation: the new hash finds the key, the old one nothing.
            new = new_secret()
            rotated = KeyRecord(**{**_fields(record), "secret_sha256": secret_hash(new)})
            gen1 = await store.generation()
            await store.update(rotated, old_hash=record.secret_sha256)
            assert await store.generation() != gen1
            assert await store.by_hash(secret_hash(secret)) is None
            assert await store.by_hash(secret_hash(new)) == rotated
            await store.delete("key_b")
            assert [r.id for r in await store.list()] == ["key_a"]

    run(main())


def _fields(record: KeyRecord) -> dict[str, Any]:
    return {f.name: getattr(record, f.name) for f in dataclasses.fields(record) if f.init}


def test_store_budget_refuses_what_does_not_fit(backend, run):
    async def main() -> None:
        async with backend() as (store, _):
            key, _ = _key(budget_usd=0.01)
            await store.create(key)
            assert (await store.reserve(key, _res(1, 100, 0.004))).reason is None
            assert (await store.reserve(key, _res(2, 100, 0.004))).reason is None
            refused = await store.reserve(key, _res(3, 100, 0.004))
            assert refused.reason == "budget"
            assert refused.committed == pytest.approx(0.008)
            # The exact usage replaces the reservation: room comes back.
            await store.settle(_settle(1, key, 0.001, 10, 5))
            assert (await store.reserve(key, _res(3, 100, 0.004))).reason is None
            spend = await store.spend(key.id, 0)
            assert spend.spend_usd == pytest.approx(0.001)
            assert (spend.prompt_tokens, spend.completion_tokens, spend.requests) == (10, 5, 1)

    run(main())


def test_store_settle_applies_once(backend, run):
    async def main() -> None:
        async with backend() as (store, _):
            key, _ = _key(budget_usd=1.0)
            await store.create(key)
            await store.reserve(key, _res(1, 10, 0.1))
            for _ in range(3):  # a retried or merged-back settlement
                await store.settle(_settle(1, key, 0.05, 7, 3))
            # One without a reservation (admitted while the store was away).
            await store.settle(_settle(2, key, 0.02, 1, 1, reservation=""))
            await store.settle(_settle(2, key, 0.02, 1, 1, reservation=""))
            spend = await store.spend(key.id, 0)
            assert spend.spend_usd == pytest.approx(0.07)
            assert (spend.prompt_tokens, spend.completion_tokens, spend.requests) == (8, 4, 2)
            # Nothing stays held: the whole budget minus spend is free.
            assert (await store.reserve(key, _res(3, 10, 0.93))).reason is None

    run(main())


def test_store_one_settlement_for_many_requests(backend, run):
    async def main() -> None:
        async with backend() as (store, _):
            key, _ = _key(budget_usd=0.1, tpm=1000)
            await store.create(key)
            for n in range(3):
                assert (await store.reserve(key, _res(n, 100, 0.03))).reason is None
            assert (await store.reserve(key, _res(9, 100, 0.03))).reason == "budget"
            # The three requests settled together; one reservation is unknown.
            await store.settle(Settlement("batch", key.id, ("r0", "r1", "r2", "r-gone"), 0.015,
                                          30, 15, 3, 0, 1000))
            spend = await store.spend(key.id, 0)
            assert spend.spend_usd == pytest.approx(0.015) and spend.requests == 3
            assert (spend.prompt_tokens, spend.completion_tokens) == (30, 15)
            granted = await store.reserve(key, _res(10, 100, 0.085))
            assert granted.reason is None
            # 1000 - 3 x 100 reserved + 300 given back - 45 used - 100 now.
            assert granted.tpm_remaining == 855

    run(main())


def test_store_rpm_bucket_refills_per_minute(backend, run):
    async def main() -> None:
        async with backend() as (store, clock):
            key, _ = _key(rpm=2)
            await store.create(key)
            first = await store.reserve(key, _res(1, 0, 0.0))
            assert first.reason is None and first.rpm_remaining == 1
            assert (await store.reserve(key, _res(2, 0, 0.0))).reason is None
            refused = await store.reserve(key, _res(3, 0, 0.0))
            assert refused.reason == "rpm" and refused.rpm_remaining == 0
            assert refused.retry_after == pytest.approx(30.0, abs=0.01)  # 2/min: one per 30 s
            clock.now += 30.0
            assert (await store.reserve(key, _res(4, 0, 0.0))).reason is None

    run(main())


def test_store_tpm_counts_reservations_until_settled(backend, run):
    async def main() -> None:
        async with backend() as (store, clock):
            key, _ = _key(tpm=100)
            await store.create(key)
            granted = await store.reserve(key, _res(1, 60, 0.0))
            assert granted.reason is None and granted.tpm_remaining == 40
            refused = await store.reserve(key, _res(2, 60, 0.0))
            assert refused.reason == "tpm" and refused.tpm_remaining == 40
            assert refused.retry_after == pytest.approx(12.0, abs=0.01)  # 20 tokens at 100/min
            # The answer used 10 of the 60 reserved: 50 come back.
            await store.settle(_settle(1, key, 0.0, 4, 6))
            again = await store.reserve(key, _res(2, 60, 0.0))
            assert again.reason is None and again.tpm_remaining == 30
            # A reservation larger than the whole minute never fits.
            never = await store.reserve(key, _res(3, 101, 0.0))
            assert never.reason == "tpm" and never.retry_after == 60.0

    run(main())


def test_store_period_rollover_starts_a_fresh_budget(backend, run):
    async def main() -> None:
        async with backend() as (store, _):
            key, _ = _key(budget_usd=0.01, budget_period="daily")
            await store.create(key)
            day1, day2 = 1_800_000_000 - 1_800_000_000 % 86400, 1_800_000_000 - 1_800_000_000 % 86400 + 86400
            assert (await store.reserve(key, _res(1, 10, 0.009, day1))).reason is None
            await store.settle(_settle(1, key, 0.009, 5, 5, period=day1))
            assert (await store.reserve(key, _res(2, 10, 0.009, day1))).reason == "budget"
            assert (await store.spend(key.id, day1)).spend_usd == pytest.approx(0.009)
            assert (await store.spend(key.id, day2)).spend_usd == 0.0
            assert (await store.reserve(key, _res(3, 10, 0.009, day2))).reason is None

    run(main())


def test_store_unsettled_reservation_lapses(backend, run):
    async def main() -> None:
        async with backend() as (store, clock):
            key, _ = _key(budget_usd=0.01)
            await store.create(key)
            assert (await store.reserve(key, _res(1, 10, 0.01))).reason is None
            assert (await store.reserve(key, _res(2, 10, 0.01))).reason == "budget"
            clock.now += LEASE_SECONDS + 1  # its process died: never settled
            assert (await store.reserve(key, _res(3, 10, 0.01))).reason is None
            # A late settlement of the lapsed one still counts its spend, once.
            await store.settle(_settle(1, key, 0.002, 1, 1))
            assert (await store.spend(key.id, 0)).spend_usd == pytest.approx(0.002)

    run(main())


def test_calendar_periods_are_utc():
    # Wednesday 2027-01-13 15:30:00 UTC.
    now = calendar.timegm((2027, 1, 13, 15, 30, 0))
    assert period_start("daily", now) == calendar.timegm((2027, 1, 13, 0, 0, 0))
    assert period_start("weekly", now) == calendar.timegm((2027, 1, 11, 0, 0, 0))  # Monday
    assert period_start("monthly", now) == calendar.timegm((2027, 1, 1, 0, 0, 0))
    assert period_start(None, now) == 0
    monday = calendar.timegm((2027, 1, 11, 0, 0, 0))
    assert period_start("weekly", monday) == monday
    assert period_start("weekly", monday - 1) == calendar.timegm((2027, 1, 4, 0, 0, 0))


@pytest.mark.parametrize(
    ("fields", "bad"),
    [
        ({"name": "a", "colour": "red"}, "colour"),
        ({"name": 5}, "name"),
        ({"budget_usd": 1}, "name"),  # create needs a name
        ({"name": "a", "budget_usd": -1}, "budget_usd"),
        ({"name": "a", "budget_usd": "10"}, "budget_usd"),
        ({"name": "a", "rpm": 0}, "rpm"),
        ({"name": "a", "tpm": 1.5}, "tpm"),
        ({"name": "a", "rpm": True}, "rpm"),
        ({"name": "a", "budget_period": "yearly"}, "budget_period"),
        ({"name": "a", "models": "gpt-4o"}, "models"),
        ({"name": "a", "models": []}, "models"),
        ({"name": "a", "expires_at": "next tuesday"}, "expires_at"),
        ({"name": "a", "expires_at": 1700000000}, "expires_at"),
        ({"name": "a", "metadata": [1]}, "metadata"),
    ],
)
def test_key_fields_refused_name_the_field(fields, bad):
    with pytest.raises(KeyError_) as caught:
        parse_fields(fields, creating=True)
    assert caught.value.field == bad


def test_secrets_are_long_random_and_stored_hashed():
    secrets = {new_secret() for _ in range(50)}
    assert len(secrets) == 50
    for secret in secrets:
        assert secret.startswith("rk-") and len(secret) >= 3 + 32
    one = next(iter(secrets))
    record, _ = _key()
    assert one not in repr(record)
    assert secret_hash(one) == __import__("hashlib").sha256(one.encode()).hexdigest()
    fields = parse_fields({"name": "x", "expires_at": "2030-01-01T00:00:00Z"}, creating=True)
    assert fields["expires_at"] == calendar.timegm((2030, 1, 1, 0, 0, 0))


def test_allowance_sizes_stay_a_small_part_of_each_limit():
    from relay.keys.service import _allowance_size

    def size(**limits: Any) -> int:
        record, _ = _key(**limits)
        return _allowance_size(record, 100, 0.01)

    assert size() == 256  # no limit: at most 256 requests
    assert size(rpm=100) == 5 and size(rpm=19) == 1  # 1/20 of rpm
    assert size(tpm=100_000) == 50  # 1/20 of tpm at 100 tokens a request
    assert size(budget_usd=1.0) == 5  # 1/20 of the budget at $0.01 a request
    assert size(budget_usd=0.01, rpm=10_000) == 1  # small limits: request by request



def test_service_repeats_a_fresh_refusal_without_asking_the_store(tmp_path, run):
    import asyncio

    from relay.keys.service import KeyService

    async def main() -> None:
        store = SQLiteKeyStore(os.path.join(str(tmp_path), "keys.db"))
        service = KeyService(store, asyncio.get_running_loop())
        asked = _recording_reserves(store)
        key, _ = _key(rpm=1)
        await store.create(key)
        try:
            assert (await service.reserve(key, 0, 0.0, 0))[0] is None
            first = (await service.reserve(key, 0, 0.0, 0))[0]
            assert first is not None and first.reason == "rpm" and len(asked) == 2
            for _ in range(50):  # a flood of over-limit requests
                again = (await service.reserve(key, 0, 0.0, 0))[0]
                assert again is not None and again.reason == "rpm"
            assert len(asked) == 2
            await asyncio.sleep(0.15)  # the refusal is repeated for 0.1 s only
            assert (await service.reserve(key, 0, 0.0, 0))[0] is not None
            assert len(asked) == 3
        finally:
            await service.close()

    run(main())


def test_a_cached_key_with_an_allowance_is_admitted_without_the_store(tmp_path, run):
    import asyncio

    from relay.accounting.cost import PriceTable
    from relay.http.request import Request
    from relay.keys.admission import Admission, KeyTicket
    from relay.keys.service import KeyService

    class Rejections:
        def __init__(self) -> None:
            self.seen: list[tuple[str, str]] = []

        def key_reject(self, key: str, reason: str) -> None:
            self.seen.append((key, reason))

        def key_spend(self, key: str, cost_usd: float) -> None:
            pass

    def request(secret: str) -> Request:
        req = Request(b"POST", b"/v1/chat/completions", [], b'{"model":"m","max_tokens":5}',
                      True, 1, "127.0.0.1", 0.0)
        req.authorization = b"Bearer " + secret.encode()
        req.credential_headers = b"Authorization: Bearer x\r\n"
        return req

    async def main() -> None:
        store = SQLiteKeyStore(os.path.join(str(tmp_path), "keys.db"))
        service = KeyService(store, asyncio.get_running_loop())
        asked = _recording_reserves(store)
        key, secret = _key(rpm=100_000)
        await store.create(key)
        rejections = Rejections()
        admission = Admission(service, PriceTable({}), 100, rejections)  # type: ignore[arg-type]
        tickets: list[KeyTicket] = []
        try:
            first = request(secret)
            # Not in the process cache yet: only the store can answer, and
            # nothing is counted or consumed meanwhile.
            assert admission.admit_now(first) is None
            assert len(asked) == 0 and first.credential_headers and rejections.seen == []
            ticket = await admission.admit(first)
            assert isinstance(ticket, KeyTicket) and len(asked) == 1
            tickets.append(ticket)
            for _ in range(10):
                again = request(secret)
                now = admission.admit_now(again)
                assert isinstance(now, KeyTicket) and now.allowance is ticket.allowance
                assert again.credential_headers == b""  # the relay key never goes upstream
                tickets.append(now)
            assert len(asked) == 1 and rejections.seen == []
            assert ticket.allowance is not None and ticket.allowance.outstanding == 11
            wrong = request("rk-not-a-key")
            assert admission.admit_now(wrong) is None  # unknown here: asked at the store
            refused = await admission.admit(wrong)
            assert not isinstance(refused, KeyTicket) and refused.status == 401
            assert rejections.seen == [("unknown", "invalid")]
        finally:
            for one in tickets:
                one.settle(None, 0.0)
            await service.close()


def test_a_busy_key_prefetches_once_and_gets_larger_allowances(tmp_path, run):
    """Requests that find the allowance half spent start one prefetch between
    them (not one each), and an allowance spent at once is followed by one
    twice as large; every request still draws from an allowance."""
    import asyncio

    from relay.keys.service import KeyService

    async def main() -> None:
        store = SQLiteKeyStore(os.path.join(str(tmp_path), "keys.db"))
        service = KeyService(store, asyncio.get_running_loop())
        asked = _recording_reserves(store)
        key, _ = _key(rpm=10**9)
        await store.create(key)
        drawn = []
        try:
            refusal, first, _local = await service.reserve(key, 10, 0.0, 0)
            assert refusal is None and first is not None and [r.requests for r in asked] == [256]
            drawn.append(first)
            for _ in range(200):  # past half: one prefetch, however many requests
                allowance = service.reserve_now(key, 10, 0.0, 0)
                assert allowance is first
                drawn.append(allowance)
            assert len(service._tasks) == 1
            await asyncio.wait(list(service._tasks), timeout=10.0)
            assert [r.requests for r in asked] == [256, 512]  # the first was spent at once: twice as large
            second = service.reserve_now(key, 10, 0.0, 0)
            assert second is not None and second is not first and not first.open
            assert second.reservation.requests == 512 and second.requests == 511
            drawn.append(second)
        finally:
            for allowance in drawn:
                service.settle(key, allowance, None, 0.0, 1, 1, 0)
            await service.close()
        assert first.released and second.released

    run(main())


def test_admission_period_follows_the_calendar_across_period_starts(monkeypatch):
    """The remembered period start turns exactly where the calendar's does."""
    import calendar as _calendar

    from relay.accounting.cost import PriceTable
    from relay.keys import admission as admission_module
    from relay.keys.admission import Admission

    class Service:
        def start(self) -> None:
            pass

    admission = Admission(Service(), PriceTable({}), 100, None)  # type: ignore[arg-type]
    starts = [_calendar.timegm((2024, month, day, 0, 0, 0)) for month, day in
              ((1, 1), (1, 31), (2, 1), (2, 28), (2, 29), (3, 1), (12, 30), (12, 31))]
    starts.append(_calendar.timegm((2025, 1, 1, 0, 0, 0)))
    moments = sorted({t + d for t in starts for d in (-86400.5, -0.001, 0.0, 0.001, 3600.0)})
    for period in ("daily", "weekly", "monthly"):
        record, _ = _key(budget_usd=1.0, budget_period=period)
        for now in moments:  # forward in time, as a clock goes
            monkeypatch.setattr(admission_module.time, "time", lambda now=now: now)
            assert admission._period(record) == period_start(period, now), (period, now)
        for now in reversed(moments):  # and a clock set back
            monkeypatch.setattr(admission_module.time, "time", lambda now=now: now)
            assert admission._period(record) == period_start(period, now), (period, now)
    lifetime, _ = _key(budget_usd=1.0)
    assert admission._period(lifetime) == 0


def test_an_allowance_drawn_from_by_requests_that_end_at_once_outlives_a_flush(tmp_path, run):
    """Cache hits settle as soon as they are admitted, so a flush never finds
    one outstanding: the allowance stays while requests draw from it (no new
    store reservation per flush), and goes back once a whole interval passed
    without any (or at once when nothing is left of it)."""
    import asyncio

    from relay.keys.service import KeyService

    async def main() -> None:
        store = SQLiteKeyStore(os.path.join(str(tmp_path), "keys.db"))
        service = KeyService(store, asyncio.get_running_loop())
        asked = _recording_reserves(store)
        key, _ = _key(rpm=10**9)
        await store.create(key)
        try:
            refusal, first, _local = await service.reserve(key, 10, 0.0, 0)
            assert refusal is None and first is not None
            service.settle(key, first, None, 0.0, 0, 0, 0)
            for _ in range(3):  # an interval with requests, then a flush
                for _ in range(5):
                    drawn = service.reserve_now(key, 10, 0.0, 0)
                    assert drawn is first
                    service.settle(key, drawn, None, 0.0, 0, 0, 0)
                service._flush()
                assert first.open and not first.released
            assert len(asked) == 1
            service._flush()  # an interval without any request: given back
            assert not first.open and first.released
            assert service.reserve_now(key, 10, 0.0, 0) is None

            size_one, _ = _key("key_c", name="one", rpm=20)  # 1/20 of rpm: one request each
            await store.create(size_one)
            refusal, single, _local = await service.reserve(size_one, 10, 0.0, 0)
            assert refusal is None and single is not None and single.requests == 0
            service.settle(size_one, single, None, 0.0, 0, 0, 0)
            service._flush()  # drawn from, but nothing left: given back at once
            assert single.released
        finally:
            await service.close()

    run(main())


def test_a_spent_allowance_goes_back_when_its_last_request_ends(tmp_path, run):
    """A budget with room for one reservation at a time, requests taking
    turns on two processes: each one ended is given back with its usage at
    once (not at the next flush), so the other process is admitted while the
    budget has room, and refused once it has not."""
    import asyncio

    from relay.keys.service import KeyService

    budget, reserved, used = 0.1, 0.06, 0.01  # reserves 0.06, answers cost 0.01

    async def main() -> None:
        path = os.path.join(str(tmp_path), "keys.db")
        stores = [SQLiteKeyStore(path), SQLiteKeyStore(path)]
        loop = asyncio.get_running_loop()
        services = [KeyService(s, loop) for s in stores]
        key, _ = _key(budget_usd=budget)
        await stores[0].create(key)
        admitted = 0
        outcomes = []
        try:
            for turn in range(8):
                service = services[turn % 2]
                room = budget - admitted * used >= reserved - 1e-9
                refusal, allowance, local = await service.reserve(key, 10, reserved, 0)
                outcomes.append((room, refusal is None))
                if refusal is None:
                    admitted += 1
                    service.settle(key, allowance, local, used, 5, 5, 0)
                    if service._settling:  # the write it started, not a flush interval
                        await asyncio.wait(list(service._settling), timeout=10)
                else:
                    assert refusal.reason == "budget"
        finally:
            for service in services:
                await service.close()
        assert [admitted_ for _, admitted_ in outcomes] == [room for room, _ in outcomes], outcomes
        assert admitted == 5  # 0.04 spent leaves room for one more 0.06

    run(main())


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_two_services_near_the_budget_never_overspend(tmp_path, run, seed):
    """Two processes' services on one store, requests racing at the budget's
    edge while each still has releases on their way: the store decides
    (it alone sees both processes' reservations), so recorded spend stays
    within the budget and equals what was admitted."""
    import asyncio
    import random

    from relay.keys.service import KeyService

    rng = random.Random(seed)
    cost = 0.01  # each answer uses exactly what it reserved

    async def main() -> None:
        path = os.path.join(str(tmp_path), "keys.db")
        stores = [SQLiteKeyStore(path), SQLiteKeyStore(path)]
        loop = asyncio.get_running_loop()
        services = [KeyService(s, loop) for s in stores]
        key, _ = _key(budget_usd=0.1)
        await stores[0].create(key)
        admitted = 0

        async def one(service: KeyService) -> None:
            nonlocal admitted
            await asyncio.sleep(rng.random() * 0.3)
            refusal, allowance, local = await service.reserve(key, 10, cost, 0)
            if refusal is not None:
                return
            admitted += 1
            await asyncio.sleep(rng.random() * 0.05)
            service.settle(key, allowance, local, cost, 5, 5, 0)

        try:
            await asyncio.wait_for(
                asyncio.gather(*(one(services[i % 2]) for i in range(60))), timeout=60
            )
        finally:
            for service in services:
                await service.close()
        check = SQLiteKeyStore(path)
        try:
            spend = await check.spend(key.id, 0)
        finally:
            await check.close()
        assert admitted >= 1
        assert spend.requests == admitted
        assert spend.spend_usd == pytest.approx(admitted * cost)
        assert spend.spend_usd <= 0.1 + 1e-9

    run(main())
