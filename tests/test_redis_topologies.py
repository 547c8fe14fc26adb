"""relay on the three Redis topologies: standalone, Sentinel and Cluster.

Real topologies from redis-server binaries on free 127.0.0.1 ports (never
6379): one master, one replica and three sentinels; a three-master cluster.
They are started once per session (a few seconds each) and shared by the
tests here; every test works on keys of its own and flushes what it reads.
Under CI a missing binary fails instead of skipping.

What is shown, on each topology, with two relay instances (one per loop):
cache hits, rate limits and usage totals are shared; a Sentinel failover
mid-traffic leaves every request answered promptly and shared state
working on the promoted master; a cluster slot migration (ASK, then MOVED)
leaves every request answered and the moved state used where it now lives,
nothing lost or counted twice.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import openai
import pytest
import yaml

from relay.config import load_config
from relay.redisconn import RedisConnection
from relay.testing import ThreadedFakeUpstream
from tests.conftest import RelayPair
from tests.redis_server import ClusterSetup, RedisServer, SentinelSetup, command, wait_until
from tests.support import RelayThread, make_config
from tests.test_features import CHAT, Reply, call, metric
from tests.test_keys import (
    PRICES,
    chat,
    create_key,
    http_json,
    keys_section,
    openai_client,
    show_key,
    until,
)
from tests.test_keys_shared import ANSWER_COST, _fire

pytestmark = pytest.mark.redis

TIMEOUT = 0.25  # redis.timeout of the relays under test
# redis.timeout of a test in which no Redis node goes away: an answer slowed
# by a busy machine must not be taken for an outage (the fallback would then
# change what the test checks exactly).
PATIENT_TIMEOUT = 5.0
# A request makes a handful of Redis calls (bucket, cache read, cache write),
# each cut off at TIMEOUT; this bound leaves room for a busy 2-core machine
# and still tells a fallback from a hang on a dead master.
REQUEST_BOUND = 2.5


# --------------------------------------------------------------------------- #
# topologies (the session fixtures standalone_server, sentinel_setup and
# cluster_setup live in conftest.py, shared with other modules)
# --------------------------------------------------------------------------- #
@dataclass
class Topology:
    """How relay is pointed at a topology, and how a test looks inside it."""

    name: str
    redis: dict[str, Any]
    masters: Callable[[], list[int]]  # ports of the nodes holding data now

    def keys(self, pattern: str) -> list[bytes]:
        found: list[bytes] = []
        for port in self.masters():
            found.extend(command(port, "KEYS", pattern))
        return found

    def flush(self) -> None:
        for port in self.masters():
            command(port, "FLUSHALL")

    def patient(self) -> Topology:
        """The same topology, reached with PATIENT_TIMEOUT."""
        return replace(self, redis={**self.redis, "timeout": PATIENT_TIMEOUT})


def standalone(server: RedisServer) -> Topology:
    section = {"enabled": True, "address": server.address, "timeout": TIMEOUT}
    return Topology("standalone", section, lambda: [server.port])


def sentinel(setup: SentinelSetup) -> Topology:
    section = {
        "enabled": True,
        "mode": "sentinel",
        "addresses": setup.addresses,
        "master_name": setup.master_name,
        "timeout": TIMEOUT,
    }
    return Topology("sentinel", section, lambda: [setup.master_port()])


def cluster(setup: ClusterSetup) -> Topology:
    # One seed is enough: the rest of the cluster is discovered from it.
    section = {"enabled": True, "mode": "cluster", "addresses": setup.addresses[:1],
               "timeout": TIMEOUT}  # fmt: skip
    return Topology("cluster", section, lambda: [n.port for n in setup.nodes])


@pytest.fixture(params=["standalone", "sentinel", "cluster"])
def topology(request: pytest.FixtureRequest) -> Topology:
    name = request.param
    if name == "standalone":
        return standalone(request.getfixturevalue("standalone_server"))
    if name == "sentinel":
        return sentinel(request.getfixturevalue("sentinel_setup"))
    return cluster(request.getfixturevalue("cluster_setup"))


# --------------------------------------------------------------------------- #
# relay instances
# --------------------------------------------------------------------------- #
@pytest.fixture
def upstream(fake_upstream: ThreadedFakeUpstream) -> ThreadedFakeUpstream:
    fake_upstream.reset_stats()
    return fake_upstream


@dataclass
class Pair:
    a: RelayThread
    b: RelayThread
    started: list[RelayThread] = field(default_factory=list)


@pytest.fixture
def make_pair(upstream: ThreadedFakeUpstream, relay_pair: RelayPair) -> Callable[..., Pair]:
    """``make(topology, **sections)``: two relays (uvloop and asyncio) on it,
    returned once both use Redis."""

    def make(topo: Topology, **sections: Any) -> Pair:
        sections.setdefault("circuit_breaker", {"enabled": False})
        sections.setdefault("server", {"shutdown_timeout": 1})
        sections["redis"] = topo.redis
        relays = relay_pair(make_config(upstream.url, **sections))
        for relay in relays:
            wait_until(lambda r=relay: usage(r)["backend"] == "redis", "relay uses Redis", 15)
        return Pair(*relays)

    return make


def get_json(relay: RelayThread, path: str) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        assert resp.status == 200
        return json.loads(resp.read())
    finally:
        conn.close()


def usage(relay: RelayThread) -> dict[str, Any]:
    snapshot: dict[str, Any] = get_json(relay, "/relay/usage")
    return snapshot


def prompt(text: str) -> dict[str, Any]:
    return {**CHAT, "messages": [{"role": "user", "content": text}]}


def fresh_key() -> dict[str, str]:
    return {"Authorization": f"Bearer sk-{uuid.uuid4().hex}"}


def timed(relay: RelayThread, body: Any, headers: dict[str, str]) -> tuple[Reply, float]:
    started = time.monotonic()
    reply = call(relay, body, headers=headers)
    return reply, time.monotonic() - started


def redis_errors(pair: Pair) -> float:
    return metric(pair.a, "relay_redis_errors_total") + metric(pair.b, "relay_redis_errors_total")


# --------------------------------------------------------------------------- #
# shared state on each topology
# --------------------------------------------------------------------------- #
def test_two_instances_share_cache_limits_and_usage_on_each_topology(
    topology, make_pair, upstream
):
    topology.flush()
    pair = make_pair(
        topology.patient(),
        cache={"enabled": True, "ttl": 60},
        ratelimit={"enabled": True, "requests_per_second": 0.01, "burst": 4},
    )
    a, b = pair.a, pair.b
    errors = redis_errors(pair)

    # cache: filled by one instance, hit on the other
    cached = fresh_key()
    first = call(a, prompt("shared entry"), headers=cached)
    assert (first.status, first.cache) == (200, "MISS")
    wait_until(lambda: len(topology.keys("relay:cache:*")) == 1, "entry in Redis", 5)
    hit = call(b, prompt("shared entry"), headers=cached)
    assert (hit.cache, hit.body) == ("HIT", first.body)

    # rate limit: one bucket for both instances
    limited = fresh_key()
    replies = [call(r, prompt(f"limit {i}"), headers=limited) for i, r in enumerate([a, b] * 3)]
    assert [r.status for r in replies] == [200] * 4 + [429] * 2
    assert [r.header("x-ratelimit-remaining") for r in replies[:4]] == ["3", "2", "1", "0"]
    assert len(topology.keys("relay:rl:*")) == 2  # the two callers' buckets

    # usage totals: five answers came from upstream, one from the cache
    assert len(upstream.requests) == 5

    def totals_agree() -> bool:
        views = [usage(r) for r in (a, b)]
        return all(
            v["backend"] == "redis"
            and v["totals"]["requests"] == 5
            and v["totals"]["cache_hits"] == 1
            for v in views
        ) and views[0]["totals"] == views[1]["totals"]

    wait_until(totals_agree, "both instances report the shared totals", 10)
    assert topology.keys("relay:{usage}:*")
    assert redis_errors(pair) == errors  # nothing fell back on the way


# --------------------------------------------------------------------------- #
# Sentinel failover
# --------------------------------------------------------------------------- #
def test_sentinel_failover_mid_traffic_answers_every_request(
    sentinel_setup, make_pair, upstream, caplog
):
    caplog.set_level(logging.INFO, logger="relay.redis")
    setup = sentinel_setup
    topo = sentinel(setup)
    topo.flush()
    pair = make_pair(
        topo,
        cache={"enabled": True, "ttl": 60},
        # Slow refill, large burst: nobody is refused, and the remaining
        # count shows whether both instances draw from one bucket.
        ratelimit={"enabled": True, "requests_per_second": 0.01, "burst": 5000},
    )
    a, b = pair.a, pair.b
    traffic = fresh_key()
    for i in range(4):
        assert call((a, b)[i % 2], prompt(f"before {i}"), headers=traffic).status == 200
    wait_until(lambda: usage(a)["totals"]["requests"] == 4, "usage recorded", 10)
    setup.wait_replicated()  # what was acknowledged before the kill is on the replica
    old_master = setup.current_master()

    promoted: list[RedisServer] = []
    killer = threading.Thread(target=lambda: promoted.append(setup.fail_over()), daemon=True)
    slowest = 0.0
    answered = 0
    try:
        killer.start()
        # A bounded loop: every request gets a normal answer in bounded time
        # while the master is dead, unelected, and then replaced; it runs on
        # for a few requests after the promotion.
        after_promotion = 0
        for i in range(5000):
            reply, seconds = timed((a, b)[i % 2], prompt(f"during {i}"), traffic)
            assert reply.status == 200, reply.body
            slowest = max(slowest, seconds)
            answered += 1
            if not killer.is_alive():
                after_promotion += 1
                if after_promotion >= 20:
                    break
        killer.join(60)
        assert promoted, "the failover did not complete"
        assert slowest < REQUEST_BOUND, slowest
        assert redis_errors(pair) >= 1  # the dead master was noticed and counted

        # Shared state resumes on the promoted replica: a cache entry written
        # by one instance is a hit on the other, one bucket again for both.
        new_master = promoted[0]

        def shared_again() -> bool:
            key = fresh_key()
            text = f"after {uuid.uuid4().hex}"
            if call(a, prompt(text), headers=key).cache != "MISS":
                return False
            time.sleep(0.1)  # the entry is written just after the response
            return call(b, prompt(text), headers=key).cache == "HIT"

        wait_until(shared_again, "cache shared on the new master", 20)
        assert command(new_master.port, "KEYS", "relay:cache:*")
        limited = fresh_key()
        remaining = [
            call(relay, prompt(f"limit {i}"), headers=limited).header("x-ratelimit-remaining")
            for i, relay in enumerate((a, b) * 3)
        ]
        assert remaining == [str(4999 - i) for i in range(6)]
        assert command(new_master.port, "KEYS", "relay:rl:*")

        # Usage totals: what each instance could not send while the master
        # was gone is sent to the new one, once; nothing is counted twice.
        # The one loss Redis allows: a batch the old master acknowledged in
        # the instant before the kill, before replicating it (asynchronous
        # replication); traffic here is one request at a time, so that is
        # at most the one-record batch each instance had just sent.
        served = len(upstream.requests)

        def totals_settled() -> bool:
            views = [usage(r) for r in (a, b)]
            requests = views[0]["totals"]["requests"]
            return (
                [v["backend"] for v in views] == ["redis", "redis"]
                and views[0]["totals"] == views[1]["totals"]
                and served - 2 <= requests <= served
            )

        wait_until(totals_settled, "usage totals complete on the new master", 20)
        back = [r.getMessage() for r in caplog.records if "is back" in r.getMessage()]
        assert any(f"master at 127.0.0.1:{new_master.port}" in m for m in back), back
    finally:
        killer.join(60)
        setup.restore_old_master(old_master)
    assert answered >= 20


# --------------------------------------------------------------------------- #
# Cluster slot migration
# --------------------------------------------------------------------------- #
def test_cluster_slot_migration_is_survived_and_state_moves_with_it(
    cluster_setup, make_pair, upstream
):
    """The slots holding a bucket, a cache entry and the usage totals move to
    other nodes while both instances keep sending: first half-moved (the
    keys go over with MIGRATE; the source answers ASK for keys it no longer
    has), then owned by the target (MOVED). Every request is answered in
    bounded time; a call for a migrating slot that redis-py cannot complete
    falls back to memory (a redirect loop for that call only, a timeout
    marks Redis down until the probe finds it again); once the slots are
    moved the bucket, the entry and the totals are used where they now
    live, with nothing lost, restarted or counted twice."""
    setup = cluster_setup
    topo = cluster(setup)
    topo.flush()
    pair = make_pair(
        topo,
        cache={"enabled": True, "ttl": 60},
        ratelimit={"enabled": True, "requests_per_second": 0.01, "burst": 1000},
    )
    a, b = pair.a, pair.b
    key = fresh_key()
    first = call(a, prompt("entry that moves"), headers=key)
    assert (first.cache, first.header("x-ratelimit-remaining")) == ("MISS", "999")
    wait_until(lambda: topo.keys("relay:cache:*"), "entry in Redis", 5)
    [entry] = topo.keys("relay:cache:*")
    # Both instances have written usage once, so every key of the {usage}
    # slot exists before it starts moving.
    assert call(b, prompt("warm up b"), headers=key).header("x-ratelimit-remaining") == "998"
    wait_until(lambda: usage(b)["totals"]["requests"] == 2, "usage recorded", 10)
    [bucket] = topo.keys("relay:rl:*")
    slots = {setup.slot_of(k) for k in (bucket, entry, b"relay:{usage}:totals")}
    moves = {}
    for slot in slots:
        owner = setup.owner(slot)
        moves[slot] = (owner, setup.nodes[(setup.nodes.index(owner) + 1) % len(setup.nodes)])
    served = 2
    hits = 0

    def traffic(phase: str) -> list[int]:
        """Six misses and a hit; the X-RateLimit-Remaining of each."""
        nonlocal served, hits
        remaining = []
        for i in range(6):
            reply, seconds = timed((a, b)[i % 2], prompt(f"{phase} {i}"), key)
            assert (reply.status, reply.cache) == (200, "MISS")
            assert seconds < REQUEST_BOUND
            remaining.append(int(reply.header("x-ratelimit-remaining") or -1))
            served += 1
        hit = call(b, prompt("entry that moves"), headers=key)
        assert hit.status == 200
        remaining.append(int(hit.header("x-ratelimit-remaining") or -1))
        if hit.cache == "HIT":
            hits += 1
        else:  # this instance could not reach the entry: it asked upstream
            served += 1
        return remaining

    # Marked migrating, keys still on the source: it serves them.
    for slot, (_source, target) in moves.items():
        setup.begin_move(slot, target)
    importing = traffic("importing")
    assert importing == list(range(997, 990, -1))
    # Keys on the target, slot still the source's: ASK redirects.
    for slot, (source, target) in moves.items():
        assert setup.migrate_keys(slot, source, target) >= 1
    traffic("migrated")
    # The target owns the slots: MOVED, then the new slot table.
    for slot, (_source, target) in moves.items():
        setup.finish_move(slot, target)
    for slot, (_source, target) in moves.items():
        assert setup.owner(slot) is target
    for k in (bucket, entry):
        assert command(moves[setup.slot_of(k)][1].port, "EXISTS", k) == 1
    # A call cut off mid-migration (redirects, TRYAGAIN waits) may have
    # marked Redis down on an instance: its probe finds the cluster again.
    for relay in (a, b):
        wait_until(lambda r=relay: usage(r)["backend"] == "redis", "relay back on Redis", 15)
    after = traffic("moved")
    # One bucket again for both instances, and the one that moved: it goes
    # on from where Redis had it, never back to a full bucket.
    assert after == list(range(after[0], after[0] - 7, -1))
    assert after[0] < importing[-1]
    assert hits >= 2  # the entry was found before the move and where it moved to

    def totals_complete() -> bool:
        views = [usage(r) for r in (a, b)]
        return (
            [v["backend"] for v in views] == ["redis", "redis"]
            and views[0]["totals"] == views[1]["totals"]
            and (views[0]["totals"]["requests"], views[0]["totals"]["cache_hits"]) == (served, hits)
        )

    wait_until(totals_complete, "usage totals complete on both instances", 15)
    assert len(upstream.requests) == served


# --------------------------------------------------------------------------- #
# bursts
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("name", ["sentinel", "cluster"])
def test_a_burst_beyond_the_pool_queues_instead_of_failing(name, request, run):
    """More calls at once than sockets: they wait (within the deadline) for
    one, as on the standalone blocking pool; none fails, none falls back."""
    topo = (sentinel if name == "sentinel" else cluster)(request.getfixturevalue(f"{name}_setup"))
    section = topo.redis
    errors = []

    async def main() -> list[bytes | None]:
        conn = RedisConnection(
            "localhost:1", timeout=5.0, on_error=lambda: errors.append(1), mode=name,
            addresses=section["addresses"], master_name=section.get("master_name", "mymaster"),
            max_connections=2,
        )  # fmt: skip
        try:
            assert await conn.check()
            keys = [f"relay:burst:{name}:{i}".encode() for i in range(40)]
            await asyncio.gather(*(conn.execute(conn.client.set, k, k, px=60000) for k in keys))
            return await asyncio.gather(*(conn.execute(conn.client.get, k) for k in keys))
        finally:
            await conn.close()

    values = run(main())
    assert values == [f"relay:burst:{name}:{i}".encode() for i in range(40)]
    assert errors == []


# --------------------------------------------------------------------------- #
# hot reload between topologies
# --------------------------------------------------------------------------- #
def test_an_edit_moves_relay_from_standalone_to_cluster_without_a_restart(
    standalone_server, cluster_setup, upstream, tmp_path
):
    """redis.mode and redis.addresses are hot-reloadable like every redis.*
    key: the running process opens the cluster connection and its buckets
    and cache entries go there from then on."""
    alone = standalone(standalone_server)
    clustered = cluster(cluster_setup)
    alone.flush()
    clustered.flush()
    path = str(tmp_path / "relay.yaml")
    data: dict[str, Any] = {
        "server": {"port": "127.0.0.1:0", "shutdown_timeout": 1},
        "proxy": {"target": upstream.url},
        "cache": {"enabled": True, "ttl": 60},
        "ratelimit": {"enabled": True, "requests_per_second": 0.01, "burst": 100},
        "circuit_breaker": {"enabled": False},
        "redis": alone.redis,
    }
    with open(path, "w") as f:
        yaml.safe_dump(data, f)
    relay = RelayThread(load_config(path, env={}))
    relay.start()
    try:
        assert call(relay, prompt("before the edit"), headers=fresh_key()).status == 200
        wait_until(lambda: alone.keys("relay:rl:*"), "bucket in the standalone Redis", 5)
        with open(path + ".new", "w") as f:
            yaml.safe_dump({**data, "redis": clustered.redis}, f)
        os.replace(path + ".new", path)

        def on_cluster() -> bool:
            reply = call(relay, prompt(f"after {uuid.uuid4().hex}"), headers=fresh_key())
            assert reply.status == 200
            return bool(clustered.keys("relay:rl:*"))

        wait_until(on_cluster, "buckets written to the cluster", 10)
        assert metric(relay, "relay_config_reload_errors_total") == 0
        before = len(alone.keys("relay:rl:*"))
        assert call(relay, prompt("on the cluster"), headers=fresh_key()).status == 200
        assert len(alone.keys("relay:rl:*")) == before  # the old Redis is left alone
    finally:
        relay.stop()


# --------------------------------------------------------------------------- #
# virtual keys: budgets on each topology and across a failover
# --------------------------------------------------------------------------- #
BUDGET = 0.1
RESERVE_COST = 0.048  # what one chat reserves at PRICES (it costs ANSWER_COST)


def test_key_budget_holds_across_two_instances_on_each_topology(topology, make_pair, tmp_path):
    topology.flush()
    pair = make_pair(topology.patient(), keys=keys_section(tmp_path, store="redis"),
                     models=PRICES)
    a, b = pair.a, pair.b
    key = create_key(a.port, budget_usd=BUDGET)
    results = _fire([a, b], key["secret"], 20)
    answered = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, Exception)]
    assert len(answered) >= 2 and refused
    assert all(r.status_code == 403 and r.code == "budget_exceeded" for r in refused)
    shown = until(lambda: (k := show_key(b.port, key["id"]))["requests"] == len(answered) and k)
    assert shown["spend_usd"] <= BUDGET
    assert shown["spend_usd"] == pytest.approx(len(answered) * ANSWER_COST)
    # Every record of the key shares its id's hash tag: one slot on a cluster.
    records = topology.keys(f"relay:{{{key['id']}}}:*")
    assert records
    if topology.name == "cluster":
        slots = {int(command(p, "CLUSTER", "KEYSLOT", r)) for r in records for p in topology.masters()[:1]}
        assert len(slots) == 1


def test_key_budget_holds_across_a_sentinel_failover(sentinel_setup, make_pair, tmp_path):
    """Requests against one budget from two instances while the master is
    killed and a replica promoted: each is answered or refused in bounded
    time, and never refused while the budget has room for its reservation;
    afterwards the key admits exactly what its budget has left. While Redis
    cannot answer each instance enforces the budget on its own view, so each
    one's spend stays within the budget (together they may exceed it)."""
    setup = sentinel_setup
    topo = sentinel(setup)
    topo.flush()
    pair = make_pair(topo, keys=keys_section(tmp_path, store="redis"), models=PRICES)
    a, b = pair.a, pair.b
    key = create_key(a.port, budget_usd=BUDGET)
    clients = [openai_client(r, key["secret"]) for r in (a, b)]
    answered = 0
    by_instance = [1, 1]  # answers of a and of b
    for client in clients:
        chat(client)
        answered += 1
    until(lambda: show_key(b.port, key["id"])["requests"] == answered)
    setup.wait_replicated()
    old_master = setup.current_master()
    promoted: list[RedisServer] = []
    killer = threading.Thread(target=lambda: promoted.append(setup.fail_over()), daemon=True)
    outcomes: list[Any] = []
    slowest = 0.0
    # 403s while the budget, by every answer so far, still had room for one
    # reservation ($0.048): the outage must never cause one.
    refused_with_room: list[int] = []

    def attempt(index: int) -> Any:
        nonlocal answered, slowest
        started = time.monotonic()
        room = BUDGET - answered * ANSWER_COST >= RESERVE_COST - 1e-9
        try:
            chat(clients[index % 2])
            answered += 1
            by_instance[index % 2] += 1
            outcome: Any = "ok"
        except openai.APIStatusError as exc:
            outcome = exc.status_code
            if outcome == 403 and room:
                refused_with_room.append(index)
        slowest = max(slowest, time.monotonic() - started)
        outcomes.append(outcome)
        return outcome

    try:
        killer.start()
        # While the master is dead and until it is replaced: every request
        # answered or refused (the store's rules while it cannot be asked).
        for i in range(3000):
            attempt(i)
            if not killer.is_alive():
                break
            time.sleep(0.01)
        killer.join(60)
        assert promoted, "the failover did not complete"
        for relay in (a, b):
            until(lambda r=relay: http_json(r.port, "GET", "/relay/usage")[1]["backend"] == "redis",
                  20)  # fmt: skip
        # On the new master: admitted until the budget is spent, then refused.
        for i in range(60):
            if attempt(i) == 403:
                break
            time.sleep(0.05)
        assert outcomes[-1] == 403
        assert set(outcomes) <= {"ok", 403, 503}, outcomes
        assert refused_with_room == [], (refused_with_room, outcomes)
        assert slowest < 5.0, slowest

        def settled() -> dict[str, Any] | None:
            # 503 store_unavailable until this instance sees Redis again.
            status, shown, _ = http_json(a.port, "GET", f"/relay/admin/keys/{key['id']}")
            return shown if status == 200 and shown["requests"] >= answered - 1 else None

        shown = until(settled, 20)
        # Each recorded answer counted once. At most the one answer settled
        # on the old master in the instant before the kill can be missing
        # (asynchronous replication). Each instance kept its own spend within
        # the budget; both together may exceed it (they could not share what
        # they spent while Redis was away), never beyond one budget each.
        for count in by_instance:
            assert count * ANSWER_COST <= BUDGET + 1e-9, by_instance
        assert shown["spend_usd"] <= 2 * BUDGET + 1e-9
        assert shown["spend_usd"] == pytest.approx(shown["requests"] * ANSWER_COST)
        assert answered - 1 <= shown["requests"] <= answered
        # The whole budget was usable: the answers a budget of 0.1 allows one
        # at a time (each reserves $0.048 and costs $0.012), failover or not.
        assert shown["requests"] >= 5
    finally:
        killer.join(60)
        setup.restore_old_master(old_master)
