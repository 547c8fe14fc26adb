"""The shipped PromQL works against a real Prometheus scraping a real relay.

Starts the fake upstream, relay in front of it, sends a known set of
requests, then a Prometheus server (Debian package `prometheus`) scraping
relay every second with the shipped alert rules loaded. Every expression in
deploy/prometheus/alerts.yml, the Grafana dashboard and the docs' `promql`
blocks must be accepted by Prometheus' query API, and every relay_* name
they use must be one that relay's /metrics exports. The request count
Prometheus sees must be the number of requests made.

Prometheus missing: the test fails under CI=true, skips elsewhere.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "relay-dashboard.json"
IN_CI = bool(os.environ.get("CI"))
# Grafana's built-in variables, as Grafana would fill them in.
GRAFANA_MACROS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}
MODEL = "gpt-4o"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def relay_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RELAY_", "SERVER_", "REDIS_", "PROXY_", "CACHE_", "RATELIMIT_",
                                "CIRCUIT_BREAKER_", "LOG_", "PROMETHEUS_MULTIPROC"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return env


class Proc:
    """A child process in its own session, with its stderr kept for failures."""

    def __init__(self, name: str, args: list[str], cwd: Path) -> None:
        self.name = name
        self.err = cwd / f"{name}.stderr"
        self.proc = subprocess.Popen(args, cwd=cwd, env=relay_env(), stdout=subprocess.DEVNULL,
                                     stderr=self.err.open("wb"), start_new_session=True)

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")[-6000:]

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            pytest.fail(f"{self.name} exited with {self.proc.returncode}; its stderr:\n{self.stderr()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def request(port: int, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def wait_for(what: str, check: Any, procs: list[Proc], timeout: float = 30) -> Any:
    """Poll `check()` until it returns a truthy value; fail with the children's stderr."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        for p in procs:
            p.check_alive()
        try:
            last = check()
            if last:
                return last
        except OSError as e:
            last = e
        time.sleep(0.2)
    logs = "\n".join(f"--- {p.name} stderr:\n{p.stderr()}" for p in procs)
    pytest.fail(f"timed out waiting for {what} (last: {last!r})\n{logs}")


def chat(port: int, content: str, *, stream: bool = False, extra: dict[str, str] | None = None) -> int:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}]}
    if stream:
        body["stream"] = True
    headers = {"Authorization": "Bearer sk-prometheus-test", "Content-Type": "application/json"}
    headers.update(extra or {})
    status, _, _ = request(port, "POST", "/v1/chat/completions", json.dumps(body).encode(), headers)
    return status


@dataclass
class Stack:
    relay_port: int
    prom_port: int
    requests_made: int
    exported: set[str]
    procs: list[Proc]

    def query(self, expr: str) -> dict[str, Any]:
        qs = urllib.parse.urlencode({"query": expr})
        status, _, body = request(self.prom_port, "GET", f"/api/v1/query?{qs}")
        doc = json.loads(body)
        doc["http_status"] = status
        return doc

    def scalar(self, expr: str) -> float | None:
        result = self.query(expr)["data"]["result"]
        return float(result[0]["value"][1]) if result else None


def exported_names(text: str) -> set[str]:
    """Every series name relay's /metrics declares or has samples for."""
    names: set[str] = set()
    for fam in text_string_to_metric_families(text):
        names.add(fam.name)
        if fam.type == "counter":
            names.add(fam.name + "_total")
        if fam.type == "histogram":
            names.update(fam.name + s for s in ("_bucket", "_count", "_sum"))
        names.update(s.name for s in fam.samples)
    return names


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        if IN_CI:
            pytest.fail("the prometheus server (Debian package prometheus) is required under CI")
        pytest.skip("prometheus is not installed")
    if not (REPO / "relay" / "cli.py").exists():
        if IN_CI:
            pytest.fail("relay/cli.py is missing")
        pytest.skip("relay/cli.py does not exist yet")
    tmp = tmp_path_factory.mktemp("prometheus-stack")
    procs: list[Proc] = []
    try:
        up_port = free_port()
        upstream = Proc("fake-upstream", [sys.executable, "-m", "relay.testing.fake_upstream",
                                          "--host", "127.0.0.1", "--port", str(up_port)], tmp)
        procs.append(upstream)
        wait_for("the fake upstream", lambda: socket.create_connection(("127.0.0.1", up_port), 1).close() or True,
                 procs)

        relay_port = free_port()
        config = {
            "proxy": {"target": f"http://127.0.0.1:{up_port}"},
            "cache": {"enabled": True, "scope": "api_key"},
            # five requests allowed, then 429s: the rejection metric gets a series
            "ratelimit": {"enabled": True, "requests_per_second": 0.01, "burst": 5, "key": "global"},
            "models": {MODEL: {"input": 0.0025, "output": 0.01, "cached_input": 0.00125}},
        }
        (tmp / "relay.yaml").write_text(yaml.safe_dump(config))
        relay = Proc("relay", [sys.executable, "-m", "relay", "--config", str(tmp / "relay.yaml"),
                               "--port", f"127.0.0.1:{relay_port}"], tmp)
        procs.append(relay)
        wait_for("relay /healthz", lambda: request(relay_port, "GET", "/healthz", timeout=2)[0] == 200, procs)

        statuses = [
            chat(relay_port, "first"),                       # miss: tokens, cost
            chat(relay_port, "first"),                       # hit: saved cost
            chat(relay_port, "second", stream=True),         # streamed miss
            chat(relay_port, "third", extra={"x-fake-no-usage": "1"}),  # estimated usage
            chat(relay_port, "fourth", extra={"x-fake-status": "500"}),  # upstream 5xx passed through
            chat(relay_port, "fifth"),                       # over the burst: 429
            chat(relay_port, "sixth"),                       # 429
        ]
        assert statuses == [200, 200, 200, 200, 500, 429, 429], (statuses, relay.stderr())
        status, _, metrics_text = request(relay_port, "GET", "/metrics")
        assert status == 200
        exported = exported_names(metrics_text.decode())

        prom_port = free_port()
        prom_config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [{"job_name": "relay",
                                "static_configs": [{"targets": [f"127.0.0.1:{relay_port}"]}]}],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(prom_config))
        prom = Proc("prometheus", [prometheus, f"--config.file={tmp / 'prometheus.yml'}",
                                   f"--storage.tsdb.path={tmp / 'data'}",
                                   f"--web.listen-address=127.0.0.1:{prom_port}"], tmp)
        procs.append(prom)
        wait_for("prometheus /-/ready", lambda: request(prom_port, "GET", "/-/ready", timeout=2)[0] == 200,
                 procs)
        s = Stack(relay_port, prom_port, len(statuses), exported, procs)
        wait_for("a scrape of relay with every request counted",
                 lambda: s.scalar('sum(relay_requests_total{method="POST"})') == len(statuses), procs)
        yield s
    finally:
        for p in reversed(procs):
            p.stop()


