"""Key management shared by the admin API and the CLI: create, list, show,
update, rotate, revoke; static keys from the config file.

Every operation answers with the key object of the contract (plus
``secret`` on create and rotate) or raises :class:`~relay.keys.model.KeyError_`
(a bad field: 400) or :class:`NotFound` (an unknown id: 404).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from typing import Any

from .model import (
    KeyError_,
    KeyRecord,
    apply_fields,
    new_key_id,
    new_secret,
    parse_fields,
    period_start,
    secret_hash,
)
from .service import KeyService
from .store import KeyStore

__all__ = ["KeyManager", "NotFound"]


class NotFound(LookupError):
    """No key with that id."""


class KeyManager:
    """Operations on one store; ``service`` (when relay is serving) sees
    each change at once instead of at its next refresh."""

    def __init__(self, store: KeyStore, service: KeyService | None = None) -> None:
        self.store = store
        self.service = service

    async def _json(self, record: KeyRecord) -> dict[str, Any]:
        spend = await self.store.spend(
            record.id, period_start(record.budget_period, time.time())
        )
        return record.to_json(spend)

    async def _existing(self, key_id: str) -> KeyRecord:
        record = await self.store.get(key_id)
        if record is None:
            raise NotFound(key_id)
        return record

    @staticmethod
    def _not_static(record: KeyRecord) -> None:
        if record.static:
            raise KeyError_("id", "is declared in the config file (keys.static); change it there")

    async def create(self, data: Any) -> dict[str, Any]:
        fields = parse_fields(data, creating=True)
        secret = new_secret()
        record = apply_fields(
            KeyRecord(id=new_key_id(), name=fields["name"], secret_sha256=secret_hash(secret),
                      created_at=time.time()),
            fields,
        )
        await self.store.create(record)
        if self.service is not None:
            self.service.changed(record)
        return {**(await self._json(record)), "secret": secret}

    async def list(self) -> list[dict[str, Any]]:
        return [await self._json(r) for r in await self.store.list()]

    async def show(self, key_id: str) -> dict[str, Any]:
        return await self._json(await self._existing(key_id))

    async def update(self, key_id: str, data: Any) -> dict[str, Any]:
        fields = parse_fields(data, creating=False)
        record = await self._existing(key_id)
        self._not_static(record)
        record = apply_fields(record, fields)
        await self.store.update(record)
        if self.service is not None:
            self.service.changed(record)
        return await self._json(record)

    async def rotate(self, key_id: str) -> dict[str, Any]:
        record = await self._existing(key_id)
        self._not_static(record)
        secret = new_secret()
        old_hash = record.secret_sha256
        record = dataclasses.replace(record, secret_sha256=secret_hash(secret))
        await self.store.update(record, old_hash=old_hash)
        if self.service is not None:
            self.service.changed(record, old_hash)
        return {**(await self._json(record)), "secret": secret}

    async def revoke(self, key_id: str) -> dict[str, Any]:
        record = await self._existing(key_id)
        self._not_static(record)
        record = dataclasses.replace(record, revoked=True)
        await self.store.update(record)
        if self.service is not None:
            self.service.changed(record)
        return await self._json(record)

    async def apply_static(self, declared: Iterable[KeyRecord]) -> None:
        """Make the store's static keys exactly ``declared`` (a hot reload:
        new ones created, changed ones updated, removed ones revoked)."""
        import sqlite3  # only where static keys are declared

        wanted = {r.id: r for r in declared}
        for record in wanted.values():
            current = await self.store.get(record.id)
            if current is None:
                try:
                    await self.store.create(record)
                except sqlite3.IntegrityError:
                    # Another worker of this instance created it just now.
                    current = await self.store.get(record.id)
                    if current is None:
                        raise
                else:
                    continue
            keep = dataclasses.replace(record, created_at=current.created_at)
            if keep != current:
                await self.store.update(keep, old_hash=current.secret_sha256)
        for current in await self.store.list():
            if current.static and current.id not in wanted and not current.revoked:
                await self.store.update(dataclasses.replace(current, revoked=True))
        if self.service is not None:
            await self.service.refresh(force=True)
