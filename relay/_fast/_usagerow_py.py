"""One row of usage totals (a model's, a key's, the overall one).

This one source is both twins: imported as is it is the pure implementation,
and setup.py compiles it unchanged into ``_usagerow_c`` with the declarations
of ``_usagerow_c.pxd`` (C doubles for the cost sums, C method calls), so the
two cannot drift. Keep it to what Cython compiles from plain Python.

A counted request adds to three rows; each row keeps its own sums, added in
the order the requests came, so every total is the very float the same
additions into a dictionary gave. The dictionary shape (:meth:`UsageRow.counts`)
is made only when the totals are read. Token and request counts stay Python
integers (no bound); the two USD sums are doubles, as Python floats are.
"""

from __future__ import annotations

__all__ = ["ROW_FIELDS", "UsageRow", "add_paid"]

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
