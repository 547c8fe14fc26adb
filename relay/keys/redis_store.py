"""The shared key store: Redis, for every instance pointed at it.

Layout (``<id>`` is the key id; ``{<id>}`` is a hash tag so that all of
one key's data lives in one cluster slot, which every script needs)::

    relay:{<id>}:key        hash: settings (JSON), sha, created, revoked, static
    relay:{<id>}:state      hash: counters, buckets, reserved USD
    relay:{<id>}:res        zset: reservation id -> lapse time
    relay:{<id>}:resv       hash: reservation id -> "cost tokens"
    relay:{<id>}:done:<s>   settlement marker (TTL), makes settle idempotent
    relay:keys:ids          set of key ids
    relay:keys:hash:<sha>   string: key id, the secret lookup
    relay:keys:gen          counter bumped on every record change

``reserve`` and ``settle`` are one Lua script each (relay/lua/). Record
changes are single-slot commands in order (record first, then the secret
index, then the counter), so a cluster needs no cross-slot transaction.
Every call goes through :class:`~relay.redisconn.RedisConnection` (deadline,
health state); a failure raises :class:`StoreUnavailable`.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from relay.redisconn import RedisConnection, RedisUnavailable

from .model import KeyRecord, KeySpend
from .store import LEASE_SECONDS, Reservation, ReserveResult, Settlement, StoreUnavailable

__all__ = ["RedisKeyStore"]

_MARKER_TTL = 2 * 86400
_IDS = "relay:keys:ids"
_GEN = "relay:keys:gen"
_HASH = "relay:keys:hash:"


def _script(name: str) -> str:
    import importlib.resources

    return importlib.resources.files("relay").joinpath("lua", name).read_text(encoding="utf-8")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _record(key_id: str, fields: dict[Any, Any]) -> KeyRecord | None:
    if not fields:
        return None
    data = {_text(k): _text(v) for k, v in fields.items()}
    s = json.loads(data["settings"])
    models = s.get("models")
    return KeyRecord(
        id=key_id,
        name=s["name"],
        secret_sha256=data["sha"],
        budget_usd=s.get("budget_usd"),
        budget_period=s.get("budget_period"),
        rpm=s.get("rpm"),
        tpm=s.get("tpm"),
        models=tuple(models) if models is not None else None,
        expires_at=s.get("expires_at"),
        metadata=s.get("metadata") or {},
        created_at=float(data.get("created", "0")),
        revoked=data.get("revoked") == "1",
        static=data.get("static") == "1",
    )


class RedisKeyStore:
    """Keys, counters, buckets and reservations in Redis."""

    kind = "redis"

    def __init__(self, conn: RedisConnection) -> None:
        self.conn = conn
        client = conn.client
        self._client = client
        self._reserve = client.register_script(_script("keys_reserve.lua"))
        self._settle = client.register_script(_script("keys_settle.lua"))

    async def _call(self, fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        try:
            return await self.conn.execute(fn, *args, **kwargs)
        except RedisUnavailable as exc:
            raise StoreUnavailable(f"redis {self.conn.where}: {exc}") from exc

    @staticmethod
    def _k(key_id: str, part: str) -> str:
        return f"relay:{{{key_id}}}:{part}"

    # -- records ------------------------------------------------------------
    def _fields(self, record: KeyRecord) -> dict[str, str]:
        return {
            "settings": json.dumps(record.settings()),
            "sha": record.secret_sha256,
            "created": repr(record.created_at),
            "revoked": "1" if record.revoked else "0",
            "static": "1" if record.static else "0",
        }

    async def create(self, record: KeyRecord) -> None:
        await self._call(self._client.hset, self._k(record.id, "key"), mapping=self._fields(record))
        await self._call(self._client.set, _HASH + record.secret_sha256, record.id)
        await self._call(self._client.sadd, _IDS, record.id)
        await self._call(self._client.incr, _GEN)

    async def update(self, record: KeyRecord, old_hash: str | None = None) -> None:
        await self._call(self._client.hset, self._k(record.id, "key"), mapping=self._fields(record))
        if old_hash is not None and old_hash != record.secret_sha256:
            await self._call(self._client.set, _HASH + record.secret_sha256, record.id)
            await self._call(self._client.delete, _HASH + old_hash)
        await self._call(self._client.incr, _GEN)

    async def delete(self, key_id: str) -> None:
        record = await self.get(key_id)
        await self._call(
            self._client.delete,
            self._k(key_id, "key"), self._k(key_id, "state"),
            self._k(key_id, "res"), self._k(key_id, "resv"),
        )
        if record is not None:
            await self._call(self._client.delete, _HASH + record.secret_sha256)
        await self._call(self._client.srem, _IDS, key_id)
        await self._call(self._client.incr, _GEN)

    async def get(self, key_id: str) -> KeyRecord | None:
        fields = await self._call(self._client.hgetall, self._k(key_id, "key"))
        return _record(key_id, fields)

    async def by_hash(self, secret_sha256: str) -> KeyRecord | None:
        key_id = await self._call(self._client.get, _HASH + secret_sha256)
        if key_id is None:
            return None
        record = await self.get(_text(key_id))
        if record is None or record.secret_sha256 != secret_sha256:
            return None  # an index entry left behind by a rotation cut short
        return record

    async def list(self) -> list[KeyRecord]:
        ids = sorted(_text(i) for i in await self._call(self._client.smembers, _IDS))
        records = []
        for key_id in ids:
            record = await self.get(key_id)
            if record is not None:
                records.append(record)
        records.sort(key=lambda r: (r.created_at, r.id))
        return records

    async def generation(self) -> int:
        value = await self._call(self._client.get, _GEN)
        return int(value) if value is not None else 0

    async def spend(self, key_id: str, period: int) -> KeySpend:
        values = await self._call(
            self._client.hmget, self._k(key_id, "state"),
            ["period", "spend", "prompt", "completion", "requests"],
        )
        s_period, spend, prompt, completion, requests = (
            _text(v) if v is not None else None for v in values
        )
        current = float(spend) if spend is not None and int(float(s_period or 0)) == period else 0.0
        return KeySpend(current, int(prompt or 0), int(completion or 0), int(requests or 0))

    # -- reserve / settle ---------------------------------------------------
    async def reserve(self, record: KeyRecord, reservation: Reservation) -> ReserveResult:
        return await self._reserve_at(record, reservation, "")

    async def _reserve_at(
        self, record: KeyRecord, reservation: Reservation, now: str
    ) -> ReserveResult:
        key_id = record.id
        reply = await self._call(
            self._reserve,
            (self._k(key_id, "state"), self._k(key_id, "res"), self._k(key_id, "resv")),
            (
                reservation.id,
                reservation.tokens,
                repr(reservation.cost),
                reservation.period,
                repr(record.budget_usd) if record.budget_usd is not None else "",
                record.rpm or 0,
                record.tpm or 0,
                repr(LEASE_SECONDS),
                now,
                reservation.requests,
            ),
        )
        try:
            granted, reason, retry_ms, rpm_left, tpm_left, rpm_reset, tpm_reset, committed, spend = reply
            return ReserveResult(
                None if granted == 1 else _text(reason),
                retry_ms / 1000,
                int(rpm_left),
                int(tpm_left),
                rpm_reset / 1000,
                tpm_reset / 1000,
                float(_text(committed)),
                float(_text(spend)),
            )
        except (TypeError, ValueError) as exc:
            raise StoreUnavailable(f"unexpected reply from the reserve script: {exc}") from exc

    async def settle(self, settlement: Settlement) -> None:
        key_id = settlement.key_id
        await self._call(
            self._settle,
            (
                self._k(key_id, "state"),
                self._k(key_id, "res"),
                self._k(key_id, "resv"),
                self._k(key_id, "done:" + settlement.id),
            ),
            (
                repr(float(settlement.cost)),
                settlement.prompt_tokens,
                settlement.completion_tokens,
                settlement.requests,
                settlement.period,
                settlement.tpm,
                _MARKER_TTL,
                settlement.rpm,
                settlement.rpm_refund,
                *settlement.reservation_ids,
            ),
        )

    async def close(self) -> None:
        return None  # the connection belongs to the runtime
