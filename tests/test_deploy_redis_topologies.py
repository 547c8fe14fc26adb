"""The Helm chart and the Compose file run relay against Sentinel or Cluster.

The chart passes redis.mode, redis.addresses and redis.master_name through
to relay's config (which relay itself validates) and refuses sentinel or
cluster mode with its bundled single Redis. deploy/compose/redis-topologies.yml
adds optional Compose profiles on top of docker-compose.yml that start a
Sentinel set or a Cluster; their commands are run here
against real redis-server processes (with hostnames swapped for local
ports), so a broken sentinel config or cluster bootstrap fails a test.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.redis_server import (
    ClusterSetup,
    RedisServer,
    command,
    find_redis_cli,
    find_redis_server,
    free_port,
    ping,
    wait_until,
)
from tests.test_deploy_files import (
    compose,
    find,
    relay_check_config,
    relay_config,
    render_chart,
    validate_k8s,
)

TOPOLOGIES = Path(__file__).resolve().parent.parent / "deploy" / "compose" / "redis-topologies.yml"
SENTINELS = ["redis-sentinel-0.redis-sentinel:26379", "redis-sentinel-1.redis-sentinel:26379",
             "redis-sentinel-2.redis-sentinel:26379"]  # fmt: skip
CLUSTER_SEEDS = ["redis-cluster-0.redis-cluster:6379", "redis-cluster-1.redis-cluster:6379"]


# ---------------------------------------------------------------------------
# Helm


@pytest.mark.parametrize(
    "redis",
    [
        {"mode": "sentinel", "addresses": SENTINELS, "master_name": "cache"},
        {"mode": "cluster", "addresses": CLUSTER_SEEDS},
    ],
    ids=["sentinel", "cluster"],
)
def test_helm_runs_relay_against_your_sentinel_or_cluster(redis: dict[str, Any], tmp_path: Path):
    rendered = render_chart({
        "redisServer": {"enabled": False},
        "redis": {"existingSecret": "team-redis"},
        "config": {"redis": redis},
    })  # fmt: skip
    for o in rendered:
        validate_k8s(o)
    config = relay_config(rendered)
    assert {k: config["redis"][k] for k in redis} == redis
    assert "address" not in config["redis"]  # the empty default is not passed on
    relay_check_config(config, tmp_path)
    components = {o["metadata"]["labels"].get("app.kubernetes.io/component") for o in rendered}
    assert "redis" not in components  # no bundled Redis, no generated Secret
    assert find(rendered, "Deployment")["metadata"]["name"] == "relay"


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        ({"config": {"redis": {"mode": "sentinel", "addresses": SENTINELS}}},
         "needs your own Redis Sentinel or Cluster"),
        ({"redisServer": {"enabled": False}, "config": {"redis": {"mode": "cluster"}}},
         "needs config.redis.addresses"),
    ],
    ids=["bundled-redis", "no-addresses"],
)  # fmt: skip
def test_helm_refuses_a_topology_it_cannot_serve(values: dict[str, Any], reason: str):
    with pytest.raises(BaseException, match=re.escape(reason)):
        render_chart(values)


# ---------------------------------------------------------------------------
# Compose


def topologies() -> dict[str, Any]:
    return dict(yaml.safe_load(TOPOLOGIES.read_text())["services"])


def test_compose_profiles_wire_sentinel_and_cluster():
    main = compose()["services"]
    env = main["relay"]["environment"]
    # standalone unless the operator says otherwise
    assert env["REDIS_MODE"] == "${REDIS_MODE:-standalone}"
    assert env["REDIS_ADDRESSES"] == "${REDIS_ADDRESSES:-}"
    assert env["REDIS_MASTER_NAME"] == "${REDIS_MASTER_NAME:-mymaster}"
    services = topologies()
    sentinel = ["redis-replica", "sentinel-1", "sentinel-2", "sentinel-3"]
    cluster = ["redis-node-1", "redis-node-2", "redis-node-3", "redis-cluster-init"]
    assert sorted(services) == sorted(sentinel + cluster)
    for name in sentinel:
        assert services[name]["profiles"] == ["sentinel"], name
    for name in cluster:
        assert services[name]["profiles"] == ["cluster"], name
    # the main file stays without them (a stack deploys every service it lists)
    assert not set(services) & set(main)
    assert services["redis-replica"]["command"][-3:] == ["--replicaof", "redis", "6379"]
    # the sentinels watch the main file's Redis under relay's default master name
    assert "sentinel monitor mymaster redis 6379 2" in _sentinel_script()
    assert "redis" in main
    text = TOPOLOGIES.read_text()
    # the commands the comments give name services that exist
    commands = re.findall(r"REDIS_ADDRESSES=(\S+)", text)
    assert len(commands) == 2
    for line in commands:
        for address in line.split(","):
            assert address.split(":")[0] in services, address


def _sentinel_script() -> str:
    return str(topologies()["sentinel-1"]["command"][2])


def test_compose_sentinel_command_starts_a_working_sentinel():
    """The sentinel service's own script, pointed at a local master."""
    binary = find_redis_server()
    with RedisServer() as master, tempfile.TemporaryDirectory() as workdir:
        port = free_port()
        script = (
            _sentinel_script()
            .replace("'port 26379'", f"'port {port}' 'bind 127.0.0.1'")
            .replace("mymaster redis 6379", f"mymaster 127.0.0.1 {master.port}")
            .replace("/tmp/sentinel.conf", os.path.join(workdir, "sentinel.conf"))
            .replace("exec redis-server", f"exec {binary}")
        )
        proc = subprocess.Popen(["sh", "-c", script], cwd=workdir, stdout=subprocess.DEVNULL,
                                stderr=subprocess.STDOUT)  # fmt: skip
        try:
            wait_until(lambda: ping(port), "sentinel answers", 10)
            host, master_port = command(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster")
            assert int(master_port) == master.port
            reply = command(port, "SENTINEL", "CONFIG", "GET", "resolve-hostnames")
            pairs = zip(reply[::2], reply[1::2], strict=True) if isinstance(reply, list) else ()
            settings = reply if isinstance(reply, dict) else dict(pairs)
            assert settings[b"resolve-hostnames"] == b"yes"
        finally:
            proc.kill()
            proc.wait(10)


def test_compose_cluster_init_creates_the_cluster_once():
    """The init service's script, on three local nodes: it creates the
    cluster, and run again (a restarted stack) it leaves it alone."""
    cli = find_redis_cli()
    setup = ClusterSetup()
    try:
        setup.start_nodes()
        script = str(topologies()["redis-cluster-init"]["command"][2])
        first = setup.nodes[0].port
        script = script.replace("redis-cli -h redis-node-1", f"{cli} -h 127.0.0.1 -p {first}")
        script = script.replace("redis-cli --cluster", f"{cli} --cluster")
        for i, node in enumerate(setup.nodes, start=1):
            script = script.replace(f"redis-node-{i}:6379", node.address)
        for _ in range(2):
            result = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
            wait_until(setup.ready, "cluster_state:ok on every node", 30)
    finally:
        setup.close()
