"""A throwaway redis-server for tests.

Starts the real ``redis-server`` binary on a free 127.0.0.1 port in a temp
directory, without persistence, and waits (bounded) until it answers PING.
``stop()`` / ``kill()`` / ``restart()`` keep the same port so a client that
was pointed at it can reconnect, which is what the outage tests need.

When the binary is missing the test is skipped, except under CI (env ``CI``
set), where a missing Redis must fail loudly instead of silently skipping
the Redis half of the suite.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import pytest

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


def find_redis_server() -> str:
    """Path of the redis-server binary; skip (or fail under CI) if absent."""
    path = os.environ.get("REDIS_SERVER_BIN") or shutil.which("redis-server")
    if path is None:
        for candidate in ("/usr/bin/redis-server", "/usr/local/bin/redis-server"):
            if os.access(candidate, os.X_OK):
                path = candidate
                break
    if path is None:
        if os.environ.get("CI"):
            raise RuntimeError("redis-server binary not found and CI is set")
        pytest.skip("redis-server binary not found")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ping(port: int, timeout: float = 0.5) -> bool:
    """True if redis-server answers on the port (+PONG, or NOAUTH when a
    password is set: either way it is up and serving)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


class RedisServer:
    """One redis-server process; a context manager that starts and stops it."""

    def __init__(
        self,
        port: int | None = None,
        binary: str | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.binary = binary or find_redis_server()
        self.port = port or free_port()
        self.extra_args = extra_args
        self.config_file: str | None = None  # a config file read first (sentinels)
        self._dir = tempfile.TemporaryDirectory(prefix="relay-redis-")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        if self.running:
            return
        # The child keeps its own copy of the log fd; ours can close at once.
        with open(os.path.join(self._dir.name, "redis.log"), "ab") as log:
            self._proc = subprocess.Popen(
                [
                    self.binary,
                    *([self.config_file] if self.config_file else []),
                    "--port", str(self.port),
                    "--bind", "127.0.0.1",
                    "--save", "",
                    "--appendonly", "no",
                    "--dir", self._dir.name,
                    *self.extra_args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._dir.name,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"redis-server exited at start: {self._log_tail()}")
            if ping(self.port):
                return
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"redis-server did not answer PING in {START_TIMEOUT}s")

    def stop(self) -> None:
        """Graceful stop (SIGTERM), SIGKILL if it lingers."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """Abrupt death, as in a crash: open connections see a reset/EOF."""
        self._end(signal.SIGKILL)

    def restart(self) -> None:
        """Stop and start again on the same port (data is not kept)."""
        self.stop()
        self.start()

    def close(self) -> None:
        self.kill()
        self._dir.cleanup()

    def _end(self, sig: signal.Signals) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)

    def _log_tail(self) -> str:
        try:
            with open(os.path.join(self._dir.name, "redis.log"), "rb") as f:
                return f.read()[-2000:].decode(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --------------------------------------------------------------------------- #
# topologies: Sentinel (master, replica, three sentinels) and Cluster
# --------------------------------------------------------------------------- #
TOPOLOGY_TIMEOUT = 30.0


def find_redis_cli() -> str:
    """Path of redis-cli (it creates clusters); skip (or fail under CI) if absent."""
    path = os.environ.get("REDIS_CLI_BIN") or shutil.which("redis-cli")
    if path is None and os.access("/usr/bin/redis-cli", os.X_OK):
        path = "/usr/bin/redis-cli"
    if path is None:
        if os.environ.get("CI"):
            raise RuntimeError("redis-cli binary not found and CI is set")
        pytest.skip("redis-cli binary not found")
    return path


def command(port: int, *args: str | int, timeout: float = 2.0) -> Any:
    """One command to 127.0.0.1:port on a fresh connection (no pooling, so a
    test's own calls never reuse a socket a topology change has broken)."""
    import redis

    client = redis.Redis(port=port, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        return client.execute_command(*args)
    finally:
        client.close()


def wait_until(check: Callable[[], Any], what: str, timeout: float = TOPOLOGY_TIMEOUT) -> Any:
    """Poll ``check`` (errors count as not yet) until it returns something true."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
        except Exception as exc:  # a node restarting, a sentinel still electing
            last = exc
        else:
            if value:
                return value
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout} s (last error: {last!r})")


# A master starts syncing a new replica at once (by default it waits 5 s
# for more replicas to sync them together): start-up and every rejoin.
_SYNC_AT_ONCE = ("--repl-diskless-sync-delay", "0")


class SentinelSetup:
    """A master, one replica and three sentinels monitoring them as ``mymaster``.

    Sentinels mark the master down after ``down_after_ms`` and fail over to
    the replica (quorum 2). ``fail_over()`` kills the master and waits for the
    promotion; the old master is restarted empty as a replica of the new one.
    """

    def __init__(
        self, master_name: str = "mymaster", down_after_ms: int = 1000, failover_timeout_ms: int = 2000
    ) -> None:
        # Sentinels start no new failover of a master within twice the
        # failover timeout of the last one: short, so that a test's failover
        # right after another's starts once the master is seen down.
        self.master_name = master_name
        self.binary = find_redis_server()
        self.master = RedisServer(binary=self.binary)
        self.replica = RedisServer(binary=self.binary)
        self.sentinels: list[RedisServer] = []
        self._down_after_ms = down_after_ms
        self._failover_timeout_ms = failover_timeout_ms

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self.sentinels]

    def master_port(self) -> int:
        """The master's port as the sentinels see it now."""
        host, port = command(self.sentinels[0].port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME",
                             self.master_name)  # fmt: skip
        return int(port)

    def current_master(self) -> RedisServer:
        port = self.master_port()
        return self.master if self.master.port == port else self.replica

    def start(self) -> None:
        self.master.extra_args = _SYNC_AT_ONCE
        self.master.start()
        self.replica.extra_args = (*_SYNC_AT_ONCE, "--replicaof", "127.0.0.1", str(self.master.port))
        self.replica.start()
        for _ in range(3):
            sentinel = RedisServer(binary=self.binary)
            conf = os.path.join(sentinel._dir.name, "sentinel.conf")
            with open(conf, "w") as f:
                f.write(
                    f"sentinel monitor {self.master_name} 127.0.0.1 {self.master.port} 2\n"
                    f"sentinel down-after-milliseconds {self.master_name} {self._down_after_ms}\n"
                    f"sentinel failover-timeout {self.master_name} {self._failover_timeout_ms}\n"
                    f"sentinel parallel-syncs {self.master_name} 1\n"
                )
            sentinel.config_file = conf
            sentinel.extra_args = ("--sentinel",)
            sentinel.start()
            self.sentinels.append(sentinel)
        wait_until(self.ready, "sentinels know the replica and each other")

    def ready(self) -> bool:
        """Every sentinel sees the master up, the replica linked and two peers."""
        if self.master_port() not in (self.master.port, self.replica.port):
            return False
        for sentinel in self.sentinels:
            state = _pairs(command(sentinel.port, "SENTINEL", "MASTER", self.master_name))
            if "s_down" in state["flags"] or int(state["num-other-sentinels"]) < 2:
                return False
            replicas = command(sentinel.port, "SENTINEL", "REPLICAS", self.master_name)
            if not any("s_down" not in _pairs(r)["flags"] for r in replicas):
                return False
        link = _info(command(self.current_replica().port, "INFO", "replication"))
        return link.get("master_link_status") == "up"

    def current_replica(self) -> RedisServer:
        return self.replica if self.current_master() is self.master else self.master

    def wait_replicated(self) -> None:
        """Until the replica has every write the master acknowledged."""
        master = self.current_master()
        assert int(command(master.port, "WAIT", 1, 5000)) >= 1, "replica did not catch up"

    def fail_over(self) -> RedisServer:
        """Kill the master; return the replica once every sentinel names it master."""
        old, new = self.current_master(), self.current_replica()
        old.kill()
        wait_until(
            lambda: all(
                int(command(s.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)[1])
                == new.port
                for s in self.sentinels
            ),
            "sentinels promoted the replica",
        )
        wait_until(lambda: _info(command(new.port, "INFO", "replication"))["role"] == "master",
                   "promoted replica acts as master")  # fmt: skip
        return new

    def restore_old_master(self, old: RedisServer) -> None:
        """Start the killed master again, as a replica of the promoted one.

        Started as a master, it would wait for the sentinels to demote it:
        they look at a returning instance's role only every 10 s and leave
        it a few seconds more, about 15 s in all. As a replica from the
        start it is what they expect at once."""
        old.extra_args = (*_SYNC_AT_ONCE, "--replicaof", "127.0.0.1", str(self.master_port()))
        old.start()
        wait_until(self.ready, "old master rejoined as a replica")

    def close(self) -> None:
        for server in (*self.sentinels, self.master, self.replica):
            server.close()

    def __enter__(self) -> SentinelSetup:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ClusterSetup:
    """Three masters (no replicas) holding all 16384 slots, made by redis-cli.

    Each node gets its own directory, nodes file and bus port. ``move_slot``
    migrates one slot (with its keys) to another node the way
    ``redis-cli --cluster reshard`` does, step by step, so a test can send
    traffic while the slot is half moved (clients get ASK redirects then).
    """

    def __init__(self, size: int = 3) -> None:
        self.binary = find_redis_server()
        self.cli = find_redis_cli()
        self.nodes: list[RedisServer] = []
        for _ in range(size):
            node = RedisServer(binary=self.binary)
            node.extra_args = (
                "--cluster-enabled", "yes",
                "--cluster-config-file", f"nodes-{node.port}.conf",
                "--cluster-port", str(free_port()),
                "--cluster-node-timeout", "5000",
            )  # fmt: skip
            self.nodes.append(node)

    @property
    def addresses(self) -> list[str]:
        return [n.address for n in self.nodes]

    def start(self) -> None:
        self.start_nodes()
        self.create()

    def start_nodes(self) -> None:
        """The nodes alone, not yet joined (each one knows only itself)."""
        for node in self.nodes:
            node.start()

    def create(self) -> None:
        result = subprocess.run(
            [self.cli, "--cluster", "create", *self.addresses, "--cluster-replicas", "0",
             "--cluster-yes"],
            capture_output=True, timeout=60, text=True,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {result.stdout[-2000:]}")
        wait_until(self.ready, "cluster_state:ok on every node")

    def ready(self) -> bool:
        for node in self.nodes:
            info = _info(command(node.port, "CLUSTER", "INFO"))
            if info.get("cluster_state") != "ok" or int(info["cluster_known_nodes"]) != len(
                self.nodes
            ):
                return False
        return True

    def node_id(self, node: RedisServer) -> str:
        return _text(command(node.port, "CLUSTER", "MYID"))

    def slot_of(self, key: bytes | str) -> int:
        return int(command(self.nodes[0].port, "CLUSTER", "KEYSLOT", key))

    def owner(self, slot: int) -> RedisServer:
        for start, end, primary, *_ in command(self.nodes[0].port, "CLUSTER", "SLOTS"):
            if int(start) <= slot <= int(end):
                return next(n for n in self.nodes if n.port == int(primary[1]))
        raise AssertionError(f"slot {slot} has no owner")

    def begin_move(self, slot: int, target: RedisServer) -> RedisServer:
        """Mark ``slot`` migrating to ``target`` (keys stay put): ASK redirects from now."""
        source = self.owner(slot)
        assert source is not target
        command(target.port, "CLUSTER", "SETSLOT", slot, "IMPORTING", self.node_id(source))
        command(source.port, "CLUSTER", "SETSLOT", slot, "MIGRATING", self.node_id(target))
        return source

    def migrate_keys(self, slot: int, source: RedisServer, target: RedisServer) -> int:
        """MIGRATE every key of ``slot`` from source to target; how many moved."""
        moved = 0
        while True:
            keys = command(source.port, "CLUSTER", "GETKEYSINSLOT", slot, 100)
            if not keys:
                return moved
            command(source.port, "MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
            moved += len(keys)

    def finish_move(self, slot: int, target: RedisServer) -> None:
        """Give ``slot`` to ``target`` on every node (clients get MOVED from now)."""
        target_id = self.node_id(target)
        for node in (target, *[n for n in self.nodes if n is not target]):
            command(node.port, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
        wait_until(lambda: all(self._owner_seen_by(n, slot) == target.port for n in self.nodes),
                   "every node agrees on the slot's new owner")  # fmt: skip

    def move_slot(self, slot: int, target: RedisServer) -> int:
        source = self.begin_move(slot, target)
        moved = self.migrate_keys(slot, source, target)
        self.finish_move(slot, target)
        return moved

    def _owner_seen_by(self, node: RedisServer, slot: int) -> int:
        for start, end, primary, *_ in command(node.port, "CLUSTER", "SLOTS"):
            if int(start) <= slot <= int(end):
                return int(primary[1])
        return 0

    def close(self) -> None:
        for node in self.nodes:
            node.close()

    def __enter__(self) -> ClusterSetup:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pairs(flat: Any) -> dict[str, str]:
    """A flat [k1, v1, k2, v2, ...] reply (or an already parsed dict) as str -> str."""
    if isinstance(flat, dict):
        return {_text(k): _text(v) for k, v in flat.items()}
    items = [_text(x) for x in flat]
    return dict(zip(items[::2], items[1::2], strict=True))


def _info(reply: Any) -> dict[str, str]:
    """INFO / CLUSTER INFO text (or redis-py's parsed dict) as str -> str."""
    if isinstance(reply, dict):
        return {_text(k): _text(v) for k, v in reply.items()}
    pairs = (line.split(":", 1) for line in _text(reply).splitlines() if ":" in line)
    return {k.strip(): v.strip() for k, v in pairs}
