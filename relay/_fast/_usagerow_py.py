"""Rows of usage totals (a model's, a key's, the overall one) and the
in-memory ledger that keeps them.

This one source is both twins: imported as is it is the pure implementation,
and setup.py compiles it unchanged into ``_usagerow_c`` with the declarations
of ``_usagerow_c.pxd`` (C doubles for the cost sums, C method calls; the
ledger's record, once per counted request, a C call into its rows), so the
two cannot drift. Keep it to what Cython compiles from plain Python.

A counted request adds to three rows; each row keeps its own sums, added in
the order the requests came, so every total is the very float the same
additions into a dictionary gave. The dictionary shape (:meth:`UsageRow.counts`)
is made only when the totals are read. Token and request counts stay Python
integers (no bound); the two USD sums are doubles, as Python floats are.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["ANONYMOUS", "OTHER", "ROW_FIELDS", "UsageLedger", "UsageRow", "add_paid"]

# The counters of a row, in the order a snapshot shows them.
ROW_FIELDS = (
    "requests",
    "estimated_requests",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cost_usd",
    "cache_hits",
    "saved_usd",
)


class UsageRow:
    """The sums one owner's counted requests add up to."""

    __slots__ = (
        "requests",
        "estimated_requests",
        "prompt_tokens",
        "completion_tokens",
        "cached_tokens",
        "cost_usd",
        "cache_hits",
        "saved_usd",
    )

    def __init__(self) -> None:
        self.requests = 0
        self.estimated_requests = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.cost_usd = 0.0
        self.cache_hits = 0
        self.saved_usd = 0.0

    def add_paid(
        self,
        estimated: bool,
        prompt: int,
        completion: int,
        cached: int,
        cost: float,
        saved: float,
    ) -> None:
        """One response from the upstream. A zero is not added: it changes no sum."""
        self.requests += 1
        if estimated:
            self.estimated_requests += 1
        if prompt:
            self.prompt_tokens += prompt
        if completion:
            self.completion_tokens += completion
        if cached:
            self.cached_tokens += cached
        if cost:
            self.cost_usd += cost
        if saved:
            self.saved_usd += saved

    def add_hit(self, saved: float) -> None:
        """One cache hit that avoided *saved* USD (its tokens were paid once)."""
        self.cache_hits += 1
        if saved:
            self.saved_usd += saved

    def add_row(self, other: UsageRow) -> None:
        """Add every sum of *other* (another process's or batch's row)."""
        self.requests += other.requests
        self.estimated_requests += other.estimated_requests
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cached_tokens += other.cached_tokens
        self.cost_usd += other.cost_usd
        self.cache_hits += other.cache_hits
        self.saved_usd += other.saved_usd

    def counts(self) -> dict[str, int | float]:
        """The row as a snapshot shows it (the fields of :data:`ROW_FIELDS`)."""
        return {
            "requests": self.requests,
            "estimated_requests": self.estimated_requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "cost_usd": self.cost_usd,
            "cache_hits": self.cache_hits,
            "saved_usd": self.saved_usd,
        }


def add_paid(
    totals: UsageRow,
    model_row: UsageRow,
    key_row: UsageRow,
    estimated: bool,
    prompt: int,
    completion: int,
    cached: int,
    cost: float,
    saved: float,
) -> None:
    """One response from the upstream, added to the three rows it counts in."""
    totals.add_paid(estimated, prompt, completion, cached, cost, saved)
    model_row.add_paid(estimated, prompt, completion, cached, cost, saved)
    key_row.add_paid(estimated, prompt, completion, cached, cost, saved)


# Owners past the key bound share this row; callers without a credential this one.
OTHER = "other"
ANONYMOUS = "anonymous"


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class UsageLedger:
    """In-memory totals of this process since it started.

    Each owner's sums are a :class:`UsageRow` (a record adds to three of
    them); the dictionary shape of a snapshot is made when the totals are
    read. *usage* is any object with a Usage's token fields
    (``relay.accounting.usage.Usage``).
    """

    def __init__(self, max_keys: int = 10000, now: float | None = None) -> None:
        self.max_keys = max_keys
        self._since = time.time() if now is None else now
        self._totals = UsageRow()
        self._models: dict[str, UsageRow] = {}
        self._keys: dict[str, UsageRow] = {}

    def _key_row(self, key: str) -> UsageRow:
        """The row of *key*, made on its first record (past the bound: other's)."""
        keys = self._keys
        row = keys.get(key)
        if row is None:
            if len(keys) >= self.max_keys:
                key = OTHER
                row = keys.get(OTHER)
            if row is None:
                row = keys[key] = UsageRow()
        return row

    def record(
        self,
        model_label: str,
        key_hash: str,
        usage: Any,
        cost: float,
        saved: float = 0.0,
        hit: bool = False,
    ) -> None:
        """Add one request: ``cost`` paid upstream; or, with ``hit``, a cache
        hit that avoided ``saved`` (its tokens are not added again)."""
        row = self._keys.get(key_hash or ANONYMOUS)
        if row is None:
            row = self._key_row(key_hash or ANONYMOUS)
        model_row = self._models.get(model_label)
        if model_row is None:
            model_row = self._models[model_label] = UsageRow()
        # The same additions as _increments gives, into each of the three.
        if hit:
            self._totals.add_hit(saved)
            model_row.add_hit(saved)
            row.add_hit(saved)
            return
        add_paid(
            self._totals, model_row, row, usage.estimated, usage.prompt_tokens,
            usage.completion_tokens, usage.cached_tokens, cost, saved,
        )  # fmt: skip

    @property
    def empty(self) -> bool:
        """True while nothing was recorded (every record adds a request or a hit)."""
        totals = self._totals
        return not totals.requests and not totals.cache_hits

    @property
    def since_time(self) -> float:
        return self._since

    def rows(self, group: str) -> list[tuple[str, dict[str, int | float]]]:
        """(owner, counters) of ``group``: "totals" (owner ""), "models" or "keys"."""
        if group == "totals":
            return [("", self._totals.counts())]
        rows = self._models if group == "models" else self._keys
        return [(owner, row.counts()) for owner, row in rows.items()]

    def merge(self, other: UsageLedger) -> None:
        """Add ``other``'s totals to these (keys beyond the bound go to other)."""
        self._since = min(self._since, other._since)
        self._totals.add_row(other._totals)
        for label, row in other._models.items():
            into = self._models.get(label)
            if into is None:
                into = self._models[label] = UsageRow()
            into.add_row(row)
        for key, row in other._keys.items():
            self._key_row(key).add_row(row)

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy of the totals."""
        return {
            "since": _iso(self._since),
            "totals": self._totals.counts(),
            "models": {name: row.counts() for name, row in self._models.items()},
            "keys": {name: row.counts() for name, row in self._keys.items()},
        }
