"""RedisConnection: deadlines, the up/down state, logging once, recovery."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import redis

from relay.redisconn import RedisConnection, RedisUnavailable, parse_address
from tests.support import unanswered_port

# Generous: these check outcomes, and a busy machine can be slow to answer.
CALL_TIMEOUT = 5.0

try:
    from redis_server import RedisServer
except ImportError:  # tests/ collected as a package
    from tests.redis_server import RedisServer

Runner = Callable[[Coroutine[Any, Any, Any]], Any]


class Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, level: int | None = None) -> list[str]:
        return [r.getMessage() for r in self.records if level is None or r.levelno == level]


@pytest.fixture
def recorder(request: pytest.FixtureRequest) -> tuple[logging.Logger, Recorder]:
    logger = logging.getLogger(f"test.redisconn.{request.node.name}")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    handler = Recorder()
    logger.addHandler(handler)
    yield logger, handler
    logger.removeHandler(handler)


class Counter:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> None:
        self.n += 1


async def wait_until(predicate: Callable[[], bool], limit: float = 10.0) -> None:
    """Poll a condition with a bounded number of short sleeps."""
    for _ in range(int(limit / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached in time")


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("localhost:6379", ("localhost", 6379)),
        ("10.0.0.5:7000", ("10.0.0.5", 7000)),
        (":6380", ("localhost", 6380)),
        ("redis.internal", ("redis.internal", 6379)),
        ("[::1]:6390", ("::1", 6390)),
        ("[::1]", ("::1", 6379)),
    ],
)
def test_parse_address(address: str, expected: tuple[str, int]) -> None:
    assert parse_address(address) == expected


@pytest.mark.parametrize("address", ["host:port", "host:0", "host:70000", "[::1"])
def test_parse_address_rejects(address: str) -> None:
    with pytest.raises(ValueError):
        parse_address(address)


@pytest.mark.redis
def test_execute_roundtrip(run: Runner) -> None:
    with RedisServer() as server:
        errors = Counter()

        async def main() -> None:
            conn = RedisConnection(server.address, timeout=CALL_TIMEOUT, on_error=errors)
            try:
                assert conn.up
                assert await conn.check()
                await conn.execute(conn.client.set, b"k", b"v", px=10000)
                assert await conn.execute(conn.client.get, b"k") == b"v"
            finally:
                await conn.close()
            assert not conn.up
            with pytest.raises(RedisUnavailable):
                await conn.execute(conn.client.get, b"k")

        run(main())
        assert errors.n == 0


@pytest.mark.redis
def test_outage_falls_back_logs_once_and_recovers(
    run: Runner, recorder: tuple[logging.Logger, Recorder]
) -> None:
    logger, records = recorder
    with RedisServer() as server:
        errors = Counter()

        async def main() -> None:
            conn = RedisConnection(
                server.address, timeout=CALL_TIMEOUT, on_error=errors, logger=logger, probe_interval=0.1
            )
            try:
                await conn.execute(conn.client.set, b"before", b"1")
                server.kill()
                # The first calls after the crash fail (and count); concurrent ones too.
                results = await asyncio.gather(
                    *(conn.execute(conn.client.get, b"before") for _ in range(5)),
                    return_exceptions=True,
                )
                assert all(isinstance(r, RedisUnavailable) for r in results)
                assert not conn.up
                assert errors.n >= 1
                # While down, calls are refused at once and never touch the network.
                for _ in range(100):
                    with pytest.raises(RedisUnavailable):
                        await conn.execute(conn.client.get, b"before")
                # Failed probes keep counting while the outage lasts.
                seen = errors.n
                await wait_until(lambda: errors.n >= seen + 2)
                assert not conn.up
                assert len(records.messages(logging.WARNING)) == 1

                server.start()  # same port
                await wait_until(lambda: conn.up)
                await conn.execute(conn.client.set, b"after", b"2")
                assert await conn.execute(conn.client.get, b"after") == b"2"
            finally:
                await conn.close()

        run(main())
        warnings = records.messages(logging.WARNING)
        infos = records.messages(logging.INFO)
        assert len(warnings) == 1 and "unavailable" in warnings[0]
        assert len(infos) == 1 and "is back" in infos[0]
        # what the test wrote after recovery really is in Redis
        assert redis.Redis(port=server.port).get("after") == b"2"


@pytest.mark.redis
def test_slow_call_counts_as_error(run: Runner) -> None:
    with RedisServer() as server:
        errors = Counter()
        admin = redis.Redis(port=server.port)

        async def main() -> None:
            conn = RedisConnection(server.address, timeout=0.1, on_error=errors, probe_interval=0.05)
            try:
                assert await conn.check()
                admin.execute_command("CLIENT", "PAUSE", "600", "ALL")
                with pytest.raises(RedisUnavailable):
                    await conn.execute(conn.client.get, b"k")
                assert not conn.up and errors.n == 1
                # Once the pause is over, the probe brings it back.
                await wait_until(lambda: conn.up)
                assert await conn.execute(conn.client.get, b"k") is None
            finally:
                await conn.close()

        run(main())


@pytest.mark.redis
def test_reply_error_falls_back_without_marking_down(run: Runner) -> None:
    with RedisServer() as server:
        errors = Counter()

        async def main() -> None:
            conn = RedisConnection(server.address, timeout=CALL_TIMEOUT, on_error=errors)
            try:
                await conn.execute(conn.client.set, b"text", b"abc")
                with pytest.raises(RedisUnavailable):
                    await conn.execute(conn.client.incr, b"text")
                assert conn.up
                assert errors.n == 1
            finally:
                await conn.close()

        run(main())


@pytest.mark.redis
def test_wrong_password_is_never_logged(
    run: Runner, recorder: tuple[logging.Logger, Recorder]
) -> None:
    logger, records = recorder
    secret = "s3cr3t-do-not-log"
    with RedisServer(extra_args=("--requirepass", "right-one")) as server:
        errors = Counter()

        async def main() -> None:
            conn = RedisConnection(
                server.address, password=secret, timeout=CALL_TIMEOUT, on_error=errors, logger=logger
            )
            try:
                assert not await conn.check()
                assert not conn.up
            finally:
                await conn.close()
            good = RedisConnection(server.address, password="right-one", timeout=0.5)
            try:
                assert await good.check()
            finally:
                await good.close()

        run(main())
        assert errors.n >= 1
        assert records.records, "the outage must be logged"
        for record in records.records:
            assert secret not in record.getMessage()


@pytest.mark.redis
def test_close_stops_the_probe(run: Runner) -> None:
    with RedisServer() as server:
        server.kill()

        async def main() -> None:
            conn = RedisConnection(server.address, timeout=0.2, probe_interval=0.05)
            assert not await conn.check()
            probes = [t for t in asyncio.all_tasks() if t.get_name() == "relay-redis-probe"]
            assert len(probes) == 1
            await conn.close()
            assert probes[0].done()

        run(main())


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown redis mode"):
        RedisConnection("localhost:6379", mode="replicated")


@pytest.mark.parametrize("mode", ["sentinel", "cluster"])
def test_unanswered_topology_costs_a_call_at_most_the_timeout(
    run: Runner, recorder: tuple[logging.Logger, Recorder], mode: str
) -> None:
    """Sentinels (or cluster seeds) whose SYNs go unanswered: the call gives
    up at the deadline, the connection is marked down, and the log line
    names the topology without any password."""
    logger, records = recorder
    with unanswered_port() as port:
        errors = Counter()

        async def main() -> float:
            conn = RedisConnection(
                "localhost:1", password="pw-never-logged", timeout=0.2, on_error=errors,
                logger=logger, mode=mode, addresses=[f"127.0.0.1:{port}"], master_name="cache",
            )  # fmt: skip
            try:
                started = time.monotonic()
                with pytest.raises(RedisUnavailable):
                    await conn.execute(conn.client.get, b"k")
                elapsed = time.monotonic() - started
                assert not conn.up
                with pytest.raises(RedisUnavailable):  # at once while down
                    await conn.execute(conn.client.get, b"k")
                return elapsed
            finally:
                await conn.close()

        elapsed = run(main())
    assert elapsed < 1.5
    assert errors.n >= 1
    [warning] = records.messages(logging.WARNING)
    expected = "sentinel master 'cache'" if mode == "sentinel" else "cluster (seeds"
    assert expected in warning and f"127.0.0.1:{port}" in warning
    assert "pw-never-logged" not in warning
