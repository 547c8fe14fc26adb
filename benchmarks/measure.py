"""The scenarios: wrk runs with CPU/memory sampled, and timed streams."""

from __future__ import annotations

import json
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from http.client import HTTPConnection

from .loadgen import BODY_MARK, REQUEST_BODY, run_wrk
from .procs import Processes, Started, machine_busy_seconds
from .sse_client import StreamClient
from .targets import Target

__all__ = ["Run", "StreamRun", "measure_wrk", "measure_streams", "preflight", "unique_body"]


def unique_body(model: str = "gpt-4o", stream: bool = False) -> bytes:
    """The benchmark body with a fresh value in its mark: never a cache hit."""
    body = REQUEST_BODY.replace(BODY_MARK, secrets.token_hex(12))
    if model != "gpt-4o":
        body = body.replace('"model":"gpt-4o"', f'"model":"{model}"', 1)
    if stream:
        body = body.replace('"max_tokens":120,"stream":false', '"max_tokens":400,"stream":true', 1)
    return body.encode()


def static_body() -> bytes:
    """The body wrk sends when it does not vary it (the cache-hit scenario)."""
    return REQUEST_BODY.replace(BODY_MARK, "0" * len(BODY_MARK)).encode()


@dataclass(slots=True)
class Run:
    scenario: str          # miss64 | miss1 | hit64
    target: str
    round: int
    connections: int
    rps: float = 0.0
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    requests: int = 0
    non_2xx: int = 0
    socket_errors: int = 0
    cpu_cores: float | None = None   # CPU seconds of the target's processes / wall seconds
    cpu_us_per_req: float | None = None
    other_cores: float | None = None  # CPU used meanwhile by processes the suite did not start
    rss_mb: float | None = None      # peak during the run, summed over its processes
    processes: int | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class _MemorySampler(threading.Thread):
    """Peak RSS of a process group while a run lasts."""

    def __init__(self, proc: Started, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.proc = proc
        self.interval = interval
        self.peak = 0
        self.processes = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            stats = self.proc.stats()
            self.peak = max(self.peak, stats.rss_bytes)
            self.processes = max(self.processes, stats.processes)
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(2)


def measure_wrk(target: Target, scenario: str, round_no: int, *, connections: int,
                threads: int, seconds: float, vary: bool, suite: Processes | None = None) -> Run:
    run = Run(scenario, target.key, round_no, connections)
    proc = target.proc
    sampler = _MemorySampler(proc) if proc is not None else None
    before = proc.stats() if proc is not None else None
    if sampler is not None:
        sampler.start()
    busy0 = machine_busy_seconds()
    suite0 = suite.suite_cpu_seconds() if suite is not None else 0.0
    started = time.monotonic()
    try:
        result, _text = run_wrk(target.url, connections=connections, threads=threads,
                                seconds=seconds, headers=target.headers, vary=vary)
    except Exception as exc:  # recorded; one failed run must not end the suite
        run.error = f"{type(exc).__name__}: {exc}"[:500]
        return run
    finally:
        wall = time.monotonic() - started
        if sampler is not None:
            sampler.stop()
    if suite is not None:
        # Whatever else the machine ran meanwhile competed for the same cores.
        other = (machine_busy_seconds() - busy0) - (suite.suite_cpu_seconds() - suite0)
        run.other_cores = max(0.0, other / wall) if wall > 0 else None
    run.rps = result.rps
    run.p50_ms = result.p50
    run.p90_ms = result.latency_ms.get("90")
    run.p99_ms = result.p99
    run.requests = result.requests
    run.non_2xx = result.non_2xx
    run.socket_errors = result.socket_errors
    if proc is not None and before is not None and sampler is not None:
        after = proc.stats()
        cpu = after.cpu_seconds - before.cpu_seconds
        run.cpu_cores = cpu / wall if wall > 0 else None
        run.cpu_us_per_req = cpu / result.requests * 1e6 if result.requests else None
        run.rss_mb = max(sampler.peak, after.rss_bytes) / 1e6
        run.processes = max(sampler.processes, after.processes)
    return run


def preflight(target: Target, *, expect_cache: bytes | None = None,
              body: bytes | None = None) -> str | None:
    """One request as wrk will send it; None when the answer is a completion."""
    conn = HTTPConnection("127.0.0.1", target.port, timeout=60)
    try:
        headers = {"Content-Type": "application/json", **target.headers}
        conn.request("POST", "/v1/chat/completions", body or unique_body(), headers)
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            return f"HTTP {resp.status}: {data[:300]!r}"
        try:
            doc = json.loads(data)
        except ValueError:
            return f"not JSON: {data[:200]!r}"
        if not isinstance(doc, dict) or "choices" not in doc:
            return f"not a chat completion: {data[:200]!r}"
        if expect_cache is not None:
            got = resp.getheader("X-Relay-Cache", "").encode()
            if got != expect_cache:
                return f"X-Relay-Cache {got!r}, expected {expect_cache!r}"
        return None
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()


@dataclass(slots=True)
class StreamRun:
    target: str
    round: int
    kind: str                      # fast | slow
    status: int = 0
    events: int = 0
    ttfe_ms: float | None = None
    total_ms: float | None = None
    events_per_s: float | None = None
    spread_ms: float | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def measure_streams(target: Target, round_no: int, fast_streams: int) -> list[StreamRun]:
    """``fast_streams`` 200-event streams and one slow stream, on one connection each."""
    out: list[StreamRun] = []
    for kind, route, count in (("fast", target.fast, fast_streams), ("slow", target.slow, 1)):
        if route is None:
            continue
        client = StreamClient(route.port)
        try:
            for _ in range(count):
                res = client.stream(route.path, route.headers,
                                    unique_body(route.model, stream=True))
                run = StreamRun(target.key, round_no, kind, res.status, res.events)
                if res.first_event_s is not None:
                    run.ttfe_ms = res.first_event_s * 1000
                if res.last_event_s is not None:
                    run.total_ms = res.last_event_s * 1000
                run.events_per_s = res.events_per_s
                run.spread_ms = res.spread_s * 1000
                if not res.ok:
                    run.error = res.error or f"HTTP {res.status}: {res.body_head[:200]!r}"
                out.append(run)
                if run.error and run.status != 200:
                    break  # a gateway that cannot stream fails the same way every time
        finally:
            client.close()
    return out
