from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay.metrics import DURATION_BUCKETS, MULTIPROC_ENV, Metrics

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
    from relay.metrics import Metrics
    m = Metrics()
    m.observe_request("default", "POST", 200, 0.01)
    m.cache_hits.inc()
    m.record_tokens("gpt-4o", 100, 20, 0.25)
    m.record_saved("gpt-4o", 0.125)
    m.set_breaker_state("api.openai.com", int(sys.argv[1]))
    """
)

LAUNCHER = textwrap.dedent(
    """
    import json, os, subprocess, sys
    import prometheus_client  # imported before the directory is set, on purpose
    from relay.metrics import Metrics, mark_worker_dead, prepare_multiprocess_dir
    path, worker = sys.argv[1], sys.argv[2]
    prepare_multiprocess_dir(path)
    pids = []
    for state in ("2", "0"):
        proc = subprocess.run([sys.executable, "-c", worker, state], timeout=60)
        assert proc.returncode == 0
    # the workers' pids are in their file names
    for name in os.listdir(path):
        if name.startswith("gauge_livemax_"):
            pids.append(int(name[len("gauge_livemax_"):-3]))
    m = Metrics()
    m.cache_hits.inc()  # the launcher's own value is summed too
    before = m.render()[0].decode()
    # the worker that saw the breaker open exits: its live gauge goes away
    from prometheus_client.multiprocess import MultiProcessCollector
    for pid in pids:
        files = [os.path.join(path, f"gauge_livemax_{pid}.db")]
        values = [s.value for metric in MultiProcessCollector.merge(files) for s in metric.samples]
        if values == [2.0]:
            mark_worker_dead(pid)
    after = m.render()[0].decode()
    print(json.dumps({"before": before, "after": after, "files": sorted(os.listdir(path))}))
    """
)


def run_launcher(tmp_path) -> dict:
    path = tmp_path / "metrics"
    path.mkdir()
    (path / "counter_99999.db").write_bytes(b"stale file from a previous run")
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
    assert "keep.txt" in out["files"]


def test_mark_worker_dead_without_multiprocess_is_a_no_op(monkeypatch, tmp_path) -> None:
    from prometheus_client import multiprocess

    from relay.metrics import mark_worker_dead

    marked: list[tuple[int, str]] = []
    monkeypatch.setattr(multiprocess, "mark_process_dead", lambda pid, path: marked.append((pid, path)))
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    mark_worker_dead(12345)
    assert marked == []  # no directory: nothing to clean up, nothing touched
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    mark_worker_dead(12345)
    assert marked == [(12345, str(tmp_path))]