# ---------------------------------------------------------------------------
# The expressions


def _alert_exprs() -> list[tuple[str, str]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [(f"alerts.yml:{r.get('alert') or r.get('record')}", r["expr"])
            for g in doc["groups"] for r in g["rules"]]


def _dashboard_exprs() -> list[tuple[str, str]]:
    out = []
    for p in json.loads(DASHBOARD.read_text())["panels"]:
        for panel in [p, *p.get("panels", [])]:
            for t in panel.get("targets", []):
                expr = t["expr"]
                for macro, value in GRAFANA_MACROS.items():
                    expr = expr.replace(macro, value)
                out.append((f"dashboard:{panel['title']}:{t['refId']}", expr))
    return out


def _doc_exprs() -> list[tuple[str, str]]:
    """`promql` blocks in the docs: expressions separated by comment lines."""
    out = []
    for md in sorted((REPO / "docs").glob("*.md")):
        for i, block in enumerate(re.findall(r"```promql\n(.*?)```", md.read_text(), re.S)):
            current: list[str] = []
            parts = []
            for line in block.splitlines() + ["#"]:
                if line.lstrip().startswith("#"):
                    if current:
                        parts.append(" ".join(current))
                    current = []
                elif line.strip():
                    current.append(line.strip())
            out.extend((f"{md.name}:{i}:{j}", e) for j, e in enumerate(parts))
    return out


EXPRESSIONS = _alert_exprs() + _dashboard_exprs() + _doc_exprs()


@pytest.mark.parametrize("expr", [e for _, e in EXPRESSIONS], ids=[n for n, _ in EXPRESSIONS])
def test_expression_is_accepted(stack: Stack, expr: str) -> None:
    result = stack.query(expr)
    assert result["http_status"] == 200 and result["status"] == "success", result


def test_every_metric_name_is_exported(stack: Stack) -> None:
    used = {name for _, e in EXPRESSIONS for name in re.findall(r"\brelay_[a-z0-9_]+\b", e)}
    missing = sorted(used - stack.exported)
    assert not missing, f"used by alerts/dashboard/docs but not exported by relay: {missing}"
    # and every contract metric is used somewhere
    assert {"relay_requests_total", "relay_request_duration_seconds_bucket",
            "relay_upstream_latency_seconds_bucket", "relay_cache_hits_total", "relay_cache_misses_total",
            "relay_tokens_total", "relay_cost_usd_total", "relay_cost_saved_usd_total",
            "relay_ratelimit_rejected_total", "relay_circuit_breaker_state", "relay_redis_errors_total",
            "relay_config_reload_errors_total", "relay_request_tokens_bucket"} <= used


def test_prometheus_counts_the_requests_made(stack: Stack) -> None:
    assert stack.scalar('sum(relay_requests_total{method="POST"})') == stack.requests_made
    assert stack.scalar('sum(relay_requests_total{status="429"})') == 2
    assert stack.scalar('sum(relay_requests_total{status=~"5.."})') == 1
    assert stack.scalar("sum(relay_cache_hits_total)") == 1
    assert stack.scalar("sum(relay_ratelimit_rejected_total)") == 2
    # the breaker saw one 5xx, below the threshold: still closed
    assert stack.scalar("max(relay_circuit_breaker_state)") == 0
    assert (stack.scalar(f'sum(relay_cost_usd_total{{model="{MODEL}"}})') or 0) > 0


def test_alert_rules_load_and_evaluate(stack: Stack) -> None:
    expected = {n.split(":", 1)[1] for n, _ in _alert_exprs()}

    def evaluated() -> list[dict[str, Any]] | None:
        _, _, body = request(stack.prom_port, "GET", "/api/v1/rules")
        rules = [r for g in json.loads(body)["data"]["groups"] for r in g["rules"]]
        done = [r for r in rules if r.get("lastEvaluation", "").startswith("0001") is False
                and r.get("evaluationTime", 0) > 0]
        return rules if len(done) == len(rules) == len(expected) else None

    rules = wait_for("every rule evaluated", evaluated, stack.procs)
    assert {r["name"] for r in rules} == expected
    for r in rules:
        assert r["health"] == "ok", r
    # healthy traffic: nothing fires
    firing = [r["name"] for r in rules if r.get("state") == "firing"]
    assert not firing
