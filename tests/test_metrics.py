from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay.ops.metrics import DURATION_BUCKETS, MULTIPROC_ENV, Metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONTRACT = {
    "relay_requests": ("counter", {"route", "method", "status"}),
    "relay_request_duration_seconds": ("histogram", {"route"}),
    "relay_upstream_latency_seconds": ("histogram", {"upstream"}),
    "relay_cache_hits": ("counter", set()),
    "relay_cache_misses": ("counter", set()),
    "relay_request_tokens": ("histogram", {"model", "kind"}),
    "relay_tokens": ("counter", {"model", "kind"}),
    "relay_cost_usd": ("counter", {"model"}),
    "relay_cost_saved_usd": ("counter", {"model"}),
    "relay_ratelimit_rejected": ("counter", {"key_type"}),
    "relay_circuit_breaker_state": ("gauge", {"upstream"}),
    "relay_redis_errors": ("counter", set()),
    "relay_config_reload_errors": ("counter", set()),
}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def metrics(monkeypatch) -> Metrics:
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    return Metrics()


def exercise(m: Metrics) -> None:
    m.observe_request("default", "POST", 200, 0.004)
    m.observe_request("default", "POST", 200, 0.2)
    m.observe_request("api.anthropic.com", "POST", 429, 0.0001)
    m.observe_upstream_latency("api.openai.com", 0.15)
    m.cache_hits.inc()
    m.cache_misses.inc()
    m.cache_misses.inc()
    m.record_tokens("gpt-4o", 1200, 30, 0.00202)
    m.record_tokens("gpt-4o", 10, 0, 0.0)
    m.record_saved("gpt-4o", 0.5)
    m.ratelimit_reject("api_key")
    m.set_breaker_state("api.openai.com", 2)
    m.set_breaker_state("api.openai.com", 1)
    m.redis_errors.inc()
    m.config_reload_errors.inc(3)


def test_every_contract_metric_with_its_labels(metrics: Metrics) -> None:
    exercise(metrics)
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    for name, (kind, labels) in CONTRACT.items():
        assert name in families, name
        family = families[name]
        assert family.type == kind, name
        for s in family.samples:
            assert set(s.labels) - {"le"} == labels, (name, s.labels)


def test_values(metrics: Metrics) -> None:
    exercise(metrics)
    v = samples(metrics.render()[0].decode())
    ok = (("method", "POST"), ("route", "default"), ("status", "200"))
    assert v[("relay_requests_total", ok)] == 2
    limited = (("method", "POST"), ("route", "api.anthropic.com"), ("status", "429"))
    assert v[("relay_requests_total", limited)] == 1
    assert v[("relay_request_duration_seconds_count", (("route", "default"),))] == 2
    assert (
        v[("relay_request_duration_seconds_bucket", (("le", "0.005"), ("route", "default")))] == 1
    )
    assert (
        v[
            (
                "relay_request_duration_seconds_bucket",
                (("le", "0.0005"), ("route", "api.anthropic.com")),
            )
        ]
        == 1
    )
    assert v[
        ("relay_upstream_latency_seconds_sum", (("upstream", "api.openai.com"),))
    ] == pytest.approx(0.15)
    assert v[("relay_cache_hits_total", ())] == 1
    assert v[("relay_cache_misses_total", ())] == 2
    assert v[("relay_tokens_total", (("kind", "prompt"), ("model", "gpt-4o")))] == 1210
    assert v[("relay_tokens_total", (("kind", "completion"), ("model", "gpt-4o")))] == 30
    assert v[("relay_request_tokens_count", (("kind", "completion"), ("model", "gpt-4o")))] == 2
    assert v[("relay_cost_usd_total", (("model", "gpt-4o"),))] == pytest.approx(0.00202, abs=1e-12)
    assert v[("relay_cost_saved_usd_total", (("model", "gpt-4o"),))] == 0.5
    assert v[("relay_ratelimit_rejected_total", (("key_type", "api_key"),))] == 1
    assert v[("relay_circuit_breaker_state", (("upstream", "api.openai.com"),))] == 1
    assert v[("relay_redis_errors_total", ())] == 1
    assert v[("relay_config_reload_errors_total", ())] == 3


def test_own_registry_not_global(metrics: Metrics) -> None:
    from prometheus_client import REGISTRY

    metrics.cache_hits.inc()
    assert REGISTRY.get_sample_value("relay_cache_hits_total") is None
    second = Metrics()  # a second owner (tests, reload) must not clash
    assert samples(second.render()[0].decode())[("relay_cache_hits_total", ())] == 0


