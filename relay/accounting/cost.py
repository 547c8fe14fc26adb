"""Prices per model and the cost of a request's usage; bounded model labels.

Prices are USD per 1000 tokens (the ``models:`` config section). A model
is priced by its exact name, else by the longest configured name that is a
prefix of it (``gpt-4o-2024-08-06`` -> ``gpt-4o``). An unknown model costs
0: its tokens are still counted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Protocol

from relay.accounting.usage import Usage

__all__ = [
    "ModelLabels", "OTHER", "PriceLike", "PriceTable", "PriceTerms", "price_cost", "price_terms",
    "sanitize_label", "terms_cost",
]  # fmt: skip

OTHER = "other"
_LABEL_OK = re.compile(r"[A-Za-z0-9._:/-]{1,64}")
_MEMO_MAX = 4096


class PriceLike(Protocol):
    """The fields of ``relay.config.ModelPrice`` that pricing reads."""

    @property
    def input(self) -> float: ...

    @property
    def output(self) -> float: ...

    @property
    def cached_input(self) -> float | None: ...

    @property
    def cache_write_input(self) -> float | None: ...


class PriceTable:
    """Model prices with exact-then-longest-prefix lookup, memoized.

    Build a new table when the config changes (it is cheap); the memo of
    resolved names is bounded because model names come from clients.
    """

    __slots__ = ("_exact", "_by_length", "_memo")

    def __init__(self, models: Mapping[str, PriceLike]) -> None:
        self._exact: dict[str, PriceLike] = dict(models)
        # Longest names first so the first prefix hit is the longest one.
        self._by_length = sorted(self._exact.items(), key=lambda kv: len(kv[0]), reverse=True)
        self._memo: dict[str, PriceLike | None] = {}

    def __len__(self) -> int:
        return len(self._exact)

    def names(self) -> tuple[str, ...]:
        """The configured model names."""
        return tuple(self._exact)

    def lookup(self, model: str) -> PriceLike | None:
        """The price of ``model``: exact name, else longest prefix, else None."""
        try:
            return self._memo[model]
        except KeyError:
            pass
        price = self._exact.get(model)
        if price is None:
            for name, candidate in self._by_length:
                if model.startswith(name):
                    price = candidate
                    break
        if len(self._memo) >= _MEMO_MAX:
            self._memo.clear()
        self._memo[model] = price
        return price

    def cost(self, usage: Usage) -> float:
        """USD for ``usage``; cache reads at ``cached_input``, cache writes at
        ``cache_write_input``, where set."""
        price = self.lookup(usage.model)
        if price is None:
            return 0.0
        return price_cost(
            price,
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.cached_tokens,
            usage.cache_write_tokens,
        )


# The four USD-per-1000-token prices a cost multiplies: ordinary input,
# output, cache reads, cache writes (the last two already defaulted).
PriceTerms = tuple[float, float, float, float]


def price_terms(price: PriceLike) -> PriceTerms:
    """The prices :func:`terms_cost` multiplies, read once per model."""
    cached_price = price.cached_input if price.cached_input is not None else price.input
    write_price = price.cache_write_input if price.cache_write_input is not None else price.input
    return price.input, price.output, cached_price, write_price


def price_cost(
    price: PriceLike, prompt: int, completion: int, cached: int = 0, written: int = 0
) -> float:
    """The USD cost of one request's tokens.

    (prompt - cached - written)/1000*input + cached/1000*cached_input
    + written/1000*cache_write_input + completion/1000*output.

    ``cached`` (cache reads) and ``written`` (cache writes, Anthropic's
    ``cache_creation_input_tokens``) are part of ``prompt`` and clamped to
    it; without ``cached_input`` / ``cache_write_input`` they cost the
    ordinary input price.
    """
    return terms_cost(price_terms(price), prompt, completion, cached, written)


def terms_cost(
    terms: PriceTerms, prompt: int, completion: int, cached: int = 0, written: int = 0
) -> float:
    """:func:`price_cost` with the prices already read by :func:`price_terms`."""
    if not 0 <= cached <= prompt:
        cached = min(max(cached, 0), prompt)
    if not 0 <= written <= prompt - cached:
        written = min(max(written, 0), prompt - cached)
    input_price, output_price, cached_price, write_price = terms
    return (
        (prompt - cached - written) / 1000 * input_price
        + cached / 1000 * cached_price
        + written / 1000 * write_price
        + completion / 1000 * output_price
    )


def sanitize_label(value: str) -> str:
    """``value`` if it is 1-64 of ``[A-Za-z0-9._:/-]``, else ``other``."""
    return value if _LABEL_OK.fullmatch(value) else OTHER


class ModelLabels:
    """Metric label for a model name, with a bounded number of values.

    The first ``max_labels`` distinct (valid) names keep their own label;
    later new names, and names with odd characters or over 64 characters,
    become ``other``. Pass the configured model names as ``reserved`` so
    they always have their own label whatever clients send first (they
    count toward the bound).
    """

    __slots__ = ("_max", "_seen")

    def __init__(self, max_labels: int = 64, reserved: Iterable[str] = ()) -> None:
        self._max = max_labels
        self._seen: set[str] = set()
        self.reserve(reserved)

    def reserve(self, names: Iterable[str]) -> None:
        """Give configured names their own label (also after a reload).

        Labels handed out before stay, and their number still counts toward
        the bound: a reload must not give clients a fresh allowance of
        labels (the metrics keep every label value they ever saw). Reserved
        names may take the set past the bound; the operator chose them.
        """
        for name in names:
            if sanitize_label(name) != OTHER:
                self._seen.add(name)

    def __len__(self) -> int:
        return len(self._seen)

    def label(self, model: str) -> str:
        if model in self._seen:
            return model
        if len(self._seen) >= self._max or not _LABEL_OK.fullmatch(model):
            return OTHER
        self._seen.add(model)
        return model
