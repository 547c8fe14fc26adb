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
from types import TracebackType

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
