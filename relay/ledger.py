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
from functools import partial
from typing import Any

from relay.usage import Usage

__all__ = ["ANONYMOUS", "FIELDS", "OTHER", "RedisUsageLedger", "UsageLedger"]

OTHER = "other"
ANONYMOUS = "anonymous"
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
_FULL_RECHECK = 60.0  # seconds


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


class UsageLedger:
    """In-memory totals of this process since it started."""

    def __init__(self, max_keys: int = 10000, now: float | None = None) -> None:
        self.max_keys = max_keys
        self._since = time.time() if now is None else now
        self._totals = _empty()
        self._models: dict[str, dict[str, int | float]] = {}
        self._keys: dict[str, dict[str, int | float]] = {}

    def record(
        self,
        model_label: str,
        key_hash: str,
        usage: Usage,
        cost: float,
        saved: float = 0.0,
        hit: bool = False,
    ) -> None:
        """Add one request: ``cost`` paid upstream; or, with ``hit``, a cache
        hit that avoided ``saved`` (its tokens are not added again)."""
        key = key_hash or ANONYMOUS
        keys = self._keys
        row = keys.get(key)
        if row is None:
            if len(keys) >= self.max_keys:
                key = OTHER
                row = keys.get(OTHER)
            if row is None:
                row = keys[key] = _empty()
        model_row = self._models.get(model_label)
        if model_row is None:
            model_row = self._models[model_label] = _empty()
        totals = self._totals
        for name, amount in _increments(usage, cost, saved, hit):
            totals[name] += amount
            model_row[name] += amount
            row[name] += amount

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy of the totals."""
        return {
            "since": _iso(self._since),
            "totals": dict(self._totals),
            "models": {name: dict(row) for name, row in self._models.items()},
            "keys": {name: dict(row) for name, row in self._keys.items()},
        }


class RedisUsageLedger:
    """The same totals in Redis, shared by every instance using it.

    Layout (``P`` = prefix): hash ``P:totals`` (field per counter), hashes
    ``P:models`` and ``P:keys`` (field ``<name>|<counter>``; model labels
    and key hashes never contain ``|``), set ``P:keyset`` (the bound on key
    hashes), string ``P:since``. One ``record()`` is one MULTI/EXEC
    pipeline of HINCRBY/HINCRBYFLOAT, so a reader never sees a request
    counted in the totals but not yet per model. A key hash this process
    has not seen before costs one extra round trip (is there room for
    it?); once the set is full the process reads it (it is bounded) and
    answers from that copy for a minute. With many instances adding keys
    at the same moment the bound can be overshot by a few. The prefix
    carries a hash tag (``relay:{usage}``): every key of the ledger lives
    in one hash slot, so the transaction and the snapshot's reads run
    unchanged on a Redis Cluster (one node holds the totals).

    On a Redis Cluster (``client`` a ``RedisCluster``) the same commands go
    as one plain pipeline to the node holding the slot, not as MULTI/EXEC:
    redis-py's asyncio cluster client runs each command queued in a
    transaction on a helper thread that blocks the event loop, which a
    gateway cannot afford per request. The counts are the same; a reader
    racing a write may see a request in the totals a moment before it
    shows per model.

    Every call is bounded by ``timeout`` seconds; any Redis error or
    timeout propagates, for the caller to fall back to memory and count it.
    ``runner`` replaces that: each Redis round trip is then made as
    ``await runner(fn)`` with a zero-argument coroutine function ``fn``
    (e.g. ``RedisConnection.execute``, which adds its own deadline, health
    state and error counting, and raises its own error type).
    """

    def __init__(
        self,
        client: Any,
        prefix: str = "relay:{usage}",
        timeout: float | None = 0.25,
        max_keys: int = 10000,
        runner: Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]] | None = None,
    ) -> None:
        self._client = client
        self._timeout = timeout
        self._runner = runner
        self.max_keys = max_keys
        self._k_totals = f"{prefix}:totals"
        self._k_models = f"{prefix}:models"
        self._k_keys = f"{prefix}:keys"
        self._k_keyset = f"{prefix}:keyset"
        self._k_since = f"{prefix}:since"
        # A cluster client has a nodes_manager; plain and Sentinel clients do not.
        self._atomic = not hasattr(client, "nodes_manager")
        # Key hashes known to have a slot in Redis (bounded like Redis's set).
        self._known: set[str] = set()
        self._full_until = 0.0

    async def _call(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        """One round trip, bounded by the timeout (or made by the runner)."""
        if self._runner is not None:
            return await self._runner(fn)
        if self._timeout is None:
            return await fn()
        async with asyncio.timeout(self._timeout):
            return await fn()

    async def _slot(self, key: str) -> str:
        """``key`` if it has (or gets) a place within the bound, else other."""
        if key in self._known:
            return key
        if time.monotonic() < self._full_until:
            return OTHER
        pipe = self._client.pipeline(transaction=False)
        pipe.sismember(self._k_keyset, key)
        pipe.scard(self._k_keyset)
        member, size = await self._call(pipe.execute)
        if not member and int(size) >= self.max_keys:
            # Full: learn the whole (bounded) set once, then answer from it
            # without a round trip for a while; keys never leave the set.
            members = await self._call(partial(self._client.smembers, self._k_keyset))
            self._known = {_text(m) for m in members}
            self._full_until = time.monotonic() + _FULL_RECHECK
            return OTHER
        if len(self._known) < self.max_keys:
            self._known.add(key)
        return key

    async def record(
        self,
        model_label: str,
        key_hash: str,
        usage: Usage,
        cost: float,
        saved: float = 0.0,
        hit: bool = False,
    ) -> None:
        key = await self._slot(key_hash or ANONYMOUS)
        pipe = self._client.pipeline(transaction=self._atomic)
        pipe.set(self._k_since, _iso(time.time()), nx=True)
        if key != OTHER:
            pipe.sadd(self._k_keyset, key)
        for name, amount in _increments(usage, cost, saved, hit):
            if isinstance(amount, int):
                pipe.hincrby(self._k_totals, name, amount)
                pipe.hincrby(self._k_models, f"{model_label}|{name}", amount)
                pipe.hincrby(self._k_keys, f"{key}|{name}", amount)
            else:
                pipe.hincrbyfloat(self._k_totals, name, amount)
                pipe.hincrbyfloat(self._k_models, f"{model_label}|{name}", amount)
                pipe.hincrbyfloat(self._k_keys, f"{key}|{name}", amount)
        await self._call(pipe.execute)

    async def snapshot(self) -> dict[str, Any]:
        pipe = self._client.pipeline(transaction=self._atomic)
        pipe.get(self._k_since)
        pipe.hgetall(self._k_totals)
        pipe.hgetall(self._k_models)
        pipe.hgetall(self._k_keys)
        since, totals, models, keys = await self._call(pipe.execute)
        return {
            "since": _text(since) if since else _iso(time.time()),
            "totals": _row(totals.items()),
            "models": _grouped(models),
            "keys": _grouped(keys),
        }


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
