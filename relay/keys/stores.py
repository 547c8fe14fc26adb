"""Opening the store a config names, and the config's static keys as records."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .model import KeyRecord
from .store import KeyStore

if TYPE_CHECKING:
    from relay.config import Config, KeysConfig
    from relay.redisconn import RedisConnection

__all__ = ["KeyStoreError", "check_store", "open_store", "static_records"]


class KeyStoreError(Exception):
    """The configured key store cannot be opened (the message names it)."""


def open_store(keys: KeysConfig, redis: RedisConnection | None) -> KeyStore:
    if keys.store == "redis":
        if redis is None:
            raise KeyStoreError("keys.store is redis but redis.enabled is false")
        from .redis_store import RedisKeyStore

        return RedisKeyStore(redis)
    import sqlite3

    from .sqlite_store import SQLiteKeyStore

    try:
        return SQLiteKeyStore(keys.path)
    except (sqlite3.Error, OSError) as exc:
        raise KeyStoreError(f"{keys.path}: cannot open the key store: {exc}") from exc


def check_store(config: Config) -> str | None:
    """Why the configured SQLite store cannot be opened, or None (start-up check)."""
    keys = config.keys
    if keys.store != "sqlite" or not keys.needs_store:
        return None
    import sqlite3

    from .sqlite_store import open_sqlite

    try:
        open_sqlite(keys.path).close()
    except (sqlite3.Error, OSError) as exc:
        return f"{keys.path}: cannot open the key store: {exc}"
    return None


def static_records(keys: KeysConfig) -> list[KeyRecord]:
    now = time.time()
    return [
        KeyRecord(
            id=k.id,
            name=k.name,
            secret_sha256=k.secret_sha256,
            budget_usd=k.budget_usd,
            budget_period=k.budget_period,
            rpm=k.rpm,
            tpm=k.tpm,
            models=k.models,
            expires_at=k.expires_at,
            metadata=dict(k.metadata),
            created_at=now,
            static=True,
        )
        for k in keys.static
    ]
