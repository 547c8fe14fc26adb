from __future__ import annotations

from dataclasses import dataclass

import pytest

from relay.accounting.cost import OTHER, ModelLabels, PriceTable, price_cost, sanitize_label
from relay.accounting.usage import Usage


@dataclass(frozen=True)
class Price:
    input: float
    output: float
    cached_input: float | None = None
    cache_write_input: float | None = None


TABLE = {
    "gpt-4": Price(0.03, 0.03),
    "gpt-4o": Price(0.0025, 0.01, 0.00125),
    "gpt-4o-mini": Price(0.00015, 0.0006, 0.000075),
    "claude-3-5-sonnet": Price(0.003, 0.015, 0.0003),
}


def test_exact_lookup() -> None:
    table = PriceTable(TABLE)
    assert table.lookup("gpt-4") is TABLE["gpt-4"]
    assert table.lookup("gpt-4o-mini") is TABLE["gpt-4o-mini"]


def test_longest_prefix_wins() -> None:
    table = PriceTable(TABLE)
    assert table.lookup("gpt-4o-2024-08-06") is TABLE["gpt-4o"]
    assert table.lookup("gpt-4o-mini-2024-07-18") is TABLE["gpt-4o-mini"]
    assert table.lookup("gpt-4-turbo") is TABLE["gpt-4"]
    assert table.lookup("claude-3-5-sonnet-20241022") is TABLE["claude-3-5-sonnet"]


def test_unknown_model_costs_nothing() -> None:
    table = PriceTable(TABLE)
    assert table.lookup("llama-3") is None
    assert table.lookup("gpt-") is None  # shorter than every name: no prefix match
    assert table.cost(Usage("llama-3", 1000, 1000)) == 0.0


def test_memo_is_bounded_and_consistent() -> None:
    table = PriceTable(TABLE)
    for i in range(10000):
        assert table.lookup(f"unknown-{i}") is None
    assert len(table._memo) <= 4096
    assert table.lookup("gpt-4o-x") is TABLE["gpt-4o"]
    assert table.lookup("gpt-4o-x") is TABLE["gpt-4o"]


def test_cost_plain() -> None:
    table = PriceTable(TABLE)
    # 1500 in, 500 out at 0.03/1K each
    assert table.cost(Usage("gpt-4", 1500, 500)) == pytest.approx(0.06, abs=1e-12)


def test_cost_with_cached_price() -> None:
    table = PriceTable(TABLE)
    usage = Usage("gpt-4o-2024-08-06", 1200, 30, 1024)
    expected = 176 / 1000 * 0.0025 + 1024 / 1000 * 0.00125 + 30 / 1000 * 0.01
    assert table.cost(usage) == pytest.approx(expected, abs=1e-12)
    assert abs(table.cost(usage) - 0.00202) < 1e-12


def test_cached_tokens_without_cached_price_cost_full_input() -> None:
    table = PriceTable(TABLE)
    with_cache = table.cost(Usage("gpt-4", 1000, 0, 800))
    assert abs(with_cache - 0.03) < 1e-12


def test_anthropic_cache_reads() -> None:
    table = PriceTable(TABLE)
    # 10 uncached + 5 cache-write + 100 cache-read in, 12 out
    usage = Usage("claude-3-5-sonnet-20241022", 115, 12, 100)
    expected = 15 / 1000 * 0.003 + 100 / 1000 * 0.0003 + 12 / 1000 * 0.015
    assert abs(table.cost(usage) - expected) < 1e-12
    assert abs(expected - 0.000255) < 1e-12


def test_anthropic_cache_writes_at_cache_write_price() -> None:
    table = PriceTable({"claude-sonnet-4": Price(0.003, 0.015, 0.0003, 0.00375)})
    # 10 uncached + 5 cache-write + 100 cache-read in, 12 out
    usage = Usage("claude-sonnet-4-20250514", 115, 12, 100, cache_write_tokens=5)
    expected = 10 / 1000 * 0.003 + 5 / 1000 * 0.00375 + 100 / 1000 * 0.0003 + 12 / 1000 * 0.015
    assert table.cost(usage) == pytest.approx(expected, abs=1e-15)
    # Without a cache_write_input price the writes cost ordinary input.
    plain = PriceTable({"claude-sonnet-4": Price(0.003, 0.015, 0.0003)})
    assert plain.cost(usage) == pytest.approx(
        15 / 1000 * 0.003 + 100 / 1000 * 0.0003 + 12 / 1000 * 0.015, abs=1e-15
    )


def test_cache_writes_clamped_to_uncached_prompt() -> None:
    price = Price(1.0, 2.0, 0.5, 4.0)
    # 100 prompt of which 80 read: at most 20 can be writes.
    assert price_cost(price, 100, 0, 80, 500) == pytest.approx(80 / 1000 * 0.5 + 20 / 1000 * 4.0)
    assert price_cost(price, 100, 0, 0, -3) == pytest.approx(0.1)


def test_cached_clamped_to_prompt() -> None:
    price = Price(1.0, 2.0, 0.5)
    assert abs(price_cost(price, 100, 0, 500) - 0.05) < 1e-12
    assert abs(price_cost(price, 100, 0, -5) - 0.1) < 1e-12


def test_zero_usage_costs_zero() -> None:
    assert PriceTable(TABLE).cost(Usage("gpt-4o", 0, 0)) == 0.0


def test_with_config_model_price() -> None:
    config = pytest.importorskip("relay.config")
    table = PriceTable(
        {"gpt-4o": config.ModelPrice(input=0.0025, output=0.01, cached_input=0.00125)}
    )
    assert abs(table.cost(Usage("gpt-4o", 2000, 1000, 1000)) - 0.01375) < 1e-12


def test_empty_table() -> None:
    table = PriceTable({})
    assert len(table) == 0 and table.lookup("gpt-4") is None


# -- labels -------------------------------------------------------------------------


def test_sanitize_label() -> None:
    assert sanitize_label("gpt-4o-2024-08-06") == "gpt-4o-2024-08-06"
    assert sanitize_label("meta-llama/Llama-3.1-8B:free") == "meta-llama/Llama-3.1-8B:free"
    for bad in ("", "a b", 'x"y', "sk-\n", "é", "a" * 65, "x{y}"):
        assert sanitize_label(bad) == OTHER
    assert sanitize_label("a" * 64) == "a" * 64


def test_labels_bounded() -> None:
    labels = ModelLabels(max_labels=3)
    assert [labels.label(m) for m in ("a", "b", "a", "c", "d", "b", "e")] == [
        "a",
        "b",
        "a",
        "c",
        OTHER,
        "b",
        OTHER,
    ]
    assert len(labels) == 3


def test_invalid_names_do_not_use_slots() -> None:
    labels = ModelLabels(max_labels=2)
    assert labels.label("bad name") == OTHER
    assert labels.label("x" * 100) == OTHER
    assert labels.label("a") == "a" and labels.label("b") == "b"


def test_reserved_names_always_labelled() -> None:
    labels = ModelLabels(max_labels=2, reserved=("gpt-4o", "claude-3"))
    assert labels.label("random-model") == OTHER
    assert labels.label("gpt-4o") == "gpt-4o"
    assert labels.label("claude-3") == "claude-3"


def test_many_unknown_models_stay_bounded() -> None:
    labels = ModelLabels()
    seen = {labels.label(f"model-{i}") for i in range(1000)}
    assert len(seen) == 65  # 64 names + "other"
