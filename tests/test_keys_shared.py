"""Virtual keys shared by several relays: two instances on one Redis, two
workers on one SQLite file, a Redis that goes away, and kill -9.

Budgets and tpm must hold however many requests run at once on however
many processes share the store; spend answered before a crash survives it.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest
import yaml

from relay.testing import ThreadedFakeUpstream
from tests.conftest import RelayPair
from tests.redis_server import RedisServer
from tests.support import RelayThread, free_port, make_config, start_relay_process, wait_for_port
from tests.test_keys import (
    PRICES,
    chat,
    create_key,
    http_json,
    keys_section,
    openai_client,
    run_cli,
    show_key,
    until,
)

pytestmark = pytest.mark.redis

# At PRICES, one chat of MESSAGES with max_tokens=5 reserves about 38 prompt
# + 5 output tokens ($0.048) and costs 2 prompt + 5 completion tokens ($0.012).
RESERVED_TOKENS = 43
ANSWER_TOKENS = 7
ANSWER_COST = 0.012


@pytest.fixture
def upstream(fake_upstream: ThreadedFakeUpstream) -> ThreadedFakeUpstream:
    fake_upstream.reset_stats()
    return fake_upstream


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def two_relays(
    redis_server: RedisServer, upstream: ThreadedFakeUpstream, tmp_path: Any, relay_pair: RelayPair
) -> Callable[..., tuple[RelayThread, RelayThread]]:
    def make(redis_timeout: float = 2.0) -> tuple[RelayThread, RelayThread]:
        return relay_pair(make_config(
            upstream.url,
            keys=keys_section(tmp_path, store="redis"),
            redis={"enabled": True, "address": redis_server.address, "timeout": redis_timeout},
            models=PRICES,
            circuit_breaker={"enabled": False},
            server={"shutdown_timeout": 2},
        ))

    return make


def _fire(relays: list[RelayThread], secret: str, count: int, **extra: Any) -> list[Any]:
    """``count`` chats at once, spread over ``relays``; each result or exception."""
    barrier = threading.Barrier(count)

    def one(index: int) -> Any:
        client = openai_client(relays[index % len(relays)], secret)
        barrier.wait(30)
        try:
            return chat(client, **extra)
        except openai.APIStatusError as exc:
            return exc

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def test_keys_budget_holds_across_two_instances_at_40_concurrent(two_relays):
    a, b = two_relays()
    key = create_key(a.port, budget_usd=0.1)
    results = _fire([a, b], key["secret"], 40)
    answered = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, Exception)]
    assert len(answered) >= 2 and refused
    assert all(r.status_code == 403 and r.code == "budget_exceeded" for r in refused)
    assert all(r.usage.completion_tokens <= 5 for r in answered)  # within max_tokens
    shown = until(lambda: (k := show_key(b.port, key["id"]))["requests"] == len(answered) and k)
    assert shown["spend_usd"] <= 0.1
    assert shown["spend_usd"] == pytest.approx(len(answered) * ANSWER_COST)
    assert shown["tokens"]["completion"] == sum(r.usage.completion_tokens for r in answered)


def test_keys_tpm_holds_across_two_instances_at_40_concurrent(two_relays):
    a, b = two_relays()
    key = create_key(a.port, tpm=100)
    started = time.monotonic()
    results = _fire([a, b], key["secret"], 40)
    elapsed = time.monotonic() - started
    answered = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, Exception)]
    assert answered and refused
    assert all(r.status_code == 429 and r.code == "rate_limit_exceeded" for r in refused)
    for r in refused:
        headers = r.response.headers
        assert headers["x-ratelimit-limit-tokens"] == "100"
        assert int(headers["x-ratelimit-remaining-tokens"]) < RESERVED_TOKENS
        assert int(headers["retry-after"]) >= 1
    shown = until(lambda: (k := show_key(b.port, key["id"]))["requests"] == len(answered) and k)
    used = shown["tokens"]["prompt"] + shown["tokens"]["completion"]
    assert used == len(answered) * ANSWER_TOKENS
    # Never more than the bucket held plus what it refilled meanwhile.
    assert used <= 100 + 100 / 60 * (elapsed + 1)


def test_keys_rpm_holds_across_two_instances_with_process_allowances(two_relays):
    a, b = two_relays()
    # rpm 100: each process reserves room for 5 requests at a time (1/20 of
    # the limit) and draws from it without asking Redis each time.
    key = create_key(a.port, rpm=100)
    started = time.monotonic()
    results = _fire([a, b], key["secret"], 40) + _fire([a, b], key["secret"], 40) + _fire(
        [a, b], key["secret"], 40)
    elapsed = time.monotonic() - started
    answered = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, Exception)]
    assert all(r.status_code == 429 for r in refused)
    assert refused and 100 - 2 * 5 <= len(answered) <= 100 + 100 / 60 * (elapsed + 1)
    shown = until(lambda: (k := show_key(b.port, key["id"]))["requests"] == len(answered) and k)
    assert shown["tokens"]["completion"] == 5 * len(answered)


def test_keys_rotation_and_revocation_reach_the_other_instance_within_1s(two_relays):
    a, b = two_relays()
    key = create_key(a.port)
    chat(openai_client(b, key["secret"]))  # b knows (and caches) the key
    status, rotated, _ = http_json(a.port, "POST", f"/relay/admin/keys/{key['id']}/rotate")
    assert status == 200
    changed = time.monotonic()
    with pytest.raises(openai.AuthenticationError):
        chat(openai_client(a, key["secret"]))  # at once where it was rotated
    _refused_by(b, key["secret"], changed)
    chat(openai_client(b, rotated["secret"]))

    assert http_json(a.port, "DELETE", f"/relay/admin/keys/{key['id']}")[0] == 200
    changed = time.monotonic()
    _refused_by(b, rotated["secret"], changed)
    # An edit reaches it as fast: a model restriction on a second key.
    other = create_key(a.port, name="other")
    chat(openai_client(b, other["secret"]), model="gpt-4o-mini")
    http_json(a.port, "PATCH", f"/relay/admin/keys/{other['id']}", {"models": ["claude-*"]})
    changed = time.monotonic()
    while True:
        try:
            chat(openai_client(b, other["secret"]), model="gpt-4o-mini")
        except openai.PermissionDeniedError:
            break
        assert time.monotonic() - changed < 1.5, "edit not applied on the other instance by 1.5 s"
        time.sleep(0.02)


def _refused_by(relay: RelayThread, secret: str, since: float) -> None:
    while True:
        try:
            chat(openai_client(relay, secret))
        except openai.AuthenticationError:
            break
        assert time.monotonic() - since < 1.5, "change not applied on the other instance by 1.5 s"
        time.sleep(0.02)
    assert time.monotonic() - since < 1.5


def test_keys_redis_outage_admits_from_cache_and_merges_spend_once(two_relays, redis_server):
    a, _ = two_relays(redis_timeout=0.5)
    key = create_key(a.port, budget_usd=10, rpm=1000)
    client = openai_client(a, key["secret"])
    chat(client)
    until(lambda: show_key(a.port, key["id"])["requests"] == 1)
    proc = redis_server._proc
    assert proc is not None
    os.kill(proc.pid, signal.SIGSTOP)  # Redis stops answering, keeps its data
    try:
        for _ in range(5):
            assert chat(client).usage is not None  # admitted from the process cache
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    # Merged back when Redis answers again: six requests, each counted once.
    def merged() -> bool:
        status, shown, _ = http_json(a.port, "GET", f"/relay/admin/keys/{key['id']}")
        # 503 store_unavailable until relay sees Redis again (its probe runs each second).
        return status == 200 and shown["requests"] >= 6

    until(merged, 15.0)
    time.sleep(1.0)  # any retry still in flight would show up now
    shown = show_key(a.port, key["id"])
    assert shown["requests"] == 6
    assert shown["spend_usd"] == pytest.approx(6 * ANSWER_COST)
    assert shown["tokens"] == {"prompt": 12, "completion": 30}
    # Nothing stays reserved: the rest of the budget fits one reservation.
    status, _, _ = http_json(a.port, "PATCH", f"/relay/admin/keys/{key['id']}",
                             {"budget_usd": 6 * ANSWER_COST + 0.05})
    assert status == 200
    until(lambda: show_key(a.port, key["id"])["budget_usd"] > 0.09)
    time.sleep(0.5)
    chat(client)


def test_keys_redis_outage_never_refuses_a_key_with_budget_left(two_relays, redis_server):
    """A small budget through a Redis outage: admitted from the process's own
    view (spend last seen + what it recorded since) while Redis is frozen and
    in the moment it answers again, refused only when a reservation does not
    fit what is left; afterwards the spend is the exact sum."""
    a, _ = two_relays(redis_timeout=0.5)
    # Each chat reserves $0.048 and costs $0.012: a budget of $0.1 admits a
    # request while at most $0.052 is spent.
    key = create_key(a.port, budget_usd=0.1)
    client = openai_client(a, key["secret"])
    chat(client)
    until(lambda: show_key(a.port, key["id"])["requests"] == 1)
    proc = redis_server._proc
    assert proc is not None
    os.kill(proc.pid, signal.SIGSTOP)  # Redis stops answering, keeps its data
    try:
        for _ in range(3):  # $0.012, $0.024, $0.036 spent before each
            assert chat(client).usage is not None
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    # At once, before this process merged back: $0.048 spent, one more fits
    # (whatever the reserves that timed out left held in Redis meanwhile).
    assert chat(client).usage is not None
    with pytest.raises(openai.PermissionDeniedError) as refused:
        chat(client)  # $0.06 spent: a reservation of $0.048 no longer fits
    assert refused.value.code == "budget_exceeded"

    def merged() -> bool:
        status, shown, _ = http_json(a.port, "GET", f"/relay/admin/keys/{key['id']}")
        return status == 200 and shown["requests"] >= 5

    until(merged, 15.0)
    time.sleep(1.0)  # any retry still in flight would show up now
    shown = show_key(a.port, key["id"])
    assert shown["requests"] == 5
    assert shown["spend_usd"] == pytest.approx(5 * ANSWER_COST)
    assert shown["tokens"] == {"prompt": 10, "completion": 25}
    # Nothing stays reserved in Redis: room for one reservation is enough.
    status, _, _ = http_json(a.port, "PATCH", f"/relay/admin/keys/{key['id']}",
                             {"budget_usd": 5 * ANSWER_COST + 0.05})
    assert status == 200
    until(lambda: show_key(a.port, key["id"])["budget_usd"] > 0.1)
    time.sleep(0.5)
    chat(client)
    shown = until(lambda: (k := show_key(a.port, key["id"]))["requests"] == 6 and k)
    assert shown["spend_usd"] == pytest.approx(6 * ANSWER_COST)


# --------------------------------------------------------------------------- processes


def _config_file(tmp_path: Any, upstream: ThreadedFakeUpstream, port: int, **keys: Any) -> str:
    path = str(tmp_path / "relay.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({
            "server": {"port": f"127.0.0.1:{port}", "shutdown_timeout": 2},
            "proxy": {"target": upstream.url},
            "cache": {"enabled": False}, "ratelimit": {"enabled": False},
            "circuit_breaker": {"enabled": False},
            "models": PRICES,
            "keys": keys_section(tmp_path, **keys),
        }, f)
    return path


class Relay:
    """A relay subprocess, addressed like a RelayThread by the helpers."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"


