"""Rows of usage totals, for both twins: the sums a dictionary of counters gave."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import relay._fast as fast
from relay._fast._usagerow_py import ROW_FIELDS

# One counted request: ("paid", estimated, prompt, completion, cached, cost, saved) or
# ("hit", saved).
paid = st.tuples(
    st.just("paid"),
    st.booleans(),
    st.integers(0, 2**70),
    st.integers(0, 2**40),
    st.integers(0, 2**40),
    st.floats(0, 1e6, allow_nan=False) | st.just(0.0),
    st.floats(0, 1e6, allow_nan=False) | st.just(0.0),
)
hit = st.tuples(st.just("hit"), st.floats(0, 1e6, allow_nan=False) | st.just(0.0))
records = st.lists(paid | hit, max_size=40)


def dict_sums(events: list[tuple[Any, ...]]) -> dict[str, int | float]:
    """The totals as a dictionary of counters adds them up (the reference)."""
    row: dict[str, int | float] = {
        "requests": 0, "estimated_requests": 0, "prompt_tokens": 0, "completion_tokens": 0,
        "cached_tokens": 0, "cost_usd": 0.0, "cache_hits": 0, "saved_usd": 0.0,
    }  # fmt: skip
    for event in events:
        if event[0] == "hit":
            row["cache_hits"] += 1
            if event[1]:
                row["saved_usd"] += event[1]
            continue
        _, estimated, prompt, completion, cached, cost, saved = event
        row["requests"] += 1
        if estimated:
            row["estimated_requests"] += 1
        if prompt:
            row["prompt_tokens"] += prompt
        if completion:
            row["completion_tokens"] += completion
        if cached:
            row["cached_tokens"] += cached
        if cost:
            row["cost_usd"] += cost
        if saved:
            row["saved_usd"] += saved
    return row


def add(row: Any, events: list[tuple[Any, ...]]) -> None:
    for event in events:
        if event[0] == "hit":
            row.add_hit(event[1])
        else:
            row.add_paid(*event[1:])


def same(counts: dict[str, int | float], expected: dict[str, int | float]) -> None:
    """Equal and of the same types, floats to the last bit."""
    assert list(counts) == list(expected) == list(ROW_FIELDS)
    for name, value in expected.items():
        assert type(counts[name]) is type(value), name
        assert counts[name] == value, name


def test_a_new_row_is_all_zero(impl: fast.Implementation) -> None:
    same(impl.UsageRow().counts(), dict_sums([]))


@settings(max_examples=200, deadline=None)
@given(records)
def test_rows_sum_as_a_dictionary_of_counters_does(events: list[tuple[Any, ...]]) -> None:
    expected = dict_sums(events)
    implementations = [fast.pure] + ([fast.compiled] if fast.compiled is not None else [])
    for impl in implementations:
        row = impl.UsageRow()
        add(row, events)
        same(row.counts(), expected)


@settings(max_examples=100, deadline=None)
@given(records, records)
def test_added_rows_sum_field_by_field(first: list[Any], second: list[Any]) -> None:
    a, b = dict_sums(first), dict_sums(second)
    expected = {name: a[name] + b[name] for name in ROW_FIELDS}
    implementations = [fast.pure] + ([fast.compiled] if fast.compiled is not None else [])
    for impl in implementations:
        row, other = impl.UsageRow(), impl.UsageRow()
        add(row, first)
        add(other, second)
        row.add_row(other)
        same(row.counts(), expected)
        same(other.counts(), b)  # the added row is left as it was


def test_add_paid_adds_to_each_of_three_rows(impl: fast.Implementation) -> None:
    rows = [impl.UsageRow() for _ in range(3)]
    rows[1].add_paid(False, 5, 0, 0, 0.5, 0.0)
    impl.add_paid(*rows, True, 10, 3, 2, 0.25, 0.0)
    same(rows[0].counts(), dict_sums([("paid", True, 10, 3, 2, 0.25, 0.0)]))
    same(
        rows[1].counts(),
        dict_sums([("paid", False, 5, 0, 0, 0.5, 0.0), ("paid", True, 10, 3, 2, 0.25, 0.0)]),
    )
    same(rows[2].counts(), rows[0].counts())


def test_counts_beyond_64_bits_stay_exact(impl: fast.Implementation) -> None:
    row = impl.UsageRow()
    row.add_paid(False, 2**70, 2**65, 3, 0.0, 0.0)
    row.add_paid(False, 2**70, 1, 0, 0.0, 0.0)
    counts = row.counts()
    assert counts["prompt_tokens"] == 2**71
    assert counts["completion_tokens"] == 2**65 + 1


def test_a_count_that_is_not_a_number_is_refused(impl: fast.Implementation) -> None:
    with pytest.raises(TypeError):
        impl.UsageRow().add_paid(False, "12", 0, 0, 0.0, 0.0)


class _Usage:
    """The token fields the ledger reads of a Usage."""

    def __init__(self, estimated: bool, prompt: int, completion: int, cached: int) -> None:
        self.estimated = estimated
        self.prompt_tokens = prompt
        self.completion_tokens = completion
        self.cached_tokens = cached


owners = st.sampled_from(["", "k1", "k2", "k3", "k4"])
ledger_records = st.lists(st.tuples(st.sampled_from(["gpt-4o", "other", "m"]), owners, paid | hit),
                          max_size=30)


def _ledger(impl: Any, events: list[tuple[Any, ...]], max_keys: int) -> Any:
    ledger = impl.UsageLedger(max_keys=max_keys, now=100.0)
    for label, owner, event in events:
        if event[0] == "hit":
            ledger.record(label, owner, None, 0.0, event[1], True)
        else:
            _, estimated, prompt, completion, cached, cost, saved = event
            ledger.record(label, owner, _Usage(estimated, prompt, completion, cached), cost, saved)
    return ledger


@settings(max_examples=200, deadline=None)
@given(ledger_records, ledger_records, st.integers(1, 4))
def test_both_ledgers_keep_the_same_rows(
    first: list[Any], second: list[Any], max_keys: int
) -> None:
    """Records and merges, past the key bound too: the same snapshots from
    both twins, and each row the sums of exactly its owner's records."""
    snapshots = []
    implementations = [fast.pure] + ([fast.compiled] if fast.compiled is not None else [])
    for impl in implementations:
        merged = _ledger(impl, first, max_keys)
        merged.merge(_ledger(impl, second, max_keys))
        whole = _ledger(impl, first + second, max_keys)
        assert whole.empty is (not first and not second)
        snapshots.append((merged.snapshot(), whole.snapshot()))
    assert all(pair == snapshots[0] for pair in snapshots)
    whole = snapshots[0][1]
    events = first + second
    same(whole["totals"], dict_sums([e for _, _, e in events]))
    for label, counts in whole["models"].items():
        same(counts, dict_sums([e for m, _, e in events if m == label]))
    keys = whole["keys"]
    assert len(keys) <= max_keys + 1  # the bound, and "other" for the rest
    if "other" not in keys:
        for owner, counts in keys.items():
            same(counts, dict_sums([e for _, o, e in events if (o or "anonymous") == owner]))
