"""Micro-benchmark: the metric updates of one proxied request.

One chat completion that misses the cache records, in this order: the
cache miss, the upstream attempt ("ok"), the upstream latency, the
request count and duration, tokens (two histogram observations, two
counters) and cost: 10 updates plus the label lookups around them.

``prometheus-client`` is what relay used before it kept its own values:
the same helpers driving prometheus-client's metrics (a lock per update,
a linear scan for a histogram bucket). ``relay`` is relay's own array.
Both run with and without a multi-worker directory (mmap'd files).

Run with ``python -m benchmarks.bench_metrics`` (prints ns per request
and the ratio from one run) or ``pytest benchmarks/bench_metrics.py``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import timeit
from collections.abc import Callable
from typing import Any

import pytest

from relay.ops import metrics as metrics_module
from relay.ops.metrics import Metrics


def prometheus_client_metrics() -> Metrics:
    """A Metrics whose families are prometheus-client's (the former design)."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values

    values.ValueClass = values.get_value_class()  # file-backed if the directory is set
    ours = Metrics(directory=None)
    twin = Metrics.__new__(Metrics)
    registry = CollectorRegistry()
    made: dict[int, Any] = {}
    for attr, family in vars(ours).items():
        if not isinstance(family, metrics_module._Family):
            continue
        if family.kind == "histogram":
            metric: Any = Histogram(
                family.name, family.documentation, family.labelnames,
                buckets=family.bounds, registry=registry,
            )  # fmt: skip
        elif family.kind == "gauge":
            metric = Gauge(
                family.name, family.documentation, family.labelnames,
                multiprocess_mode="livemax", registry=registry,
            )  # fmt: skip
        else:
            metric = Counter(
                family.name, family.documentation, family.labelnames, registry=registry
            )
        setattr(twin, attr, metric)
        made[id(family)] = metric
    for attr, children in vars(ours).items():
        if isinstance(children, metrics_module._Children):
            setattr(twin, attr, metrics_module._Children(made[id(children._metric)]))
    twin._models, twin._key_spend = {}, {}
    twin.registry = registry
    return twin


def one_request(m: Metrics) -> Callable[[], None]:
    """The updates of one cache-missing completion, as the pipeline makes them."""
    meters = m.target_meters("api.openai.com")
    cache_misses = m.cache_misses

    def run() -> None:
        cache_misses.inc()
        meters.ok_attempts.inc()
        meters.latency.observe(0.21)
        meters.request(b"POST", 200, 0.2345)
        m.record_tokens("gpt-4o", 812, 133, 0.00336)

    return run


def per_request_ns(fn: Callable[[], None], number: int = 20000, repeat: int = 5) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e9


@pytest.mark.parametrize("kind", ["relay", "prometheus-client"])
def test_metric_updates_per_request(benchmark, kind: str) -> None:
    m = Metrics(directory=None) if kind == "relay" else prometheus_client_metrics()
    benchmark(one_request(m))


def relay_request(twin: str) -> Callable[[], None]:
    """One request's updates on relay's Metrics with one ``relay._fast`` twin's
    children (all of them made, label children included, before it returns)."""
    import relay._fast as fast

    impl = fast.pure if twin == "pure" else fast.compiled
    if impl is None:
        raise RuntimeError(f"compiled relay._fast not loaded: {fast.COMPILED_IMPORT_ERROR}")
    chosen = (fast.CounterChild, fast.GaugeChild, fast.HistogramChild)
    fast.CounterChild, fast.GaugeChild, fast.HistogramChild = (  # type: ignore[misc]
        impl.CounterChild, impl.GaugeChild, impl.HistogramChild
    )  # fmt: skip
    try:
        run = one_request(Metrics())
        run()  # the model's children are made on first use
        return run
    finally:
        fast.CounterChild, fast.GaugeChild, fast.HistogramChild = chosen  # type: ignore[misc]


def main() -> None:
    import relay._fast as fast

    twins = ["pure", "compiled"] if fast.compiled is not None else ["pure"]
    rows = []
    for mode in ("one process", "workers (mmap files)"):
        with tempfile.TemporaryDirectory() as directory:
            if mode.startswith("workers"):
                os.environ[metrics_module.MULTIPROC_ENV] = directory
            else:
                os.environ.pop(metrics_module.MULTIPROC_ENV, None)
            theirs = per_request_ns(one_request(prometheus_client_metrics()))
            ours = [per_request_ns(relay_request(twin)) for twin in twins]
            rows.append((mode, theirs, ours))
    os.environ.pop(metrics_module.MULTIPROC_ENV, None)
    print("ns per request's metric updates (best of 5 x 20000), ratio to prometheus-client")
    print(
        f"{'mode':<22} {'prometheus-client':>18}" + "".join(f" {'relay ' + t:>22}" for t in twins)
    )
    for mode, theirs, ours in rows:
        cells = "".join(f" {v:>10.0f} ns ({theirs / v:>5.1f}x)" for v in ours)
        print(f"{mode:<22} {theirs:>15.0f} ns{cells}")
    sys.stdout.flush()
    if "--cpu" in sys.argv:
        on = [relay_cpu_per_request(True) for _ in range(3)]
        off = [relay_cpu_per_request(False) for _ in range(3)]
        print(
            f"relay thread CPU per request: metrics on {min(on):.1f} µs, off {min(off):.1f} µs "
            f"(metrics cost {min(on) - min(off):.1f} µs; best of 3)"
        )


# ----------------------------------------------------------- whole requests

_CPU_BODY = (
    b'{"model":"gpt-4o","messages":[{"role":"user","content":"Say hi in three words."}],'
    b'"max_tokens":16}'
)


def relay_cpu_per_request(metrics_on: bool, requests: int = 1500, loop: str = "uvloop") -> float:
    """CPU of relay's own thread (µs) per keep-alive completion, in-process.

    relay serves from a thread (as in the tests) against the fake upstream
    on another thread; the client is a blocking socket. Only the relay
    thread's CPU clock is read, so client and upstream costs are not in it.
    """
    import socket
    import time

    from relay.testing.fake_upstream import ThreadedFakeUpstream
    from tests.support import RelayThread, make_config

    with ThreadedFakeUpstream(record=False) as upstream:
        config = make_config(upstream.url, metrics={"enabled": metrics_on}, usage={"enabled": True})
        with RelayThread(config, loop=loop) as relay:
            clock = time.pthread_getcpuclockid(relay._thread.ident or 0)
            head = (
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nAuthorization: Bearer sk-bench\r\n"
                b"Content-Length: %d\r\n\r\n" % len(_CPU_BODY)
            )
            with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:

                def one() -> None:
                    sock.sendall(head + _CPU_BODY)
                    data = b""
                    while True:
                        data += sock.recv(65536)
                        end = data.find(b"\r\n\r\n")
                        if end >= 0:
                            length = int(
                                data.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0]
                            )
                            if len(data) >= end + 4 + length:
                                return

                for _ in range(200):  # warm up: pools, children, tokenizer
                    one()
                start = time.clock_gettime(clock)
                for _ in range(requests):
                    one()
                return (time.clock_gettime(clock) - start) / requests * 1e6


if __name__ == "__main__":
    main()
