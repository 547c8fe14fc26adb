"""Prometheus metrics of the contract, kept by relay itself.

Every value (a counter, a gauge, one histogram bucket or sum) is one slot
of a preallocated array of doubles owned by the process. An update is an
index into that array: no lock (one event loop writes it), no dict lookup
(label children are resolved once and kept by whoever owns the label, e.g.
an upstream target), and a histogram finds its bucket by bisection. The
children are ``relay._fast``'s (compiled: a C store through a typed
memoryview; pure twin beside it).
``/metrics`` reads the arrays at scrape time through a custom collector
and renders them with prometheus-client's text format.

Several workers: the array is an mmap of a file in the metrics directory
(``PROMETHEUS_MULTIPROC_DIR``, set by the launcher), beside a catalogue
file naming each slot (family, labels), appended once per new child. Any
worker's scrape reads every process's files, so totals are exact right
after a request. Counters and histograms of exited workers keep counting
(they happened); :func:`mark_worker_dead` marks a worker's files so its
gauges are dropped. ``relay_circuit_breaker_state`` is the worst state
among the live workers (any worker open -> 2), as each worker has its own
breaker. One process without the directory keeps the array in memory.

Label values are bounded by construction: ``route`` is the matched route's
target host or ``default``; ``upstream`` a configured upstream host[:port];
``model`` comes from :class:`relay.accounting.cost.ModelLabels`; ``key_type`` is
``api_key``, ``ip`` or ``global``; ``key`` a virtual key's name (set by
its admin, ``unknown`` for a secret that matched no key); ``method``/``status``
are what the HTTP parser accepts. Never a key, a prompt or a client-chosen string.
"""

from __future__ import annotations

import functools
import glob
import json
import mmap
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .. import _fast

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = [
    "DURATION_BUCKETS",
    "MULTIPROC_ENV",
    "Metrics",
    "TOKEN_BUCKETS",
    "mark_worker_dead",
    "multiprocess_dir",
    "prepare_multiprocess_dir",
    "render_files",
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

# Slots per process. Label values are bounded, so this is far more than a
# deployment uses (a histogram child takes its buckets + 2); the file is
# sparse, so only the pages written take memory or disk.
_SLOTS = 1 << 17
_FILE_PREFIX = "relay-metrics-"
_VALUES = ".values"
_CATALOGUE = ".labels"
_DEAD = ".dead"


def multiprocess_dir() -> str | None:
    """The multiprocess directory in effect, or None (single process)."""
    return os.environ.get(MULTIPROC_ENV) or None


def prepare_multiprocess_dir(path: str) -> None:
    """Set up ``path`` for multi-worker metrics; call before any worker exists.

    Creates the directory, removes the metric files a previous run left
    (stale counters would otherwise be added to this run's; ``*.db`` are
    older releases' files) and the workers' ``usage-*.json`` totals, and
    sets ``PROMETHEUS_MULTIPROC_DIR`` for this process and the workers it
    starts. Only those files are removed: the directory may be shared with
    other things by the operator.
    """
    os.makedirs(path, exist_ok=True)
    stale = (
        glob.glob(os.path.join(path, _FILE_PREFIX + "*"))
        + glob.glob(os.path.join(path, "*.db"))
        + glob.glob(os.path.join(path, "usage-*.json"))
    )
    for name in stale:
        try:
            os.remove(name)
        except FileNotFoundError:
            pass
    os.environ[MULTIPROC_ENV] = path


def mark_worker_dead(pid: int) -> None:
    """Drop a dead worker's gauges (its counters stay: they happened)."""
    path = multiprocess_dir()
    if path is None:
        return
    for values in glob.glob(os.path.join(path, f"{_FILE_PREFIX}{pid}-*{_VALUES}")):
        with open(values[: -len(_VALUES)] + _DEAD, "wb"):
            pass


# --------------------------------------------------------------------------- #
# one process's values
# --------------------------------------------------------------------------- #
class _Store:
    """This process's slots: an array of doubles and who each slot is.

    ``values`` is a ``memoryview`` cast to ``'d'``; children keep it and
    their slot index. With a directory the array is an mmap of this
    process's values file and each new child appends one catalogue line
    (``[family, [labels...], first slot]``) before its first update.
    """

    def __init__(self, directory: str | None) -> None:
        self.directory = directory
        self.entries: list[tuple[str, tuple[str, ...], int]] = []
        self._next = 0
        self._lock = threading.Lock()  # new children only (scrape threads may add none)
        self._catalogue_fd = -1
        self._mmap: mmap.mmap | None = None
        self.collector: _Collector | None = None  # set by the Metrics owning it
        # Where children past the slot bound write (never exposed).
        self.spare = memoryview(bytearray(64 * 8)).cast("d")
        if directory is None:
            # Anonymous and zero-filled by the OS: untouched pages cost no memory.
            self._mmap = mmap.mmap(-1, _SLOTS * 8)
            self.values = memoryview(self._mmap).cast("d")
            return
        # os.urandom, not secrets: a worker would keep its modules for life.
        base = os.path.join(directory, f"{_FILE_PREFIX}{os.getpid()}-{os.urandom(4).hex()}")
        self.path = base + _VALUES
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, _SLOTS * 8)
            self._mmap = mmap.mmap(fd, _SLOTS * 8)
        finally:
            os.close(fd)
        self.values = memoryview(self._mmap).cast("d")
        self._catalogue_fd = os.open(
            base + _CATALOGUE, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o644
        )

    def allocate(self, family: str, labels: tuple[str, ...], width: int) -> int:
        """First slot of ``width`` new zeroed slots for one child, or -1 if full."""
        with self._lock:
            first = self._next
            if first + width > _SLOTS:
                return -1
            self._next = first + width
            self.entries.append((family, labels, first))
            if self._catalogue_fd >= 0:
                line = json.dumps([family, list(labels), first], separators=(",", ":"))
                os.write(self._catalogue_fd, line.encode() + b"\n")
            return first

    def close(self) -> None:
        if self._catalogue_fd >= 0:
            os.close(self._catalogue_fd)
            self._catalogue_fd = -1


