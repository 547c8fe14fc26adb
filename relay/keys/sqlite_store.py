"""The embedded key store: one SQLite file, shared by the workers of one instance.

WAL journal (readers never wait for the writer), ``synchronous=NORMAL``
(in WAL mode a committed transaction survives the process being killed;
only a power loss can take the last ones), ``busy_timeout`` so workers
queue for the write lock instead of failing, and ``BEGIN IMMEDIATE`` for
reserve-or-refuse: the lock is taken before the state is read, so two
workers can never both grant the last of a budget.

Every call runs on one thread of its own per process, with its own
connection: the event loop only waits for the answer.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from .buckets import KeyState, apply_settlement, decide
from .model import KeyRecord, KeySpend
from .store import LEASE_SECONDS, Reservation, ReserveResult, Settlement, StoreUnavailable

__all__ = ["SQLiteKeyStore", "open_sqlite"]

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    secret_sha256 TEXT NOT NULL UNIQUE,
    settings TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0,
    static INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS state (
    key_id TEXT PRIMARY KEY,
    period INTEGER NOT NULL DEFAULT 0,
    spend REAL NOT NULL DEFAULT 0,
    prompt INTEGER NOT NULL DEFAULT 0,
    completion INTEGER NOT NULL DEFAULT 0,
    requests INTEGER NOT NULL DEFAULT 0,
    rpm_tokens REAL NOT NULL DEFAULT -1,
    rpm_ts REAL NOT NULL DEFAULT 0,
    tpm_tokens REAL NOT NULL DEFAULT -1,
    tpm_ts REAL NOT NULL DEFAULT 0,
    reserved REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS reservations (
    id TEXT PRIMARY KEY,
    key_id TEXT NOT NULL,
    cost REAL NOT NULL,
    tokens INTEGER NOT NULL,
    expires REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS reservations_by_key ON reservations (key_id, expires);
CREATE TABLE IF NOT EXISTS settled (id TEXT PRIMARY KEY, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (name, value) VALUES ('generation', 0);
"""
_STATE_COLUMNS = (
    "period, spend, prompt, completion, requests, rpm_tokens, rpm_ts, tpm_tokens, tpm_ts, reserved"
)
_SETTLED_KEEP = 2 * 86400.0


def open_sqlite(path: str) -> sqlite3.Connection:
    """Open (creating) the key store file; raises sqlite3.Error / OSError."""
    conn = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA busy_timeout = 10000")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"cannot switch to WAL journal (got {mode})")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.executescript(_SCHEMA)
    except BaseException:
        conn.close()
        raise
    return conn


def _record(row: Any) -> KeyRecord:
    key_id, sha, settings_text, created, revoked, static = row
    s = json.loads(settings_text)
    models = s.get("models")
    return KeyRecord(
        id=key_id,
        name=s["name"],
        secret_sha256=sha,
        budget_usd=s.get("budget_usd"),
        budget_period=s.get("budget_period"),
        rpm=s.get("rpm"),
        tpm=s.get("tpm"),
        models=tuple(models) if models is not None else None,
        expires_at=s.get("expires_at"),
        metadata=s.get("metadata") or {},
        created_at=created,
        revoked=bool(revoked),
        static=bool(static),
    )


def _state(row: Any) -> KeyState:
    return KeyState(*row) if row is not None else KeyState()


