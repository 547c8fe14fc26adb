"""Prometheus metrics of the contract, owned by one :class:`Metrics` object.

Several workers: prometheus-client keeps each process's values in mmap
files under ``PROMETHEUS_MULTIPROC_DIR`` and ``/metrics`` sums them. The
client picks file-backed values when ``prometheus_client.values`` is first
imported, so the launcher calls :func:`prepare_multiprocess_dir` before any
worker exists; it also re-selects the value class in case prometheus_client
was imported earlier, and this module imports prometheus_client only inside
functions so that importing relay.metrics decides nothing.

Label values are bounded by construction: ``route`` is the matched route's
target host or ``default``; ``upstream`` a configured upstream host[:port];
``model`` comes from :class:`relay.cost.ModelLabels`; ``key_type`` is
``api_key``, ``ip`` or ``global``; ``key`` a virtual key's name (set by
its admin, ``unknown`` for a secret that matched no key); ``method``/``status``
are what the HTTP parser accepts. Never a key, a prompt or a client-chosen string.

``relay_circuit_breaker_state`` uses ``multiprocess_mode="livemax"``: each
worker has its own breaker, and the worst state among the live workers is
the useful single number per upstream (any worker open -> 2). ``max`` would
keep reporting a dead worker's last state forever (its file stays), and
``liveall`` would add a ``pid`` label the contract does not have.
"""

from __future__ import annotations

import glob
import os
from typing import Any

__all__ = [
    "DURATION_BUCKETS",
    "MULTIPROC_ENV",
    "Metrics",
    "TOKEN_BUCKETS",
    "mark_worker_dead",
    "multiprocess_dir",
    "prepare_multiprocess_dir",
]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# From half a millisecond (a cache hit served by relay itself) to a minute
# (a long streamed completion); roughly 2-2.5x steps.
DURATION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
# Tokens per request: from a one-line prompt to a full long context.
TOKEN_BUCKETS = (
    16, 64, 256, 1024, 4096, 16384, 65536, 131072, 262144, 1048576,
)  # fmt: skip

# Labelled children are cached per label tuple; the bound only guards
# against a bug feeding unbounded values (the metric itself keeps them).
_CHILD_CACHE_MAX = 4096


def multiprocess_dir() -> str | None:
    """The multiprocess directory in effect, or None (single process)."""
    return os.environ.get(MULTIPROC_ENV) or None


def _select_value_class() -> None:
    """Make prometheus_client use file-backed values if the env says so.

    The client chooses at import time; if it was imported before the
    directory was set, choose again (metrics read ``values.ValueClass``
    when they are created).
    """
    from prometheus_client import values

    want_files = multiprocess_dir() is not None
    has_files = getattr(values.ValueClass, "_multiprocess", False)
    if want_files != has_files:
        values.ValueClass = values.get_value_class()


def prepare_multiprocess_dir(path: str) -> None:
    """Set up ``path`` for multi-worker metrics; call before any metric exists.

    Creates the directory, removes the ``*.db`` files a previous run left
    (stale counters would otherwise be added to this run's) and the workers'
    ``usage-*.json`` totals, and sets ``PROMETHEUS_MULTIPROC_DIR`` for this
    process and the workers it starts. Only those files are removed: the
    directory may be shared with other things by the operator.
    """
    os.makedirs(path, exist_ok=True)
    stale = glob.glob(os.path.join(path, "*.db")) + glob.glob(os.path.join(path, "usage-*.json"))
    for name in stale:
        try:
            os.remove(name)
        except FileNotFoundError:
            pass
    os.environ[MULTIPROC_ENV] = path
    _select_value_class()


def mark_worker_dead(pid: int) -> None:
    """Drop a dead worker's live gauges (its counters stay: they happened)."""
    path = multiprocess_dir()
    if path is None:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, path)