def test_children_are_cached(metrics: Metrics) -> None:
    metrics.observe_request("default", "GET", 200, 0.001)
    child = metrics._requests.get(("default", "GET", 200))
    metrics.observe_request("default", "GET", 200, 0.001)
    assert metrics._requests.get(("default", "GET", 200)) is child
    assert child is metrics.requests.labels("default", "GET", "200")


def test_duration_buckets() -> None:
    assert DURATION_BUCKETS[0] == 0.0005 and DURATION_BUCKETS[-1] == 60.0
    assert list(DURATION_BUCKETS) == sorted(DURATION_BUCKETS)


WORKER = textwrap.dedent(
    """
    import sys
    from relay.ops.metrics import Metrics
    m = Metrics()
    m.observe_request("default", "POST", 200, 0.01)
    m.cache_hits.inc()
    m.record_tokens("gpt-4o", 100, 20, 0.25)
    m.record_saved("gpt-4o", 0.125)
    m.set_breaker_state("api.openai.com", int(sys.argv[1]))
    import os
    print(os.getpid())
    """
)

LAUNCHER = textwrap.dedent(
    """
    import json, os, subprocess, sys
    import prometheus_client  # imported before the directory is set, on purpose
    from relay.ops.metrics import Metrics, mark_worker_dead, prepare_multiprocess_dir
    path, worker = sys.argv[1], sys.argv[2]
    prepare_multiprocess_dir(path)
    pids = {}
    for state in ("2", "0"):
        proc = subprocess.run([sys.executable, "-c", worker, state], timeout=60, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        pids[state] = int(proc.stdout)
    m = Metrics()
    m.cache_hits.inc()  # the launcher's own value is summed too
    before = m.render()[0].decode()
    # the worker that saw the breaker open exits: its live gauge goes away
    mark_worker_dead(pids["2"])
    after = m.render()[0].decode()
    print(json.dumps({"before": before, "after": after, "files": sorted(os.listdir(path))}))
    """
)


def run_launcher(tmp_path) -> dict:
    path = tmp_path / "metrics"
    path.mkdir()
    (path / "counter_99999.db").write_bytes(b"stale file from an older release")
    (path / "relay-metrics-99999-0badcafe.values").write_bytes(b"\x00" * 8)
    (path / "relay-metrics-99999-0badcafe.labels").write_text('["relay_cache_hits_total",[],0]\n')
    (path / "keep.txt").write_text("not ours")
    env = {k: v for k, v in os.environ.items() if k != MULTIPROC_ENV}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", LAUNCHER, str(path), WORKER],
        env=env,
        capture_output=True,
        timeout=120,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_multiprocess_values_are_summed(tmp_path) -> None:
    out = run_launcher(tmp_path)
    v = samples(out["before"])
    ok = (("method", "POST"), ("route", "default"), ("status", "200"))
    assert v[("relay_requests_total", ok)] == 2
    assert v[("relay_request_duration_seconds_count", (("route", "default"),))] == 2
    assert v[("relay_cache_hits_total", ())] == 3
    assert v[("relay_tokens_total", (("kind", "prompt"), ("model", "gpt-4o")))] == 200
    assert v[("relay_cost_usd_total", (("model", "gpt-4o"),))] == 0.5
    assert v[("relay_cost_saved_usd_total", (("model", "gpt-4o"),))] == 0.25
    # livemax: the worst state of the live workers, no pid label
    assert v[("relay_circuit_breaker_state", (("upstream", "api.openai.com"),))] == 2
    after = samples(out["after"])
    assert after[("relay_circuit_breaker_state", (("upstream", "api.openai.com"),))] == 0
    assert after[("relay_cache_hits_total", ())] == 3  # counters of dead workers stay
    # the stale file was wiped, the operator's other file left alone
    assert "counter_99999.db" not in out["files"]
    assert not any("99999" in name for name in out["files"])
    assert "keep.txt" in out["files"]


def test_mark_worker_dead_without_multiprocess_is_a_no_op(monkeypatch, tmp_path) -> None:
    from relay.ops.metrics import mark_worker_dead

    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    (tmp_path / "relay-metrics-12345-00000000.values").write_bytes(b"")
    mark_worker_dead(12345)
    assert sorted(os.listdir(tmp_path)) == [
        "relay-metrics-12345-00000000.values"
    ]  # nothing touched
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    mark_worker_dead(12345)
    mark_worker_dead(54321)  # no files of that worker: nothing to mark
    assert sorted(os.listdir(tmp_path)) == [
        "relay-metrics-12345-00000000.dead",
        "relay-metrics-12345-00000000.values",
    ]