# --------------------------------------------------------------------------- #
# families and children
# --------------------------------------------------------------------------- #
class _Family:
    """A metric family of the contract; ``labels(...)`` gives a cached child."""

    kind = ""

    def __init__(
        self, store: _Store, name: str, documentation: str, labelnames: Sequence[str] = ()
    ) -> None:
        self._store = store
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], Any] = {}
        self._default: Any = None
        if not self.labelnames:
            self._default = self.labels()
            # A label-free family is its own child: its update methods are
            # the child's bound methods (one call, not two).
            for method in ("inc", "set", "dec", "observe"):
                bound = getattr(self._default, method, None)
                if bound is not None:
                    setattr(self, method, bound)

    def width(self) -> int:
        return 1

    def _make(self, values: memoryview[float], slot: int) -> Any:
        raise NotImplementedError

    def labels(self, *values: str) -> Any:
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            if len(key) != len(self.labelnames):
                raise ValueError(f"{self.name}: labels {self.labelnames}, got {key}")
            slot = self._store.allocate(self.name, key, self.width())
            if slot < 0:  # over the bound (a bug upstream): counted nowhere
                child = self._make(self._store.spare, 0)
            else:
                child = self._make(self._store.values, slot)
            self._children[key] = child
        return child

    # label-free families are their own child (replaced per instance above)
    def inc(self, amount: float = 1.0) -> None:
        self._default.inc(amount)

    def collect(self) -> list[Any]:
        """This family as prometheus-client metric families (as ``Counter.collect()``),
        summed over every worker."""
        return [f for f in self._metrics_collector().collect() if f.name == self._exposed_name()]

    def _exposed_name(self) -> str:
        # prometheus-client names a counter family without its _total suffix
        if self.kind == "counter" and self.name.endswith("_total"):
            return self.name[: -len("_total")]
        return self.name

    def _metrics_collector(self) -> _Collector:
        collector = self._store.collector
        if collector is None:
            raise RuntimeError(f"{self.name}: not part of a Metrics object")
        return collector


