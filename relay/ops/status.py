"""The live figures of ``GET /relay/status``, read from relay's own metrics.

Nothing here runs per request: the snapshot is computed when the endpoint
is asked, from the same Prometheus values ``/metrics`` exposes. With
several workers those are the values files of every worker, so any
worker answers with the instance's totals (the same sum ``/metrics``
gives); with one process, its registry. Reading the files is blocking
work, so the endpoint runs :func:`status_snapshot` in a thread.

Shape (all counts since the instance started)::

    {"scope": "instance", "time": "2025-01-01T00:00:00Z",
     "metrics_enabled": true,
     "requests": {"total": 12, "by_status": {"2xx": 10, "4xx": 1, "5xx": 1, ...}},
     "duration": {"count": 12, "mean_seconds": ..., "p50_seconds": ..., "p95_seconds": ...},
     "cache": {"hits": 3, "misses": 7},
     "ratelimit": {"rejected": 1, "by_key_type": {"api_key": 1}},
     "keys": {"rejected": 0, "by_reason": {}, "by_key": {}},
     "upstreams": {"127.0.0.1:9000": {"state": "closed", "requests": 12,
                   "errors": 1, "by_status": {...}, "ttfb": {...},
                   "attempts": {"ok": 11, "5xx": 1}, "failed_attempts": 1,
                   "error_rate": 0.083}},
     "errors": {"5xx": 1, "redis": 0, "config_reload": 0}}

``state`` is ``closed``, ``half-open``, ``open`` (the worst among the live
workers, as the ``relay_circuit_breaker_state`` gauge reports it) or
``unknown`` for an upstream seen in the counters but without a gauge.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any

from relay.ops.metrics import Metrics

__all__ = ["BREAKER_STATES", "STATUS_CLASSES", "histogram_quantile", "status_snapshot"]

BREAKER_STATES = {0: "closed", 1: "half-open", 2: "open"}
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
# relay_key_rejected_total reasons (virtual keys), always reported.
KEY_REJECT_REASONS = ("invalid", "model", "budget", "rpm", "tpm")


def _samples(metrics: Metrics) -> Iterable[Any]:
    """Every sample of relay's metrics, summed over the instance's workers
    (the registry's collector reads every worker's files, as ``/metrics``)."""
    for family in metrics.registry.collect():
        yield from family.samples


def _status_class(status: str) -> str:
    return f"{status[:1]}xx" if len(status) == 3 and status.isdigit() else "other"


def _empty_classes() -> dict[str, int]:
    return dict.fromkeys(STATUS_CLASSES, 0)


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """The q-quantile of a cumulative histogram, as Prometheus estimates it.

    ``buckets`` are ``(upper bound, cumulative count)`` pairs sorted by bound,
    the last one ``+Inf``. Linear interpolation inside the bucket that holds
    the rank; a rank in the ``+Inf`` bucket answers the largest finite bound.
    None when the histogram is empty.
    """
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return lower_bound


class _Histogram:
    """One histogram's buckets, sum and count, merged over label values."""

    __slots__ = ("buckets", "count", "sum")

    def __init__(self) -> None:
        self.buckets: dict[float, float] = {}
        self.count = 0.0
        self.sum = 0.0

    def add(self, suffix: str, labels: dict[str, str], value: float) -> None:
        if suffix == "_bucket":
            bound = float(labels["le"])
            self.buckets[bound] = self.buckets.get(bound, 0.0) + value
        elif suffix == "_count":
            self.count += value
        elif suffix == "_sum":
            self.sum += value

    def summary(self) -> dict[str, Any]:
        pairs = sorted(self.buckets.items())
        count = int(self.count)
        return {
            "count": count,
            "mean_seconds": self.sum / count if count else None,
            "p50_seconds": histogram_quantile(0.5, pairs),
            "p95_seconds": histogram_quantile(0.95, pairs),
        }


def _upstream_row() -> dict[str, Any]:
    return {
        "state": "unknown",
        "state_code": None,
        "requests": 0,
        "errors": 0,
        "by_status": _empty_classes(),
        "ttfb": None,
        "attempts": {},
        "_ttfb": _Histogram(),
    }


