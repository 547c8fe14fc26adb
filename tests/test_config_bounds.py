"""Every numeric key has both bounds, checked at load time.

A value the loader accepts must be one every consumer accepts too (the C
twins in relay._fast, asyncio timers, Redis expiry times): otherwise a hot
reload passes validation and is refused half way through being applied. So
the edges are proven both ways: just beyond is refused with file, key and
reason (by ``--check-config`` as well); the edge itself builds a complete
runtime and pipeline, on both twins.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import subprocess
import sys
from typing import Any

import pytest
import yaml

from relay.config import (
    MAX_ATTEMPTS,
    MAX_BYTES,
    MAX_COUNT,
    MAX_EXACT,
    MAX_RATE,
    MAX_SECONDS,
    ConfigError,
    Problem,
    known_keys,
    load_config,
)
from tests.support import ROOT

BURST_TOO_BIG = 1152921504606846976  # 2**60: the edit seen half applied


def write(tmp_path: pathlib.Path, text: str) -> str:
    path = tmp_path / "relay.yaml"
    path.write_text(text)
    return str(path)


def problems(path: str, env: dict[str, str] | None = None) -> list[Problem]:
    with pytest.raises(ConfigError) as info:
        load_config(path, env or {})
    return info.value.problems


# (YAML 1.1 reads 1e12 as a string: floats here are written 1.0e+12.)
@pytest.mark.parametrize(
    ("yaml_text", "key", "reason"),
    [
        (f"ratelimit:\n  burst: {BURST_TOO_BIG}\n", "ratelimit.burst",
         f"must be <= {MAX_EXACT}, got {BURST_TOO_BIG}"),
        ("cache:\n  ttl: 1.0e+12\n", "cache.ttl", "must be <= 31536000, got 1000000000000.0"),
        ("cache:\n  ttl: -5\n", "cache.ttl", "must be > 0, got -5.0"),
        ("cache:\n  max_entries: -1\n", "cache.max_entries", "must be > 0, got -1"),
        ("server:\n  idle_timeout: .nan\n", "server.idle_timeout", "must be a finite number, got nan"),
        ("proxy:\n  read_timeout: .inf\n", "proxy.read_timeout", "must be a finite number, got inf"),
        ("redis:\n  timeout: -.inf\n", "redis.timeout", "must be a finite number, got -inf"),
        ("ratelimit:\n  requests_per_second: 1.0e+400\n", "ratelimit.requests_per_second",
         "must be a finite number, got inf"),
        ("ratelimit:\n  requests_per_second: 1" + "0" * 400 + "\n",
         "ratelimit.requests_per_second", "must be a finite number, got 1000"),
        ("ratelimit:\n  requests_per_second: 2.0e+9\n", "ratelimit.requests_per_second",
         "must be <= 1000000000, got 2000000000.0"),
        # The breaker counts failures in a C int.
        (f"circuit_breaker:\n  failure_threshold: {2**31}\n", "circuit_breaker.failure_threshold",
         f"must be <= {2**31 - 1}, got {2**31}"),
        ("circuit_breaker:\n  recovery_timeout: 1.0e+300\n", "circuit_breaker.recovery_timeout",
         "must be <= 31536000"),
        (f"proxy:\n  pool_size: {2**63}\n", "proxy.pool_size", f"must be <= {2**31 - 1}, got {2**63}"),
        (f"redis:\n  db: {2**31}\n", "redis.db", f"must be <= {2**31 - 1}"),
        ("server:\n  workers: 100000\n", "server.workers", "must be <= 1024, got 100000"),
        (f"server:\n  max_body_bytes: {2**53 + 1}\n", "server.max_body_bytes",
         f"must be <= {MAX_BYTES}"),
        # An idle bucket's expiry in Redis is its refill time, in ms.
        ("ratelimit:\n  burst: 1000000\n  requests_per_second: 1.0e-300\n", "ratelimit.burst",
         "the time to refill an empty bucket) must be <= 1000000000000 s"),
        ("models:\n  gpt-4: 1.0e+300\n", "models.gpt-4", "must be <= 1000000, got 1e+300"),
        ("models:\n  gpt-4: {input: 1, output: .nan}\n", "models.gpt-4.output", "must be >= 0"),
    ],
)  # fmt: skip
def test_out_of_bound_values_are_refused(
    tmp_path: pathlib.Path, yaml_text: str, key: str, reason: str
) -> None:
    path = write(tmp_path, yaml_text)
    [problem] = problems(path)
    assert (problem.file, problem.key) == (path, key)
    assert reason in problem.reason, problem.reason


def test_an_environment_override_is_bounded_too(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "ratelimit:\n  burst: 5\n")
    [problem] = problems(path, {"RATELIMIT_BURST": str(BURST_TOO_BIG)})
    assert problem == Problem(
        "$RATELIMIT_BURST", "ratelimit.burst", f"must be <= {MAX_EXACT}, got {BURST_TOO_BIG}"
    )
    [problem] = problems(path, {"CACHE_TTL": "nan"})
    assert problem.key == "cache.ttl" and "finite" in problem.reason


def test_a_number_too_long_to_read_is_a_problem_not_a_crash(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "ratelimit:\n  burst: " + "9" * 5000 + "\n")
    [problem] = problems(path)
    assert problem.file == path and "cannot be read" in problem.reason


def test_check_config_refuses_the_burst_that_was_half_applied(tmp_path: pathlib.Path) -> None:
    path = write(
        tmp_path,
        f"ratelimit:\n  burst: {BURST_TOO_BIG}\nlog:\n  requests: true\n"
        "cache:\n  ttl: 1.0e+12\nserver:\n  idle_timeout: .nan\n  max_body_bytes: -1\n",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RATELIMIT_")}
    result = subprocess.run(
        [sys.executable, "-m", "relay", "--check-config", "--config", path],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert f"{path}: ratelimit.burst: must be <= {MAX_EXACT}" in result.stderr
    assert f"{path}: cache.ttl: must be <= 31536000" in result.stderr
    assert f"{path}: server.idle_timeout: must be a finite number, got nan" in result.stderr
    assert f"{path}: server.max_body_bytes: must be > 0, got -1" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 4


# Every numeric key at its largest and smallest accepted value.
EDGES: dict[str, tuple[Any, Any]] = {
    "server.workers": (1, 1024),
    "server.max_body_bytes": (1, MAX_BYTES),
    "server.max_header_bytes": (1, MAX_BYTES),
    "server.header_timeout": (1e-9, MAX_SECONDS),
    "server.idle_timeout": (1e-9, MAX_SECONDS),
    "server.shutdown_timeout": (1e-9, MAX_SECONDS),
    "proxy.connect_timeout": (1e-9, MAX_SECONDS),
    "proxy.read_timeout": (1e-9, MAX_SECONDS),
    "proxy.pool_size": (1, MAX_COUNT),
    "proxy.first_byte_timeout": (1e-9, MAX_SECONDS),
    "proxy.max_connections": (1, MAX_COUNT),
    "retries.attempts": (0, MAX_ATTEMPTS),
    "retries.max_retry_after": (0.0, MAX_SECONDS),
    "cache.ttl": (1e-9, MAX_SECONDS),
    "cache.max_entries": (1, MAX_COUNT),
    "cache.max_body_bytes": (1, MAX_BYTES),
    "ratelimit.requests_per_second": (1e-6, MAX_RATE),
    "ratelimit.burst": (1, MAX_EXACT),
    "circuit_breaker.failure_threshold": (1, MAX_COUNT),
    "circuit_breaker.recovery_timeout": (1e-9, MAX_SECONDS),
    "redis.db": (0, MAX_COUNT),
    "redis.timeout": (1e-9, MAX_SECONDS),
    "keys.default_reserve_tokens": (0, MAX_COUNT),
}


def test_every_numeric_key_has_its_edges_listed() -> None:
    numeric = {
        k for k in known_keys()
        if k.split(".")[1] not in ("enabled", "port", "target", "scope", "key", "address",
                                   "password", "level", "requests", "api_key", "auth", "on",
                                   "mode", "addresses", "master_name", "store", "path",
                                   "admin_key")
    }  # fmt: skip
    assert numeric == set(EDGES)


@pytest.mark.parametrize("twin", ["pure", "compiled"])
@pytest.mark.parametrize("edge", [0, 1], ids=["smallest", "largest"])
def test_accepted_edges_build_in_both_twins(tmp_path: pathlib.Path, twin: str, edge: int) -> None:
    """What the loader accepts, the objects built from it accept: nothing
    can refuse a validated reload later. The whole runtime and pipeline are
    built with the chosen twin, the C types are checked on each twin."""
    from relay import _fast

    impl = _fast.pure if twin == "pure" else _fast.compiled
    if impl is None:
        if os.environ.get("CI"):
            pytest.fail("compiled extensions not built (CI is set)")
        pytest.skip("compiled extensions not built")
    sections: dict[str, dict[str, Any]] = {}
    for dotted, values in EDGES.items():
        section, key = dotted.split(".")
        sections[section] = {**sections.get(section, {}), key: values[edge]}
    sections["ratelimit"]["enabled"] = True
    sections["cache"]["enabled"] = True
    # Built, never connected: nothing listens on port 1.
    sections["redis"].update(enabled=True, address="127.0.0.1:1")
    if edge == 0:  # keep the refill time in bounds: 1 token at 1e-6/s
        sections["ratelimit"]["burst"] = 1
    else:
        sections["ratelimit"]["requests_per_second"] = 1e4  # refill 2**53 in < 1e12 s
    config = load_config(write(tmp_path, yaml.safe_dump(sections)), {})

    cb, rl = config.circuit_breaker, config.ratelimit
    breaker = impl.CircuitBreaker(cb.failure_threshold, cb.recovery_timeout)
    for _ in range(3):
        breaker.record_failure(0.0)
    table = impl.BucketTable(rl.requests_per_second, rl.burst, 16)
    allowed, remaining, _ = table.acquire(b"k", 0.0)
    assert allowed and remaining == rl.burst - 1
    impl.TokenBucket(rl.requests_per_second, rl.burst).remaining(1.0)

    async def build() -> None:
        from relay.ops.metrics import Metrics
        from relay.pipeline import Pipeline
        from relay.runtime import Runtime

        runtime = Runtime(asyncio.get_running_loop(), Metrics())
        pipeline = runtime.apply(config, lambda: Pipeline(config, runtime))
        assert pipeline.config is config and runtime.redis is not None
        await runtime.close()

    asyncio.run(build())


def test_workers_flag_has_the_same_bound_as_the_key(tmp_path: pathlib.Path) -> None:
    from relay.cli import main

    path = write(tmp_path, "server:\n  port: 127.0.0.1:0\n")
    assert main(["--config", path, "--workers", "1025"]) == 2
    assert main(["--config", path, "--workers", "0"]) == 2