def test_keys_kill_9_loses_nothing_answered_a_second_before(upstream, tmp_path):
    port = free_port()
    path = _config_file(tmp_path, upstream, port)
    created = run_cli("create", "--name", "crash", "--budget-usd", "5", config=path)
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)
    proc = start_relay_process(["--config", path])
    try:
        wait_for_port(port, proc=proc)
        relay: Any = Relay(port)
        answered = [chat(openai_client(relay, key["secret"])) for _ in range(8)]
        time.sleep(1.0)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)
    shown = json.loads(run_cli("show", key["id"], config=path).stdout)
    assert shown["requests"] == len(answered)
    assert shown["spend_usd"] == pytest.approx(len(answered) * ANSWER_COST)


def test_keys_sqlite_store_shared_by_two_workers(upstream, tmp_path):
    port = free_port()
    path = _config_file(tmp_path, upstream, port)
    proc = start_relay_process(["--config", path, "--workers", "2"])
    try:
        wait_for_port(port, proc=proc)
        relay: Any = Relay(port)
        budget = create_key(port, name="budget", budget_usd=0.1)
        limited = create_key(port, name="limited", rpm=10)
        results = _fire([relay], budget["secret"], 40)
        answered = [r for r in results if not isinstance(r, Exception)]
        assert answered and all(
            r.status_code == 403 for r in results if isinstance(r, Exception)
        )
        started = time.monotonic()
        results = _fire([relay], limited["secret"], 40)
        elapsed = time.monotonic() - started
        ok = [r for r in results if not isinstance(r, Exception)]
        assert all(r.status_code == 429 for r in results if isinstance(r, Exception))
        assert 10 <= len(ok) <= 10 + int(10 / 60 * (elapsed + 1))
        shown = until(lambda: (k := show_key(port, budget["id"]))["requests"] == len(answered) and k)
        assert shown["spend_usd"] <= 0.1
        assert shown["spend_usd"] == pytest.approx(len(answered) * ANSWER_COST)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_keys_cli_on_the_redis_store_reaches_running_instances(two_relays, redis_server, tmp_path):
    a, b = two_relays()
    path = str(tmp_path / "redis-keys.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({"redis": {"enabled": True, "address": redis_server.address},
                        "keys": {"enabled": True, "store": "redis"}}, f)
    made = run_cli("create", "--name", "from-shell", "--rpm", "100", config=path)
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)
    for relay in (a, b):
        chat(openai_client(relay, key["secret"]))
    shown = until(lambda: (k := show_key(a.port, key["id"]))["requests"] == 2 and k)
    assert shown["name"] == "from-shell" and shown["rpm"] == 100
    assert run_cli("revoke", key["id"], config=path).returncode == 0
    revoked = time.monotonic()
    _refused_by(b, key["secret"], revoked)
