"""The memory cache's table, for both twins: same answers, same order, same errors."""

from __future__ import annotations

import gc
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import relay._fast as fast


def test_most_recently_used_last_and_oldest_first(impl: fast.Implementation) -> None:
    table = impl.LruTable(3)
    for key in (b"a", b"b", b"c"):
        table.put(key, key.upper())
    assert table.get(b"a") == b"A"  # now the most recent
    assert table.values() == [b"B", b"C", b"A"]
    assert table.pop_oldest() == (b"b", b"B")
    table.put(b"c", b"C2")  # replaced, and the most recent
    assert table.values() == [b"A", b"C2"]
    assert len(table) == 2 and table.capacity == 3


def test_a_full_table_refuses_a_new_key_but_replaces_an_old_one(impl: fast.Implementation) -> None:
    table = impl.LruTable(2)
    table.put(b"a", 1)
    table.put(b"b", 2)
    with pytest.raises(OverflowError):
        table.put(b"c", 3)
    table.put(b"a", 10)
    assert table.values() == [2, 10]
    assert impl.LruTable(0).values() == []
    with pytest.raises(OverflowError):
        impl.LruTable(0).put(b"a", 1)


def test_keys_longer_than_32_bytes_and_none_values_are_refused(impl: fast.Implementation) -> None:
    table = impl.LruTable(4)
    table.put(b"k" * 32, 1)
    with pytest.raises(ValueError, match="32 bytes"):
        table.put(b"k" * 33, 1)
    with pytest.raises(ValueError, match="None"):
        table.put(b"a", None)
    assert table.get(b"k" * 33) is None and table.pop(b"k" * 33) is None
    assert table.get(b"k" * 32) == 1
    with pytest.raises(ValueError, match="negative"):
        impl.LruTable(-1)
    with pytest.raises(KeyError):
        impl.LruTable(1).pop_oldest()
    with pytest.raises(TypeError):
        table.put("text", 1)  # type: ignore[arg-type]


def test_the_table_holds_one_reference_to_each_value(impl: fast.Implementation) -> None:
    value = object()
    before = sys.getrefcount(value)
    table = impl.LruTable(8)
    for i in range(6):
        table.put(b"%d" % i, value)
    table.put(b"0", value)  # replaced by itself
    table.pop(b"1")
    table.pop_oldest()
    assert sys.getrefcount(value) == before + 4
    table.clear()
    assert sys.getrefcount(value) == before and len(table) == 0
    table.put(b"x", value)
    del table
    gc.collect()
    assert sys.getrefcount(value) == before


_KEYS = st.binary(min_size=0, max_size=3) | st.binary(min_size=32, max_size=32)
_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("put"), _KEYS, st.integers(0, 9)),
        st.tuples(st.just("get"), _KEYS),
        st.tuples(st.just("pop"), _KEYS),
        st.tuples(st.just("pop_oldest")),
        st.tuples(st.just("clear")),
    ),
    max_size=200,
)


def _apply(table: object, op: tuple[object, ...]) -> object:
    name, *args = op
    try:
        return getattr(table, str(name))(*args)
    except (OverflowError, KeyError) as exc:
        return type(exc)


@settings(max_examples=300, deadline=None)
@given(capacity=st.integers(0, 12), ops=_OPS)
def test_the_twins_agree_on_any_sequence(capacity: int, ops: list[tuple[object, ...]]) -> None:
    """Short keys collide in few buckets: the probing and the backward-shift
    deletion of the compiled twin are exercised hard."""
    pure = fast.pure.LruTable(capacity)
    compiled = fast.compiled.LruTable(capacity) if fast.compiled is not None else None
    if compiled is None:
        pytest.skip(f"compiled relay._fast not loaded: {fast.COMPILED_IMPORT_ERROR}")
    for op in ops:
        assert _apply(pure, op) == _apply(compiled, op), op
        assert pure.values() == compiled.values()
        assert len(pure) == len(compiled)
    for key in {op[1] for op in ops if len(op) > 1}:
        assert pure.get(key) == compiled.get(key)


def test_many_keys_in_a_large_table_are_all_found_after_churn(impl: fast.Implementation) -> None:
    table = impl.LruTable(1000)
    for i in range(5000):
        if len(table) == 1000:
            table.pop_oldest()
        table.put(i.to_bytes(32, "big"), i)
    assert len(table) == 1000
    assert all(table.get(i.to_bytes(32, "big")) == i for i in range(4000, 5000))
    assert all(table.get(i.to_bytes(32, "big")) is None for i in range(0, 4000, 7))


def test_any_bound_is_accepted_and_memory_follows_the_entries(impl: fast.Implementation) -> None:
    """cache.max_entries may be configured up to 2**31 - 1: the table is a
    bound, not an allocation."""
    table = impl.LruTable(2**31 - 1)
    for i in range(3000):
        table.put(i.to_bytes(4, "big"), i)
    assert len(table) == 3000 and table.capacity == 2**31 - 1
    assert [table.pop_oldest()[1] for _ in range(3)] == [0, 1, 2]
    assert table.get((2999).to_bytes(4, "big")) == 2999