def status_snapshot(metrics: Metrics, *, metrics_enabled: bool = True) -> dict[str, Any]:
    """The figures of ``/relay/status`` (blocking: reads the workers' files)."""
    by_status = _empty_classes()
    requests_total = 0
    duration = _Histogram()
    cache_hits = cache_misses = 0
    rejected_by_type: dict[str, int] = {}
    key_by_reason = dict.fromkeys(KEY_REJECT_REASONS, 0)
    key_by_key: dict[str, dict[str, int]] = {}
    redis_errors = reload_errors = 0
    upstreams: dict[str, dict[str, Any]] = {}

    def upstream(label: str) -> dict[str, Any]:
        row = upstreams.get(label)
        if row is None:
            row = upstreams[label] = _upstream_row()
        return row

    for sample in _samples(metrics):
        name: str = sample.name
        labels: dict[str, str] = sample.labels
        value = float(sample.value)
        if name == "relay_requests_total":
            n = int(value)
            cls = _status_class(labels.get("status", ""))
            requests_total += n
            by_status[cls] = by_status.get(cls, 0) + n
            row = upstream(labels.get("route", ""))
            row["requests"] += n
            row["by_status"][cls] = row["by_status"].get(cls, 0) + n
            if cls == "5xx":
                row["errors"] += n
        elif name.startswith("relay_request_duration_seconds_"):
            duration.add(name[len("relay_request_duration_seconds") :], labels, value)
        elif name.startswith("relay_upstream_latency_seconds_"):
            suffix = name[len("relay_upstream_latency_seconds") :]
            upstream(labels.get("upstream", ""))["_ttfb"].add(suffix, labels, value)
        elif name == "relay_cache_hits_total":
            cache_hits += int(value)
        elif name == "relay_cache_misses_total":
            cache_misses += int(value)
        elif name == "relay_ratelimit_rejected_total":
            kind = labels.get("key_type", "")
            rejected_by_type[kind] = rejected_by_type.get(kind, 0) + int(value)
        elif name == "relay_key_rejected_total":
            reason = labels.get("reason", "")
            key_by_reason[reason] = key_by_reason.get(reason, 0) + int(value)
            per_key = key_by_key.setdefault(labels.get("key", ""), {})
            per_key[reason] = per_key.get(reason, 0) + int(value)
        elif name == "relay_circuit_breaker_state":
            code = int(value)
            row = upstream(labels.get("upstream", ""))
            row["state_code"] = code
            row["state"] = BREAKER_STATES.get(code, "unknown")
        elif name == "relay_upstream_attempts_total":
            attempts = upstream(labels.get("upstream", ""))["attempts"]
            outcome = labels.get("outcome", "")
            attempts[outcome] = attempts.get(outcome, 0) + int(value)
        elif name == "relay_redis_errors_total":
            redis_errors += int(value)
        elif name == "relay_config_reload_errors_total":
            reload_errors += int(value)

    for row in upstreams.values():
        ttfb: _Histogram = row.pop("_ttfb")
        row["ttfb"] = ttfb.summary()
        # Per target, the share of tries that failed is the telling rate (a
        # retried request's answer is counted on the target that gave it);
        # without recorded tries, the share of 5xx answers.
        tries = sum(row["attempts"].values())
        failed = tries - row["attempts"].get("ok", 0)
        row["failed_attempts"] = failed
        if tries:
            row["error_rate"] = failed / tries
        else:
            row["error_rate"] = row["errors"] / row["requests"] if row["requests"] else None
    return {
        "scope": "instance",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "metrics_enabled": metrics_enabled,
        "requests": {"total": requests_total, "by_status": by_status},
        "duration": duration.summary(),
        "cache": {"hits": cache_hits, "misses": cache_misses},
        "ratelimit": {"rejected": sum(rejected_by_type.values()), "by_key_type": rejected_by_type},
        "keys": {
            "rejected": sum(key_by_reason.values()),
            "by_reason": key_by_reason,
            "by_key": key_by_key,
        },
        "upstreams": dict(sorted(upstreams.items())),
        "errors": {
            "5xx": by_status.get("5xx", 0),
            "redis": redis_errors,
            "config_reload": reload_errors,
        },  # fmt: skip
    }