class Counter(_Family):
    kind = "counter"

    def _make(self, values: memoryview[float], slot: int) -> _fast.CounterChild:
        return _fast.CounterChild(values, slot)


class Gauge(_Family):
    kind = "gauge"

    def _make(self, values: memoryview[float], slot: int) -> _fast.GaugeChild:
        return _fast.GaugeChild(values, slot)

    def set(self, value: float) -> None:
        self._default.set(value)


class Histogram(_Family):
    kind = "histogram"

    def __init__(
        self,
        store: _Store,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Iterable[float],
    ) -> None:
        self.bounds = tuple(float(b) for b in buckets)
        super().__init__(store, name, documentation, labelnames)

    def width(self) -> int:
        return len(self.bounds) + 2  # buckets, +Inf, sum

    def _make(self, values: memoryview[float], slot: int) -> _fast.HistogramChild:
        return _fast.HistogramChild(values, slot, self.bounds)

    def observe(self, amount: float) -> None:
        self._default.observe(amount)


# --------------------------------------------------------------------------- #
# exposition
# --------------------------------------------------------------------------- #
class _ProcessFile:
    """Another (or this) process's values file and catalogue, read-only."""

    def __init__(self, values_path: str) -> None:
        self.values_path = values_path
        self.catalogue_path = values_path[: -len(_VALUES)] + _CATALOGUE
        self.dead_path = values_path[: -len(_VALUES)] + _DEAD
        with open(values_path, "rb") as f:
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.values = memoryview(self._mmap).cast("d")
        self.entries: list[tuple[str, tuple[str, ...], int]] = []
        self._offset = 0

    def refresh(self) -> None:
        """Read catalogue lines appended since the last scrape (whole lines only)."""
        try:
            with open(self.catalogue_path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1
        for line in data[:end].splitlines():
            family, labels, slot = json.loads(line)
            self.entries.append((family, tuple(labels), int(slot)))
        self._offset += end

    def alive(self) -> bool:
        return not os.path.exists(self.dead_path)


class _Collector:
    """prometheus-client collector: the families summed over every process."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._files: dict[str, _ProcessFile] = {}
        self._lock = threading.Lock()  # scrapes run in executor threads

    def sources(self, only: Sequence[str] | None = None) -> list[tuple[Any, list[Any], bool]]:
        """``(values, entries, alive)`` per process whose slots are summed."""
        store = self._metrics.store
        directory = store.directory
        if directory is None and only is None:
            return [(store.values, list(store.entries), True)]
        paths = (
            list(only)
            if only is not None
            else sorted(glob.glob(os.path.join(directory or "", f"{_FILE_PREFIX}*{_VALUES}")))
        )
        out = []
        for path in paths:
            source = self._files.get(path)
            if source is None:
                try:
                    source = self._files[path] = _ProcessFile(path)
                except (FileNotFoundError, ValueError):
                    continue  # removed meanwhile, or still empty
            source.refresh()
            out.append((source.values, list(source.entries), source.alive()))
        return out

    def collect(self, only: Sequence[str] | None = None) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )
        from prometheus_client.utils import floatToGoString

        with self._lock:
            sources = self.sources(only)
        families = self._metrics.families
        # family name -> label tuple -> summed values (one list per child)
        sums: dict[str, dict[tuple[str, ...], list[float]]] = {f.name: {} for f in families}
        widths = {f.name: f.width() for f in families}
        gauges = {f.name for f in families if f.kind == "gauge"}
        for values, entries, alive in sources:
            for name, labels, slot in entries:
                width = widths.get(name)
                if width is None:
                    continue  # a family this version does not define
                got = [float(v) for v in values[slot : slot + width]]
                per_child = sums[name]
                if name in gauges:
                    if not alive:
                        continue
                    if labels in per_child:
                        per_child[labels][0] = max(per_child[labels][0], got[0])
                    else:
                        per_child[labels] = got
                elif labels in per_child:
                    total = per_child[labels]
                    for i, v in enumerate(got):
                        total[i] += v
                else:
                    per_child[labels] = got
        for family in families:
            labelnames = list(family.labelnames)
            children = sums[family.name]
            if isinstance(family, Histogram):
                hist = HistogramMetricFamily(family.name, family.documentation, labels=labelnames)
                les = [floatToGoString(b) for b in family.bounds] + ["+Inf"]
                for labels, got in sorted(children.items()):
                    cumulative, running = [], 0.0
                    for le, count in zip(les, got[:-1], strict=True):
                        running += count
                        cumulative.append((le, running))
                    hist.add_metric(list(labels), cumulative, got[-1])
                yield hist
            elif family.kind == "gauge":
                gauge = GaugeMetricFamily(family.name, family.documentation, labels=labelnames)
                for labels, got in sorted(children.items()):
                    gauge.add_metric(list(labels), got[0])
                yield gauge
            else:
                counter = CounterMetricFamily(family.name, family.documentation, labels=labelnames)
                for labels, got in sorted(children.items()):
                    counter.add_metric(list(labels), got[0])
                yield counter


class _FilesCollector:
    def __init__(self, collector: _Collector, paths: Sequence[str]) -> None:
        self._collector = collector
        self._paths = paths

    def collect(self) -> Iterator[Any]:
        return self._collector.collect(self._paths)


def render_files(paths: Sequence[str]) -> bytes:
    """The exposition of some processes' values files only (e.g. one worker's)."""
    from prometheus_client import CollectorRegistry, generate_latest

    reader = Metrics(directory=None)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_FilesCollector(reader._collector, paths))  # type: ignore[arg-type]
    return generate_latest(registry)


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


_UNSET: Any = object()

_METHOD_LABELS = {
    m: m.decode() for m in (b"GET", b"POST", b"PUT", b"PATCH", b"DELETE", b"HEAD", b"OPTIONS")
}


class _ModelMeters:
    """The children of one model label: one lookup per response, not five."""

    __slots__ = (
        "prompt_tokens", "completion_tokens", "prompt_total", "completion_total", "cost", "saved"
    )  # fmt: skip

    def __init__(self, metrics: Metrics, model: str) -> None:
        self.prompt_tokens = metrics.request_tokens.labels(model, "prompt")
        self.completion_tokens = metrics.request_tokens.labels(model, "completion")
        self.prompt_total = metrics.tokens.labels(model, "prompt")
        self.completion_total = metrics.tokens.labels(model, "completion")
        self.cost = metrics.cost.labels(model)
        self.saved = metrics.cost_saved.labels(model)


class TargetMeters:
    """The metric children of one upstream target, kept by the target.

    Resolved once when a pipeline is built, so a request's updates are
    attribute reads and array adds: its latency, its "ok" attempts, its
    route's duration; request counts by (method, status) and failed
    attempts by outcome are resolved on first use and kept here.
    """

    __slots__ = (
        "ok_attempts",
        "latency",
        "duration",
        "_metrics",
        "_label",
        "_route",
        "_requests",
        "_failed",
    )

    def __init__(self, metrics: Metrics, label: str, route_label: str) -> None:
        self._metrics = metrics
        self._label = label
        self._route = route_label
        self.ok_attempts = metrics.upstream_attempts.labels(label, "ok")
        self.latency = metrics.upstream_latency.labels(label)
        self.duration = metrics.request_duration.labels(route_label)
        self._requests: dict[tuple[bytes, int], Any] = {}
        self._failed: dict[str, Any] = {}

    def request(self, method: bytes, status: int, seconds: float) -> None:
        """One answered request routed to this target: count it, observe its duration."""
        child = self._requests.get((method, status))
        if child is None:
            if len(self._requests) >= _CHILD_CACHE_MAX:
                self._requests.clear()
            child = self._metrics.requests.labels(
                self._route, _METHOD_LABELS.get(method, "OTHER"), str(status)
            )
            self._requests[(method, status)] = child
        child.inc()
        self.duration.observe(seconds)

    def attempt(self, outcome: str) -> None:
        """A failed attempt (429|5xx|connect|timeout|reset) on this target."""
        child = self._failed.get(outcome)
        if child is None:
            child = self._failed[outcome] = self._metrics.upstream_attempts.labels(
                self._label, outcome
            )
        child.inc()


class Metrics:
    """Every metric of the contract, with values of this process's own.

    Create one per process, in the process that updates it (a worker
    creates its own after the fork; with several workers, after
    :func:`prepare_multiprocess_dir`). The ``record_*``/``observe_*``
    helpers look label children up once per distinct label tuple; callers
    on the hot path keep the child itself (e.g. ``attempts_child``) and
    label-free counters are exposed directly (``cache_hits.inc()``).
    ``registry`` is a prometheus-client registry whose collector reads the
    values at scrape time (every worker's, with a directory).
    """

    def __init__(self, directory: str | None = _UNSET) -> None:
        self.store = _Store(multiprocess_dir() if directory is _UNSET else directory)
        s = self.store
        self.requests = Counter(
            s,
            "relay_requests_total",
            "Requests answered, by route target, method and status.",
            ("route", "method", "status"),
        )
        self.request_duration = Histogram(
            s,
            "relay_request_duration_seconds",
            "Time from the request head to the last response byte, as the client sees it.",
            ("route",),
            DURATION_BUCKETS,
        )
        self.upstream_latency = Histogram(
            s,
            "relay_upstream_latency_seconds",
            "Time from sending a request upstream to its first response byte.",
            ("upstream",),
            DURATION_BUCKETS,
        )
        self.upstream_attempts = Counter(
            s,
            "relay_upstream_attempts_total",
            "Requests sent to an upstream target (retries and fallbacks each count), "
            "by target and outcome (ok|429|5xx|connect|timeout|reset).",
            ("upstream", "outcome"),
        )
        self.cache_hits = Counter(s, "relay_cache_hits_total", "Responses served from the cache.")
        self.cache_misses = Counter(
            s,
            "relay_cache_misses_total",
            "Cacheable requests not found in the cache (sent upstream).",
        )
        self.request_tokens = Histogram(
            s,
            "relay_request_tokens",
            "Tokens per request, by model and kind (prompt|completion).",
            ("model", "kind"),
            TOKEN_BUCKETS,
        )
        self.tokens = Counter(
            s,
            "relay_tokens_total",
            "Tokens used, by model and kind (prompt|completion).",
            ("model", "kind"),
        )
        self.cost = Counter(
            s, "relay_cost_usd_total", "Upstream cost in USD, by model.", ("model",)
        )
        self.cost_saved = Counter(
            s,
            "relay_cost_saved_usd_total",
            "Cost in USD avoided by cache hits, by model.",
            ("model",),
        )
        self.ratelimit_rejected = Counter(
            s,
            "relay_ratelimit_rejected_total",
            "Requests rejected by the rate limiter, by key type.",
            ("key_type",),
        )
        self.breaker_state = Gauge(
            s,
            "relay_circuit_breaker_state",
            "Circuit breaker state per upstream: 0 closed, 1 half-open, 2 open "
            "(worst of the live workers).",
            ("upstream",),
        )
        self.redis_errors = Counter(
            s,
            "relay_redis_errors_total",
            "Failed or timed-out Redis calls (relay fell back to memory).",
        )
        self.config_reload_errors = Counter(
            s,
            "relay_config_reload_errors_total",
            "Config file edits refused as invalid (the last good config stays).",
        )
        self.key_spend_usd = Counter(
            s,
            "relay_key_spend_usd_total",
            "Upstream cost in USD charged to each virtual key, by key name.",
            ("key",),
        )
        self.key_rejected = Counter(
            s,
            "relay_key_rejected_total",
            "Requests refused by virtual-key admission, by key name and reason "
            "(invalid|model|budget|rpm|tpm; key=unknown for invalid).",
            ("key", "reason"),
        )
        # Exposition order: as defined above.
        self.families: list[_Family] = [v for v in vars(self).values() if isinstance(v, _Family)]
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
        self._models: dict[str, _ModelMeters] = {}
        self._key_spend: dict[str, Any] = {}  # by key name: one lookup per settled request
        self._key_rejected = _Children(self.key_rejected)
        self._collector = s.collector = _Collector(self)

    @functools.cached_property
    def registry(self) -> CollectorRegistry:
        """The prometheus-client registry, made at the first scrape: the
        library (with its HTTP server and WSGI modules, ~4 MB) is loaded
        only by a process that is asked for its metrics."""
        from prometheus_client import CollectorRegistry

        registry = CollectorRegistry(auto_describe=False)
        registry.register(self._collector)  # type: ignore[arg-type]
        return registry

    # -- hot-path helpers -------------------------------------------------
    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """One answered request: count it and observe its duration."""
        self._requests.get((route, method, status)).inc()
        self._duration.get((route,)).observe(seconds)

    def observe_upstream_latency(self, upstream: str, seconds: float) -> None:
        self._upstream.get((upstream,)).observe(seconds)

    def upstream_attempt(self, upstream: str, outcome: str) -> None:
        self._attempts.get((upstream, outcome)).inc()

    def target_meters(self, upstream: str, route: str | None = None) -> TargetMeters:
        """The children one upstream target keeps (``route`` defaults to its label)."""
        return TargetMeters(self, upstream, upstream if route is None else route)

    def attempts_child(self, upstream: str, outcome: str) -> Any:
        """The counter child itself, for a caller that keeps it (per target)."""
        return self._attempts.get((upstream, outcome))

    def record_tokens(
        self, model: str, prompt_tokens: int, completion_tokens: int, cost_usd: float
    ) -> None:
        """Tokens and cost of one upstream response (``model`` already a label)."""
        meters = self._models.get(model)
        if meters is None:
            meters = self._model_meters(model)
        meters.prompt_tokens.observe(prompt_tokens)
        meters.completion_tokens.observe(completion_tokens)
        if prompt_tokens:
            meters.prompt_total.inc(prompt_tokens)
        if completion_tokens:
            meters.completion_total.inc(completion_tokens)
        if cost_usd:
            meters.cost.inc(cost_usd)

    def record_saved(self, model: str, saved_usd: float) -> None:
        """Cost a cache hit avoided."""
        if saved_usd:
            meters = self._models.get(model)
            if meters is None:
                meters = self._model_meters(model)
            meters.saved.inc(saved_usd)

    def _model_meters(self, model: str) -> _ModelMeters:
        if len(self._models) >= _CHILD_CACHE_MAX:
            self._models.clear()
        meters = self._models[model] = _ModelMeters(self, model)
        return meters

    def ratelimit_reject(self, key_type: str) -> None:
        self._rejected.get((key_type,)).inc()

    def set_breaker_state(self, upstream: str, state: int) -> None:
        self._breaker.get((upstream,)).set(state)

    def key_spend(self, key: str, cost_usd: float) -> None:
        """Cost charged to a virtual key (``key`` is its name, never its secret)."""
        child = self._key_spend.get(key)
        if child is None:
            if len(self._key_spend) >= _CHILD_CACHE_MAX:
                self._key_spend.clear()
            child = self._key_spend[key] = self.key_spend_usd.labels(key)
        child.inc(cost_usd)

    def key_reject(self, key: str, reason: str) -> None:
        self._key_rejected.get((key, reason)).inc()

    # -- exposition -------------------------------------------------------
    def render(self) -> tuple[bytes, str]:
        """``(body, content type)`` for ``GET /metrics``; all workers summed.

        With a metrics directory, reads every worker's files (so any worker
        can answer); else this process's values.
        """
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _NoCount:
    __slots__ = ()

    def inc(self, amount: float = 1) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass


NO_COUNT = _NoCount()


class _NoMeters:
    """:class:`TargetMeters` with metrics off."""

    __slots__ = ()

    ok_attempts = NO_COUNT
    latency = NO_COUNT

    def request(self, method: bytes, status: int, seconds: float) -> None:
        pass

    def attempt(self, outcome: str) -> None:
        pass


NO_METERS = _NoMeters()


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