def _prometheus_client_twin() -> Metrics:
    """A :class:`Metrics` whose families are prometheus-client's own metrics
    (what relay used before it kept its own values), same names, help,
    labels and buckets, driven by the same recording helpers."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    from relay.ops import metrics as metrics_module

    ours = Metrics(directory=None)
    twin = Metrics.__new__(Metrics)
    registry = CollectorRegistry()
    for attr, family in vars(ours).items():
        if not isinstance(family, metrics_module._Family):
            continue
        if family.kind == "histogram":
            made: object = Histogram(
                family.name, family.documentation, family.labelnames,
                buckets=family.bounds, registry=registry,
            )  # fmt: skip
        elif family.kind == "gauge":
            made = Gauge(family.name, family.documentation, family.labelnames, registry=registry)
        else:
            made = Counter(family.name, family.documentation, family.labelnames, registry=registry)
        setattr(twin, attr, made)
    for attr, children in vars(ours).items():
        if isinstance(children, metrics_module._Children):
            metric = getattr(twin, next(a for a, f in vars(ours).items() if f is children._metric))
            setattr(twin, attr, metrics_module._Children(metric))
    twin._models, twin._key_spend = {}, {}
    twin.registry = registry
    return twin


def _exposition_lines(text: str) -> list[str]:
    # prometheus-client's in-process metrics add *_created series; relay's
    # multi-worker output never had them, so they are not part of the format.
    return sorted(line for line in text.splitlines() if "_created" not in line)


def test_exposition_is_the_same_as_prometheus_clients(metrics: Metrics) -> None:
    from prometheus_client import generate_latest

    twin = _prometheus_client_twin()
    for m in (metrics, twin):
        exercise(m)
        m.upstream_attempt("api.openai.com", "ok")
        m.upstream_attempt("api.openai.com", "5xx")
        m.attempts_child("api.openai.com", "ok").inc()
        m.observe_upstream_latency("api.openai.com", 0.0005)  # on a bucket bound
        m.observe_upstream_latency("api.openai.com", 99.0)  # past the last bound: +Inf
        m.record_tokens("claude-3-5-sonnet", 16, 1048577, 1.5)
        target = m.target_meters("api.openai.com", "default")  # what a pipeline keeps
        target.request(b"POST", 200, 0.3)
        target.request(b"BREW", 418, 0.01)
        target.attempt("timeout")
        target.ok_attempts.inc()
        target.latency.observe(0.02)
        m.key_spend("billing-app", 0.25)
        m.key_spend("billing-app", 0.5)
        m.key_reject("unknown", "invalid")
    ours = metrics.render()[0].decode()
    theirs = generate_latest(twin.registry).decode()
    assert _exposition_lines(ours) == _exposition_lines(theirs)


def test_histogram_bucket_edges(metrics: Metrics) -> None:
    for value in (0.0, 0.0005, 0.00050001, 60.0, 60.5):
        metrics.observe_upstream_latency("u", value)
    v = samples(metrics.render()[0].decode())

    def bucket(le: str) -> float:
        return v[("relay_upstream_latency_seconds_bucket", (("le", le), ("upstream", "u")))]

    assert bucket("0.0005") == 2  # le is inclusive
    assert bucket("0.001") == 3
    assert bucket("30.0") == 3
    assert bucket("60.0") == 4
    assert bucket("+Inf") == 5
    assert v[("relay_upstream_latency_seconds_count", (("upstream", "u"),))] == 5


def test_family_collect_reads_the_summed_values(metrics: Metrics) -> None:
    exercise(metrics)
    (hits,) = metrics.cache_hits.collect()
    assert [(s.name, s.value) for s in hits.samples] == [("relay_cache_hits_total", 1.0)]
    (durations,) = metrics.request_duration.collect()
    counts = {s.labels["route"]: s.value for s in durations.samples if s.name.endswith("_count")}
    assert counts == {"default": 2.0, "api.anthropic.com": 1.0}
    assert metrics.registry.get_sample_value("relay_cache_misses_total") == 2.0


def test_children_past_the_slot_bound_are_not_exposed(metrics: Metrics, monkeypatch) -> None:
    from relay.ops import metrics as metrics_module

    monkeypatch.setattr(metrics_module, "_SLOTS", metrics.store._next + 1)
    metrics.ratelimit_reject("api_key")  # one slot left: it fits
    metrics.observe_upstream_latency("api.openai.com", 0.1)  # a histogram does not
    v = samples(metrics.render()[0].decode())
    assert v[("relay_ratelimit_rejected_total", (("key_type", "api_key"),))] == 1
    assert not any(name.startswith("relay_upstream_latency") for name, _ in v)
