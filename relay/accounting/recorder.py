"""What a finished request is counted as: usage, cost, metrics, the request log.

:class:`Accounting` is built with each :class:`~relay.pipeline.Pipeline`
(prices, switches and metric sinks are per config generation) and is handed
the long-lived things it adds to: the :class:`~relay.accounting.book.UsageBook`
of totals, the request log, the tokenizer, the model labels.

Usage comes from the response (JSON ``usage``, or the stream's usage events
seen as they passed) and is estimated with the tokenizer when there is
none. A cached response keeps its usage beside it, so a hit can be counted
as saved cost without parsing the body again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
from typing import TYPE_CHECKING

from ..config import Config
from ..features.cache import USAGE_HEADER, CacheEntry
from ..http.request import Request
from ..http.sse import SSESplitter
from ..ops.metrics import Metrics, RequestMetricsOff
from ..upstream.exchange import ProxyExchange
from .book import UsageBook
from .cost import OTHER, ModelLabels, PriceTable, PriceTerms, price_terms, terms_cost
from .keyhash import KeyHashes
from .requestlog import RequestLogger
from .tokens import OFFLOAD_CHARS, TokenEstimator
from .usage import (
    StreamUsage,
    Usage,
    estimate_usage,
    provider_for_path,
    request_text_for_estimate,
    response_text_for_estimate,
    usage_from_json,
    usage_in_json,
)

if TYPE_CHECKING:
    from ..upstream.target import Upstream

__all__ = [
    "ESTIMATE", "Accounting", "EstimateNeeded", "stored_usage", "usage_value", "with_usage",
]


class EstimateNeeded(enum.Enum):
    """What :meth:`Accounting.read_usage` answers for a response without usage."""

    ESTIMATE = "estimate"


ESTIMATE = EstimateNeeded.ESTIMATE

# What a cache entry without (readable) usage keeps as its usage.
_NO_USAGE = object()
# Bound of the per-model memo of prices and labels.
_MODELS_MAX = 4096


class Accounting:
    """Counts finished requests for one config generation."""

    def __init__(
        self,
        config: Config,
        *,
        metrics: Metrics,
        prices: PriceTable,
        labels: ModelLabels,
        estimator: TokenEstimator,
        book: UsageBook,
        request_log: RequestLogger | None,
        key_hashes: KeyHashes,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.models = config.models
        self.enabled = config.usage.enabled
        self.metrics: Metrics | RequestMetricsOff = (
            metrics if config.metrics.enabled else RequestMetricsOff()
        )
        self._prices = prices
        self._labels = labels
        self.estimator = estimator
        self._book = book
        self.request_log = request_log
        self._key_hash = key_hashes.of
        self._key_hashes = key_hashes
        self._loop = loop
        # Per model name: its prices and metric label, looked up once.
        self._models: dict[str, tuple[PriceTerms | None, str | None]] = {}

    # ------------------------------------------------------------------ #
    # usage of a response
    # ------------------------------------------------------------------ #
    def read_usage(
        self, request: Request, exchange: ProxyExchange, body: bytes
    ) -> Usage | None | EstimateNeeded:
        """Usage read from the response in one pass over it, or
        :data:`ESTIMATE` when it carries none and the tokenizer must count it
        (then :meth:`estimate`, which may have to load the tokenizer first)."""
        if not self.enabled or not 200 <= exchange.status < 300 or request.method != b"POST":
            return None
        if exchange.splitter is None and exchange.json_body is not None:
            # A JSON response, the usual answer: its usage read once.
            response = exchange.body()
            if response.find(b'"usage"') < 0:  # find: see Pipeline._forward
                return ESTIMATE
            usage = usage_in_json(response)
            if usage is not None:
                return usage
            return self._estimate_json(request, response, body)
        stream = exchange.stream_usage
        if exchange.splitter is not None and stream is not None and not stream.has_usage:
            return ESTIMATE
        return self.usage_of(request, exchange, body)

    def usage_of(self, request: Request, exchange: ProxyExchange, body: bytes) -> Usage | None:
        """Usage from the response, else estimated from request and response text."""
        if not self.enabled or not 200 <= exchange.status < 300 or request.method != b"POST":
            return None
        stream = exchange.stream_usage
        estimator = self.estimator
        if exchange.splitter is not None and stream is not None:
            if not stream.model:
                # No usage event named the model (none came, or the client
                # left first): estimate and price it as the one requested.
                stream.model = request.model() or ""
            return stream.result(estimator, lambda: request_text_for_estimate(body, request.json()))
        if exchange.json_body is None and exchange.recorded is None:
            return None
        response = exchange.body()
        usage = usage_from_json(response)
        if usage is not None:
            return usage
        return self._estimate_json(request, response, body)

    def _estimate_json(self, request: Request, response: bytes, body: bytes) -> Usage | None:
        """The estimate of a non-streamed response without readable usage."""
        request_text = request_text_for_estimate(body, request.json())
        if not request_text:
            return None  # not a model call (e.g. a file upload): nothing to count
        return estimate_usage(
            request.model() or "", self.estimator, request_text, response_text_for_estimate(response)
        )

    async def estimate(self, request: Request, exchange: ProxyExchange, body: bytes) -> Usage | None:
        """:meth:`usage_of` of a response :meth:`read_usage` said has no
        usage: a large estimate runs off the event loop."""
        estimator = self.estimator
        if exchange.splitter is not None:
            # A stream's kept text is not measured without walking it, and
            # a stream without usage is rare: always off the loop.
            size = OFFLOAD_CHARS + 1
        else:
            size = len(body) + len(exchange.body())
        return await estimator.run(size, self.usage_of, request, exchange, body)

    async def shared_usage(
        self,
        request: Request,
        status: int,
        headers: tuple[tuple[bytes, bytes], ...],
        chunks: list[bytes],
    ) -> Usage | None:
        """Usage of a coalesced response, read from the bytes relayed.

        A stream whose usage chunk relay removed (it asked for it itself)
        has none left here: that one is estimated.
        """
        if not self.enabled or not 200 <= status < 300 or request.method != b"POST" or not chunks:
            return None
        body = b"".join(chunks)
        content_type = b""
        for name, value in headers:
            if name.lower() == b"content-type":
                content_type = value.lower()
        estimator = self.estimator
        if content_type.startswith(b"text/event-stream"):
            stream = StreamUsage(request.model() or "", provider_for_path(request.path))
            splitter = SSESplitter()
            for event in splitter.feed(body):
                stream.on_event(event)
            rest = splitter.flush()
            if rest:
                stream.on_event(rest)
            if stream.has_usage:
                return stream.result(estimator)
            await estimator.ensure_loaded(self.models)
            return await estimator.run(
                len(body) + len(request.body),
                stream.result,
                estimator,
                lambda: request_text_for_estimate(request.body, request.json()),
            )
        usage = usage_from_json(body)
        if usage is not None:
            return usage
        await estimator.ensure_loaded(self.models)
        return await estimator.run(
            len(body) + len(request.body), self._estimate_shared, request, body
        )

    def _estimate_shared(self, request: Request, body: bytes) -> Usage | None:
        request_text = request_text_for_estimate(request.body, request.json())
        if not request_text:
            return None
        return estimate_usage(
            request.model() or "",
            self.estimator,
            request_text,
            response_text_for_estimate(body),
        )

    # ------------------------------------------------------------------ #
    # counting
    # ------------------------------------------------------------------ #
    def done(
        self,
        request: Request,
        upstream: Upstream,
        status: int,
        cache: str = "BYPASS",
        usage: Usage | None = None,
        *,
        saved: bool = False,
    ) -> None:
        """Count a finished request: metrics, usage and cost, request log."""
        elapsed = self._loop.time() - request.started
        upstream.meters.request(request.method, status, elapsed)
        cost = 0.0
        model = None
        ticket = request.relay_key
        if usage is not None:
            model = usage.model
            if not model:
                # A response that names no model is priced as the requested one.
                model = request.model() or ""
                if model:
                    usage = dataclasses.replace(usage, model=model)
            if model:
                known = self._models.get(model)
                if known is None:
                    known = self._model(model)
                terms, label = known
                if terms is not None:
                    cost = terms_cost(
                        terms,
                        usage.prompt_tokens,
                        usage.completion_tokens,
                        usage.cached_tokens,
                        usage.cache_write_tokens,
                    )
                if label is None:
                    label = self._labels.label(model)
            else:
                label = OTHER
            if ticket is not None:
                key_hash = ticket.record.name  # a virtual key is shown by its name
            else:
                credential = request.credential
                key_hash = self._key_hash(credential) if credential else ""
            # A hit counts as a hit and saved cost, not as tokens paid again.
            if saved:
                self.metrics.record_saved(label, cost)
                self._book.record(label, key_hash, usage, 0.0, cost, True)
            else:
                self.metrics.record_tokens(label, usage.prompt_tokens, usage.completion_tokens, cost)
                self._book.record(label, key_hash, usage, cost, 0.0, False)
        if ticket is not None:
            # The reservation is replaced by the exact usage; a hit costs nothing.
            ticket.settle(None if saved else usage, 0.0 if saved else cost)
        request_log = self.request_log
        if request_log is not None:
            request_log.finished(
                request, upstream.label, status, elapsed, cache, model, usage,
                0.0 if saved else cost, self._key_hashes,
            )

    def _model(self, model: str) -> tuple[PriceTerms | None, str | None]:
        """Prices and metric label of *model*, kept for its next request.

        A label is kept only once it is the model's own: ``other`` may turn
        into it when a reload reserves the name, so that one is asked again.
        """
        label = self._labels.label(model)
        price = self._prices.lookup(model)
        known = (
            price_terms(price) if price is not None else None,
            label if label == model else None,
        )
        models = self._models
        if len(models) >= _MODELS_MAX:
            models.clear()  # model names come from responses and clients
        models[model] = known
        return known


def with_usage(
    headers: tuple[tuple[bytes, bytes], ...], usage: Usage | None
) -> tuple[tuple[bytes, bytes], ...]:
    """Keep the usage of a cached response beside it, so a hit counts as saved cost."""
    if usage is None:
        return headers
    return (*headers, (USAGE_HEADER, usage_value(usage)))


def usage_value(usage: Usage) -> bytes:
    """The internal usage header's value that keeps *usage* with a cache entry."""
    return b"%d,%d,%d,%d,%s" % (
        usage.prompt_tokens,
        usage.completion_tokens,
        usage.cached_tokens,
        usage.cache_write_tokens,
        usage.model.encode("utf-8", "replace").replace(b",", b"_")[:128],
    )


def stored_usage(entry: CacheEntry) -> Usage | None:
    """The usage :func:`with_usage` kept with a cache entry (read once per entry)."""
    usage = entry.usage
    if usage is not None:
        return usage if usage is not _NO_USAGE else None  # type: ignore[no-any-return]
    value = entry.usage_value
    usage = _NO_USAGE
    if value is not None:
        try:
            prompt, completion, cached, written, model = value.split(b",", 4)
            usage = Usage(
                model.decode("utf-8", "replace"),
                int(prompt),
                int(completion),
                int(cached),
                cache_write_tokens=int(written),
            )
        except ValueError:
            pass
    entry.keep_usage(usage)
    return usage if usage is not _NO_USAGE else None