class SQLiteKeyStore:
    """Keys, counters, buckets and reservations in one SQLite file."""

    kind = "sqlite"

    def __init__(self, path: str, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        self._conn = open_sqlite(path)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="relay-keys-sqlite")
        self._lock = threading.Lock()
        self._queue: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []
        self._busy = False
        self._closed = False

    # -- plumbing -----------------------------------------------------------
    # Group commit: operations queue up while the thread works; each round
    # runs everything queued in ONE transaction (one savepoint per
    # operation, so one failing statement spoils nothing else) and hands all
    # results back to the loop in one callback. An idle store answers at
    # once; a busy one pays one commit and one thread hop per round, not
    # per request.
    def _submit(self, op: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        with self._lock:
            if self._closed:
                raise StoreUnavailable(f"{self.path}: the key store is closed")
            self._queue.append((op, future))
            if self._busy:
                return future
            self._busy = True
        self._thread.submit(self._drain)
        return future

    async def _run(self, op: Callable[[sqlite3.Connection], T]) -> T:
        return await self._submit(op)

    def _drain(self) -> None:
        while True:
            with self._lock:
                batch, self._queue = self._queue, []
                if not batch:
                    self._busy = False
                    return
            results = self._round(batch)
            loop = batch[0][1].get_loop()
            try:
                loop.call_soon_threadsafe(_deliver, results)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

    def _round(self, batch: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]]) -> list[Any]:
        conn = self._conn
        results: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op, future in batch:
                conn.execute("SAVEPOINT op")
                try:
                    value = op(conn)
                except Exception as exc:  # that operation only: undone, reported to its caller
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    results.append((future, None, exc))
                    continue
                conn.execute("RELEASE op")
                results.append((future, value, None))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:  # locked beyond busy_timeout, disk full, I/O error
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            error = StoreUnavailable(f"{self.path}: {exc}")
            results = [(future, None, error) for _, future in batch]
        return results

    @staticmethod
    def _bump(conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE meta SET value = value + 1 WHERE name = 'generation'")

    # -- records ------------------------------------------------------------
    async def create(self, record: KeyRecord) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO keys (id, secret_sha256, settings, created_at, revoked, static) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (record.id, record.secret_sha256, json.dumps(record.settings()),
                 record.created_at, int(record.revoked), int(record.static)),
            )
            self._bump(conn)

        await self._run(write)

    async def update(self, record: KeyRecord, old_hash: str | None = None) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE keys SET secret_sha256 = ?, settings = ?, revoked = ?, static = ? "
                "WHERE id = ?",
                (record.secret_sha256, json.dumps(record.settings()), int(record.revoked),
                 int(record.static), record.id),
            )
            self._bump(conn)

        await self._run(write)

    async def delete(self, key_id: str) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM keys WHERE id = ?", (key_id,))
            conn.execute("DELETE FROM state WHERE key_id = ?", (key_id,))
            conn.execute("DELETE FROM reservations WHERE key_id = ?", (key_id,))
            self._bump(conn)

        await self._run(write)

    @staticmethod
    def _select(conn: sqlite3.Connection, where: str, args: tuple[Any, ...]) -> list[KeyRecord]:
        rows = conn.execute(
            "SELECT id, secret_sha256, settings, created_at, revoked, static FROM keys " + where,
            args,
        ).fetchall()
        return [_record(row) for row in rows]

    async def get(self, key_id: str) -> KeyRecord | None:
        rows = await self._run(lambda c: self._select(c, "WHERE id = ?", (key_id,)))
        return rows[0] if rows else None

    async def by_hash(self, secret_sha256: str) -> KeyRecord | None:
        rows = await self._run(lambda c: self._select(c, "WHERE secret_sha256 = ?", (secret_sha256,)))
        return rows[0] if rows else None

    async def list(self) -> list[KeyRecord]:
        return await self._run(lambda c: self._select(c, "ORDER BY created_at, id", ()))

    async def generation(self) -> int:
        def read(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT value FROM meta WHERE name = 'generation'").fetchone()
            return int(row[0])

        return await self._run(read)

    async def spend(self, key_id: str, period: int) -> KeySpend:
        def read(conn: sqlite3.Connection) -> KeySpend:
            row = conn.execute(
                "SELECT " + _STATE_COLUMNS + " FROM state WHERE key_id = ?", (key_id,)
            ).fetchone()
            state = _state(row)
            current = state.spend if state.period == period else 0.0
            return KeySpend(current, state.prompt, state.completion, state.requests)

        return await self._run(read)

    # -- reserve / settle ---------------------------------------------------
    @staticmethod
    def _load_state(conn: sqlite3.Connection, key_id: str) -> KeyState:
        row = conn.execute(
            "SELECT " + _STATE_COLUMNS + " FROM state WHERE key_id = ?", (key_id,)
        ).fetchone()
        return _state(row)

    @staticmethod
    def _save_state(conn: sqlite3.Connection, key_id: str, s: KeyState) -> None:
        conn.execute(
            "INSERT OR REPLACE INTO state (key_id, " + _STATE_COLUMNS + ") "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (key_id, s.period, s.spend, s.prompt, s.completion, s.requests, s.rpm_tokens,
             s.rpm_ts, s.tpm_tokens, s.tpm_ts, s.reserved),
        )

    async def reserve(self, record: KeyRecord, reservation: Reservation) -> ReserveResult:
        def write(conn: sqlite3.Connection) -> ReserveResult:
            now = self._clock()
            state = self._load_state(conn, record.id)
            lapsed = conn.execute(
                "SELECT COALESCE(SUM(cost), 0), COUNT(*) FROM reservations "
                "WHERE key_id = ? AND expires <= ?",
                (record.id, now),
            ).fetchone()
            if lapsed[1]:
                conn.execute(
                    "DELETE FROM reservations WHERE key_id = ? AND expires <= ?", (record.id, now)
                )
                state.reserved = max(0.0, state.reserved - lapsed[0])
            result = decide(state, record.budget_usd, record.rpm, record.tpm, reservation, now)
            if result.reason is None:
                conn.execute(
                    "INSERT INTO reservations (id, key_id, cost, tokens, expires) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (reservation.id, record.id, reservation.cost, reservation.tokens,
                     now + LEASE_SECONDS),
                )
                self._save_state(conn, record.id, state)
            return result

        return await self._run(write)

    async def settle(self, settlement: Settlement) -> None:
        def write(conn: sqlite3.Connection) -> None:
            now = self._clock()
            try:
                conn.execute("INSERT INTO settled (id, at) VALUES (?, ?)", (settlement.id, now))
            except sqlite3.IntegrityError:
                return  # applied before (a retried merge): nothing twice
            held = None
            for reservation_id in settlement.reservation_ids:
                row = conn.execute(
                    "DELETE FROM reservations WHERE id = ? RETURNING cost, tokens",
                    (reservation_id,),
                ).fetchone()
                if row is not None:
                    cost, tokens = held or (0.0, 0)
                    held = (cost + float(row[0]), tokens + int(row[1]))
            state = self._load_state(conn, settlement.key_id)
            apply_settlement(
                state, held, settlement.cost, settlement.prompt_tokens,
                settlement.completion_tokens, settlement.period, settlement.tpm,
                settlement.requests, settlement.rpm, settlement.rpm_refund,
            )
            self._save_state(conn, settlement.key_id, state)
            if now % 64 < 0.05:  # now and then, forget settlements too old to be retried
                conn.execute("DELETE FROM settled WHERE at < ?", (now - _SETTLED_KEEP,))

        await self._run(write)

    async def close(self) -> None:
        with self._lock:
            self._closed = True
            waiting = self._busy
        if waiting:
            # What is queued (settlements) is written before the file closes.
            await asyncio.get_running_loop().run_in_executor(self._thread, lambda: None)
        self._thread.submit(self._conn.close)
        self._thread.shutdown(wait=True)


def _deliver(results: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for future, value, error in results:
        if future.done():
            continue  # its caller gave up (cancelled)
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)
