"""Running totals of tokens and cost for ``GET /relay/usage``.

Totals per model label, per API-key hash (never the key itself) and
overall. :class:`UsageLedger` keeps them in process memory (since start);
:class:`RedisUsageLedger` keeps them in Redis hashes so they survive
restarts and add up across instances. Both produce the same snapshot::

    {"since": "2024-05-01T12:00:00Z",
     "totals": {...},
     "models": {"gpt-4o": {...}},
     "keys": {"3f2a9c0d1e4b5a6c": {...}}}

where each ``{...}`` holds ``requests``, ``estimated_requests``,
``prompt_tokens``, ``completion_tokens``, ``cached_tokens``, ``cost_usd``,
``cache_hits`` and ``saved_usd``. The number of key hashes is bounded
(``max_keys``): later new keys are summed under ``other``. A request
without a credential is recorded under ``anonymous``.

Paid and saved are kept apart. ``requests``, ``estimated_requests``, the
token counts and ``cost_usd`` describe the responses that came from the
upstream, i.e. what the provider bills. A cache hit (``record(...,
hit=True)``) adds one to ``cache_hits`` and what it would have cost to
``saved_usd``, and nothing else: its tokens were paid once, by the request
that filled the cache, and counting them again would make the token totals
disagree with the provider's invoice and with ``relay_tokens_total``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from relay import debug
from relay._fast import ANONYMOUS, OTHER, UsageLedger
from relay.accounting.usage import Usage

if TYPE_CHECKING:
    from relay.redisconn import RedisConnection

__all__ = [
    "ANONYMOUS", "FIELDS", "OTHER", "RedisUsageLedger", "SharedUsage", "UsageKeys", "UsageLedger",
    "usage_keys",
]  # fmt: skip

INT_FIELDS = (
    "requests",
    "estimated_requests",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cache_hits",
)
FLOAT_FIELDS = ("cost_usd", "saved_usd")
FIELDS = INT_FIELDS + FLOAT_FIELDS


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _increments(
    usage: Usage, cost: float, saved: float, hit: bool = False
) -> tuple[tuple[str, int | float], ...]:
    """The non-zero (field, amount) pairs one record adds."""
    if hit:  # served from the cache: nothing paid, nothing billed twice
        return (("cache_hits", 1), ("saved_usd", saved)) if saved else (("cache_hits", 1),)
    pairs: list[tuple[str, int | float]] = [("requests", 1)]
    if usage.estimated:
        pairs.append(("estimated_requests", 1))
    for name, value in (
        ("prompt_tokens", usage.prompt_tokens),
        ("completion_tokens", usage.completion_tokens),
        ("cached_tokens", usage.cached_tokens),
        ("cost_usd", cost),
        ("saved_usd", saved),
    ):
        if value:
            pairs.append((name, value))
    return tuple(pairs)


def _empty() -> dict[str, int | float]:
    return {"requests": 0, "estimated_requests": 0, "prompt_tokens": 0,
            "completion_tokens": 0, "cached_tokens": 0, "cost_usd": 0.0,
            "cache_hits": 0, "saved_usd": 0.0}  # fmt: skip


def usage_keys(prefix: str = "relay") -> UsageKeys:
    """The Redis keys of the usage totals under ``prefix``.

    The one place that names them. All of them carry the hash tag
    ``{usage}``, so they sit in one Redis Cluster slot and one script may
    touch them all.
    """
    base = f"{prefix}:{{usage}}"
    return UsageKeys(
        totals=f"{base}:totals",
        models=f"{base}:models",
        keys=f"{base}:keys",
        keyset=f"{base}:keyset",
        since=f"{base}:since",
        writers=f"{base}:writer:",
    )


@dataclass(frozen=True, slots=True)
class UsageKeys:
    totals: str  # hash: counter -> amount
    models: str  # hash: "<label>|<counter>" -> amount
    keys: str  # hash: "<key hash>|<counter>" -> amount
    keyset: str  # set: the key hashes that have a row (bounded)
    since: str  # string: when counting began
    writers: str  # prefix of "<writer id>" -> last batch number applied

    def writer(self, writer_id: str) -> str:
        return self.writers + writer_id


# How long Redis remembers a writer's last batch number after its last
# batch. A batch whose reply was lost is resent when Redis answers again; an
# outage longer than this could count that one batch twice.
WRITER_MEMORY_SECONDS = 7 * 86400
_HASHES = (("totals", 1), ("models", 2), ("keys", 3))


class RedisUsageLedger:
    """The same totals in Redis, shared by every instance using it.

    Layout: see :func:`usage_keys` (hash ``totals``, hashes ``models`` and
    ``keys`` with fields ``<name>|<counter>``, set ``keyset`` bounding the
    key hashes, string ``since``). Totals are added in batches (a
    :class:`UsageLedger` of any number of records) by one server-side script
    (``lua/usage_batch.lua``): a reader never sees a request counted in the
    totals but not per model, the key bound is checked in the same step, and
    a batch carries its writer's id and sequence number so that sending it
    again after an ambiguous failure applies it once.

    Every call is bounded by ``timeout`` seconds; any Redis error or
    timeout propagates, for the caller to keep the batch and retry it.
    ``runner`` replaces that: each Redis round trip is then made as
    ``await runner(fn)`` with a zero-argument coroutine function ``fn``
    (e.g. ``RedisConnection.execute``, which adds its own deadline, health
    state and error counting, and raises its own error type).
    """

    def __init__(
        self,
        client: Any,
        prefix: str = "relay",
        timeout: float | None = 0.25,
        max_keys: int = 10000,
        runner: Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]] | None = None,
    ) -> None:
        self._client = client
        self._timeout = timeout
        self._runner = runner
        self.max_keys = max_keys
        self.keys = usage_keys(prefix)
        self._script = client.register_script(_load_script())
        # The snapshot's reads are one MULTI/EXEC, except on a Redis Cluster
        # (a client with a nodes_manager): redis-py's asyncio cluster client
        # runs each command queued in a transaction through asyncio.run on a
        # helper thread that the event loop waits for (and deadlocks on while
        # the slot table is unknown). There they go as one plain pipeline to
        # the node holding the {usage} slot; batches are written by the
        # script alone either way, so a reader can at worst see the totals
        # of one batch more than the rows read a moment earlier.
        self._atomic = not hasattr(client, "nodes_manager")
        # For record(): this ledger as a writer of one-record batches.
        import uuid

        self._writer_id = uuid.uuid4().hex
        self._seq = 0
        self._record_lock = asyncio.Lock()

    async def _call(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        """One round trip, bounded by the timeout (or made by the runner)."""
        if self._runner is not None:
            return await self._runner(fn)
        if self._timeout is None:
            return await fn()
        async with asyncio.timeout(self._timeout):
            return await fn()

    async def add(self, batch: UsageLedger, writer_id: str, seq: int) -> bool:
        """Add ``batch`` unless batch ``seq`` of ``writer_id`` was added
        before; True when this call added it. A writer sends its batches in
        order, one at a time, and resends a batch (same ``seq``) until a
        call returns."""
        k = self.keys
        args: list[str | int] = [
            seq, WRITER_MEMORY_SECONDS, self.max_keys, _iso(time.time()), OTHER
        ]
        for group, index in _HASHES:
            for owner, row in batch.rows(group):
                for name, amount in row.items():
                    if amount:
                        kind = "f" if name in FLOAT_FIELDS else "i"
                        args += (kind, index, owner, name, repr(amount))
        keys = (k.totals, k.models, k.keys, k.keyset, k.since, k.writer(writer_id))
        applied = await self._call(partial(self._script, keys, args))
        return int(applied) == 1

    async def record(
        self,
        model_label: str,
        key_hash: str,
        usage: Usage,
        cost: float,
        saved: float = 0.0,
        hit: bool = False,
    ) -> None:
        """Add one request now (a batch of one). Calls are made one at a time:
        batch numbers must reach Redis in order."""
        batch = UsageLedger(max_keys=self.max_keys)
        batch.record(model_label, key_hash, usage, cost, saved, hit)
        async with self._record_lock:
            self._seq += 1
            await self.add(batch, self._writer_id, self._seq)

    async def snapshot(self) -> dict[str, Any]:
        k = self.keys
        pipe = self._client.pipeline(transaction=self._atomic)
        pipe.get(k.since)
        pipe.hgetall(k.totals)
        pipe.hgetall(k.models)
        pipe.hgetall(k.keys)
        since, totals, models, keys = await self._call(pipe.execute)
        return {
            "since": _text(since) if since else _iso(time.time()),
            "totals": _row(totals.items()),
            "models": _grouped(models),
            "keys": _grouped(keys),
        }


def _load_script() -> str:
    import importlib.resources  # Redis only

    return (
        importlib.resources.files("relay")
        .joinpath("lua", "usage_batch.lua")
        .read_text(encoding="utf-8")
    )


class SharedUsage:
    """What one process records into Redis: sent there exactly once, and
    kept in memory until Redis confirmed it.

    ``record()`` never awaits: it adds to the batch being gathered and, when
    no send is under way, starts one (one task per send, not per request;
    under load a send carries every record made during the previous one).
    A send that fails, however it fails (refused, timed out before or after
    the server applied it), keeps its batch and its sequence number; it is
    sent again, unchanged, once Redis answers (checked every
    ``retry_interval`` seconds while something waits), and the script
    applies it only if it was not applied before. Meanwhile new records
    gather in the next batch. So totals recorded during an outage reach
    Redis when it returns, once, and nothing is lost or doubled.
    ``unconfirmed()`` is what Redis may not have yet (the memory view during
    an outage).

    ``on_outage_change`` is called when the unconfirmed part changes while
    Redis is unreachable, and once more when it has all been confirmed (the
    caller mirrors it to a file other workers read).
    """

    def __init__(
        self,
        ledger: RedisUsageLedger,
        conn: RedisConnection,
        loop: asyncio.AbstractEventLoop,
        *,
        retry_interval: float = 1.0,
        on_outage_change: Callable[[], None] | None = None,
    ) -> None:
        self.ledger = ledger
        self.conn = conn
        self.loop = loop
        self.retry_interval = retry_interval
        self._on_outage_change = on_outage_change
        import uuid

        self._writer_id = uuid.uuid4().hex
        self._seq = 0
        self._pending = UsageLedger(max_keys=ledger.max_keys)
        # The batch sent and not confirmed: (writer id, seq, batch).
        self._sent: tuple[str, int, UsageLedger] | None = None
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[bool] | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._outage_reported = False
        self._closed = False

    # -- recording -----------------------------------------------------------

    def record(
        self,
        model_label: str,
        key_hash: str,
        usage: Usage,
        cost: float,
        saved: float = 0.0,
        hit: bool = False,
    ) -> None:
        self._pending.record(model_label, key_hash, usage, cost, saved, hit)
        if self.conn.up:
            self._kick()
        else:
            self._outage_changed()
            self._schedule_retry()

    def _kick(self) -> None:
        if self._task is None and not self._closed:
            self._task = self.loop.create_task(self._send_all(), name="relay-usage-send")

    @debug.during("tasks")
    async def _send_all(self) -> bool:
        try:
            return await self.flush()
        finally:
            self._task = None

    def _schedule_retry(self) -> None:
        if self._retry is None and not self._closed:
            self._retry = self.loop.call_later(self.retry_interval, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        if not self.has_unconfirmed():
            return
        if self.conn.up:
            self._kick()
        else:
            self._schedule_retry()

    async def flush(self) -> bool:
        """Send everything recorded so far; True when Redis has all of it."""
        async with self._lock:
            return await self._flush_locked()

    async def _flush_locked(self) -> bool:
        while True:
            if self._sent is None:
                if self._pending.empty:
                    break
                self._seq += 1
                self._sent = (self._writer_id, self._seq, self._pending)
                self._pending = UsageLedger(max_keys=self.ledger.max_keys)
            writer_id, seq, batch = self._sent
            try:
                await self.ledger.add(batch, writer_id, seq)
            except Exception:
                # Unknown whether it was applied: keep it, resend it as is.
                self._schedule_retry()
                return False
            self._sent = None
        if self._outage_reported:
            self._outage_reported = False
            self._notify()
        return True

    # -- reading ---------------------------------------------------------------

    def has_unconfirmed(self) -> bool:
        return self._sent is not None or not self._pending.empty

    def unconfirmed(self) -> dict[str, Any]:
        """A snapshot of what Redis may not have yet."""
        parts = [self._pending.snapshot()]
        if self._sent is not None:
            parts.append(self._sent[2].snapshot())
        return merge_snapshots(parts)

    async def snapshot(self) -> dict[str, Any] | None:
        """Redis' totals including everything this process recorded, or
        None when Redis cannot answer (use :meth:`unconfirmed`)."""
        if not self.conn.up:
            return None
        async with self._lock:
            if not await self._flush_locked():
                return None
            try:
                shared = await self.ledger.snapshot()
            except Exception:
                return None
        # Records made while the snapshot was read are in no batch yet.
        if self._pending.empty:
            return shared
        merged = merge_snapshots([shared, self._pending.snapshot()])
        merged["since"] = shared["since"]
        return merged

    # -- hand-over -------------------------------------------------------------

    def adopt(self, previous: SharedUsage) -> None:
        """Take over what ``previous`` (the writer of a replaced connection)
        had not confirmed; its batch in flight keeps its id and number."""
        previous.close()
        if previous._sent is not None and self._sent is None:
            # Resent under its own writer id and number: if the new
            # connection reaches the same Redis, it is not applied twice.
            self._sent = previous._sent
        elif previous._sent is not None:  # not for a fresh writer (the only use)
            self._pending.merge(previous._sent[2])
        self._pending.merge(previous._pending)
        previous._sent = None
        previous._pending = UsageLedger(max_keys=previous.ledger.max_keys)
        if self.has_unconfirmed():
            self._retry_now()

    def take_unconfirmed(self) -> UsageLedger:
        """Remove and return what Redis may not have (to keep it in memory)."""
        taken = self._pending
        if self._sent is not None:
            taken.merge(self._sent[2])
        self._sent = None
        self._pending = UsageLedger(max_keys=self.ledger.max_keys)
        return taken

    def close(self) -> None:
        """Stop sending (what is left stays readable through unconfirmed())."""
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None

    def _outage_changed(self) -> None:
        self._outage_reported = True
        self._notify()

    def _notify(self) -> None:
        if self._on_outage_change is not None:
            self._on_outage_change()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _num(field: str, value: bytes | str) -> int | float:
    text = _text(value)
    return float(text) if field in FLOAT_FIELDS else int(text)


def _row(items: Any) -> dict[str, int | float]:
    row = _empty()
    for field, value in items:
        name = _text(field)
        if name in row:
            row[name] = _num(name, value)
    return row


def _grouped(flat: dict[Any, Any]) -> dict[str, dict[str, int | float]]:
    rows: dict[str, dict[str, int | float]] = {}
    for field, value in flat.items():
        owner, _, name = _text(field).rpartition("|")
        if name not in FIELDS:
            continue
        row = rows.get(owner)
        if row is None:
            row = rows[owner] = _empty()
        row[name] = _num(name, value)
    return rows


def merge_snapshots(snapshots: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum the snapshots of several processes (workers without Redis)."""
    merged: dict[str, Any] = {"since": None, "totals": _empty(), "models": {}, "keys": {}}
    for snap in snapshots:
        since = snap.get("since")
        if since and (merged["since"] is None or since < merged["since"]):
            merged["since"] = since  # ISO 8601 UTC strings sort by time
        for name in FIELDS:
            merged["totals"][name] += snap.get("totals", {}).get(name, 0)
        for group in ("models", "keys"):
            rows = merged[group]
            for label, row in snap.get(group, {}).items():
                into = rows.get(label)
                if into is None:
                    into = rows[label] = _empty()
                for name in FIELDS:
                    into[name] += row.get(name, 0)
    if merged["since"] is None:
        merged["since"] = _iso(time.time())
    return merged