class _Children:
    """``metric.labels(*values)`` memoized by the label tuple."""

    __slots__ = ("_metric", "_cache")

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._cache: dict[tuple[Any, ...], Any] = {}

    def get(self, key: tuple[Any, ...]) -> Any:
        child = self._cache.get(key)
        if child is None:
            if len(self._cache) >= _CHILD_CACHE_MAX:
                self._cache.clear()
            child = self._metric.labels(*[str(v) for v in key])
            self._cache[key] = child
        return child


class Metrics:
    """Every metric of the contract, on a registry of its own.

    Create one per process (after :func:`prepare_multiprocess_dir` when
    running several workers). The ``record_*``/``observe_*`` helpers are
    cheap: label children are looked up once per distinct label tuple and
    label-free counters are exposed directly (e.g. ``cache_hits.inc()``).
    """

    def __init__(self) -> None:
        _select_value_class()
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "relay_requests_total",
            "Requests answered, by route target, method and status.",
            ("route", "method", "status"),
            registry=r,
        )
        self.request_duration = Histogram(
            "relay_request_duration_seconds",
            "Time from the request head to the last response byte, as the client sees it.",
            ("route",),
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.upstream_latency = Histogram(
            "relay_upstream_latency_seconds",
            "Time from sending a request upstream to its first response byte.",
            ("upstream",),
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.upstream_attempts = Counter(
            "relay_upstream_attempts_total",
            "Requests sent to an upstream target (retries and fallbacks each count), "
            "by target and outcome (ok|429|5xx|connect|timeout|reset).",
            ("upstream", "outcome"),
            registry=r,
        )
        self.cache_hits = Counter(
            "relay_cache_hits_total", "Responses served from the cache.", registry=r
        )
        self.cache_misses = Counter(
            "relay_cache_misses_total",
            "Cacheable requests not found in the cache (sent upstream).",
            registry=r,
        )
        self.request_tokens = Histogram(
            "relay_request_tokens",
            "Tokens per request, by model and kind (prompt|completion).",
            ("model", "kind"),
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "relay_tokens_total",
            "Tokens used, by model and kind (prompt|completion).",
            ("model", "kind"),
            registry=r,
        )
        self.cost = Counter(
            "relay_cost_usd_total", "Upstream cost in USD, by model.", ("model",), registry=r
        )
        self.cost_saved = Counter(
            "relay_cost_saved_usd_total",
            "Cost in USD avoided by cache hits, by model.",
            ("model",),
            registry=r,
        )
        self.ratelimit_rejected = Counter(
            "relay_ratelimit_rejected_total",
            "Requests rejected by the rate limiter, by key type.",
            ("key_type",),
            registry=r,
        )
        self.breaker_state = Gauge(
            "relay_circuit_breaker_state",
            "Circuit breaker state per upstream: 0 closed, 1 half-open, 2 open "
            "(worst of the live workers).",
            ("upstream",),
            multiprocess_mode="livemax",
            registry=r,
        )
        self.redis_errors = Counter(
            "relay_redis_errors_total",
            "Failed or timed-out Redis calls (relay fell back to memory).",
            registry=r,
        )
        self.config_reload_errors = Counter(
            "relay_config_reload_errors_total",
            "Config file edits refused as invalid (the last good config stays).",
            registry=r,
        )
        self.key_spend_usd = Counter(
            "relay_key_spend_usd_total",
            "Upstream cost in USD charged to each virtual key, by key name.",
            ("key",),
            registry=r,
        )
        self.key_rejected = Counter(
            "relay_key_rejected_total",
            "Requests refused by virtual-key admission, by key name and reason "
            "(invalid|model|budget|rpm|tpm; key=unknown for invalid).",
            ("key", "reason"),
            registry=r,
        )
        self._key_spend = _Children(self.key_spend_usd)
        self._key_rejected = _Children(self.key_rejected)
        self._requests = _Children(self.requests)
        self._duration = _Children(self.request_duration)
        self._upstream = _Children(self.upstream_latency)
        self._attempts = _Children(self.upstream_attempts)
        self._req_tokens = _Children(self.request_tokens)
        self._tokens = _Children(self.tokens)
        self._cost = _Children(self.cost)
        self._saved = _Children(self.cost_saved)
        self._rejected = _Children(self.ratelimit_rejected)
        self._breaker = _Children(self.breaker_state)
        self._render_registry: Any = None

    # -- hot-path helpers -------------------------------------------------
    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """One answered request: count it and observe its duration."""
        self._requests.get((route, method, status)).inc()
        self._duration.get((route,)).observe(seconds)

    def observe_upstream_latency(self, upstream: str, seconds: float) -> None:
        self._upstream.get((upstream,)).observe(seconds)

    def upstream_attempt(self, upstream: str, outcome: str) -> None:
        self._attempts.get((upstream, outcome)).inc()

    def attempts_child(self, upstream: str, outcome: str) -> Any:
        """The counter child itself, for a caller that keeps it (per target)."""
        return self._attempts.get((upstream, outcome))

    def record_tokens(
        self, model: str, prompt_tokens: int, completion_tokens: int, cost_usd: float
    ) -> None:
        """Tokens and cost of one upstream response (``model`` already a label)."""
        self._req_tokens.get((model, "prompt")).observe(prompt_tokens)
        self._req_tokens.get((model, "completion")).observe(completion_tokens)
        if prompt_tokens:
            self._tokens.get((model, "prompt")).inc(prompt_tokens)
        if completion_tokens:
            self._tokens.get((model, "completion")).inc(completion_tokens)
        if cost_usd:
            self._cost.get((model,)).inc(cost_usd)

    def record_saved(self, model: str, saved_usd: float) -> None:
        """Cost a cache hit avoided."""
        if saved_usd:
            self._saved.get((model,)).inc(saved_usd)

    def ratelimit_reject(self, key_type: str) -> None:
        self._rejected.get((key_type,)).inc()

    def set_breaker_state(self, upstream: str, state: int) -> None:
        self._breaker.get((upstream,)).set(state)

    def key_spend(self, key: str, cost_usd: float) -> None:
        """Cost charged to a virtual key (``key`` is its name, never its secret)."""
        self._key_spend.get((key,)).inc(cost_usd)

    def key_reject(self, key: str, reason: str) -> None:
        self._key_rejected.get((key, reason)).inc()

    # -- exposition -------------------------------------------------------
    def render(self) -> tuple[bytes, str]:
        """``(body, content type)`` for ``GET /metrics``; all workers summed.

        With ``PROMETHEUS_MULTIPROC_DIR`` set, reads every worker's files
        (so any worker can answer); else this process's registry.
        """
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        path = multiprocess_dir()
        if path is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        registry = self._render_registry
        if registry is None:
            from prometheus_client import CollectorRegistry
            from prometheus_client.multiprocess import MultiProcessCollector

            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=path)
            self._render_registry = registry
        return generate_latest(registry), CONTENT_TYPE_LATEST


class _NoCount:
    __slots__ = ()

    def inc(self, amount: float = 1) -> None:
        pass


NO_COUNT = _NoCount()


class RequestMetricsOff:
    """Stands in for :class:`Metrics` on the request path when
    ``metrics.enabled`` is false: the same recording calls, doing nothing.
    Process-level counters (Redis and reload errors) stay on the real one."""

    __slots__ = ()

    cache_hits = _NoCount()
    cache_misses = _NoCount()

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        pass

    def observe_upstream_latency(self, upstream: str, seconds: float) -> None:
        pass

    def upstream_attempt(self, upstream: str, outcome: str) -> None:
        pass

    def record_tokens(
        self, model: str, prompt_tokens: int, completion_tokens: int, cost_usd: float
    ) -> None:
        pass

    def record_saved(self, model: str, saved_usd: float) -> None:
        pass

    def ratelimit_reject(self, key_type: str) -> None:
        pass

    def key_spend(self, key: str, cost_usd: float) -> None:
        pass

    def key_reject(self, key: str, reason: str) -> None:
        pass
