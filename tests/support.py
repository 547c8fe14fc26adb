"""Shared test helpers: relay running in a thread, configs, raw sockets."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from types import ModuleType
from typing import Any, TypeVar

import pytest
import yaml

import relay._fast as fast
from relay.app import Gateway
from relay.config import Config, load_config
from relay.http.server import bind_socket

T = TypeVar("T")

# Set where the build must have produced the compiled twins (CI after building).
EXPECT_COMPILED = os.environ.get("RELAY_EXPECT_EXTENSIONS") == "1"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_config(data: dict[str, Any], directory: str | None = None) -> str:
    """Write *data* as a YAML config file; returns its path."""
    fd, path = tempfile.mkstemp(suffix=".yaml", dir=directory, prefix="relay-test-")
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(data, f)
    return path


def make_config(target: str, **sections: Any) -> Config:
    """A config proxying to *target*, with section overrides as dicts.

    Defaults differ from production only where tests need it: no rate limit
    and no cache unless asked for, so tests of one feature see only that one.
    """
    data: dict[str, Any] = {
        "server": {"port": "127.0.0.1:0"},
        "proxy": {"target": target},
        "cache": {"enabled": False},
        "ratelimit": {"enabled": False},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            data.setdefault(name, {}).update(values)
        else:
            data[name] = values
    path = write_config(data)
    try:
        # No source: the file is gone after this, so nothing is watched.
        return dataclasses.replace(load_config(path, env={}), source=None)
    finally:
        os.unlink(path)


class RelayThread:
    """A relay :class:`Gateway` serving on 127.0.0.1 from its own thread and loop."""

    def __init__(self, config: Config, *, loop: str = "uvloop") -> None:
        self.config = config
        self.loop_kind = loop
        self.loop: asyncio.AbstractEventLoop | None = None
        self.gateway: Gateway | None = None
        self.port = 0
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="relay-test", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> RelayThread:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("relay did not start within 10 s")
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        if self.loop_kind == "uvloop":
            import uvloop

            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        else:
            loop = asyncio.new_event_loop()
        self.loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # surfaced to the test thread
            self._error = exc
            self._ready.set()
        finally:
            loop.close()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        sock = bind_socket("127.0.0.1", 0, reuse_port=False)
        self.port = sock.getsockname()[1]
        self.gateway = Gateway(self.config, loop)
        try:
            await self.gateway.start(sock)
        except BaseException:
            await self.gateway.stop()  # what the gateway opened is closed again
            sock.close()
            raise
        self._ready.set()
        await self.gateway.wait_stopped()
        await self.gateway.stop()

    def call(self, fn: Callable[[], T], timeout: float = 5.0) -> T:
        """Run *fn* on relay's loop (to read its state safely) and return its result."""
        assert self.loop is not None
        result: list[Any] = []
        done = threading.Event()

        def run() -> None:
            try:
                result.append(fn())
            except BaseException as exc:
                result.append(exc)
            done.set()

        self.loop.call_soon_threadsafe(run)
        if not done.wait(timeout):
            raise TimeoutError("relay loop did not answer")
        value = result[0]
        if isinstance(value, BaseException):
            raise value
        return value

    def stop(self, timeout: float = 15.0) -> None:
        if self.loop is not None and self.gateway is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.gateway.request_stop)
        self._thread.join(timeout)


class StderrLines:
    """Collects a relay subprocess's stderr lines in a thread (so the pipe never fills)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.lines.append(raw.decode(errors="replace"))

    def count(self, text: str) -> int:
        return sum(text in line for line in list(self.lines))

    def wait_for(self, text: str, count: int = 1, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.count(text) < count:
            assert time.monotonic() < deadline, "".join(self.lines)
            assert self.proc.poll() is None, "".join(self.lines)
            time.sleep(0.02)

    def close(self, timeout: float = 30.0) -> str:
        """Wait for the process to exit (killing it after *timeout*); all of stderr."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)
        self._thread.join(timeout)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return "".join(self.lines)


def compiled_or_skip() -> fast.Implementation:
    """The compiled twins; without them the test is skipped, or fails where
    RELAY_EXPECT_EXTENSIONS=1 says they must be there."""
    if fast.compiled is None:
        reason = f"compiled relay._fast not loaded: {fast.COMPILED_IMPORT_ERROR}"
        if EXPECT_COMPILED:
            pytest.fail(f"RELAY_EXPECT_EXTENSIONS=1 but {reason}")
        pytest.skip(reason)
    return fast.compiled


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raw_exchange(port: int, data: bytes, *, timeout: float = 5.0, until_close: bool = True) -> bytes:
    """Send *data* on a fresh socket and read until the server closes (or timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if not until_close:
                break
        return b"".join(chunks)


def start_relay_process(
    args: list[str], env: dict[str, str] | None = None, **kwargs: Any
) -> subprocess.Popen[bytes]:
    """``python -m relay ARGS`` as a subprocess from the repository root."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.Popen(
        [sys.executable, "-m", "relay", *args],
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kwargs,
    )


def wait_for_port(port: int, timeout: float = 10.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise RuntimeError(f"relay exited with {proc.returncode}: {err.decode(errors='replace')}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


def run_on(factory: Callable[[], asyncio.AbstractEventLoop], coro: Coroutine[Any, Any, T]) -> T:
    """Run *coro* on a new loop made by *factory*, bounded to 30 s."""

    async def bounded() -> T:
        async with asyncio.timeout(30):
            return await coro

    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(bounded())


@contextlib.contextmanager
def relay_workers(sections: dict[str, Any], metrics_dir: str, *, workers: int = 2) -> Iterator[int]:
    """``python -m relay`` with *workers* worker processes on a free port,
    configured with *sections* (config sections as dicts); yields the port
    once every worker listens. Stopped with SIGTERM after; it must exit 0."""
    port = free_port()
    server = {"shutdown_timeout": 2, **sections.get("server", {})}
    server.update(port=f"127.0.0.1:{port}", workers=workers)
    path = write_config({**sections, "server": server})
    proc = start_relay_process(["--config", path], env={"PROMETHEUS_MULTIPROC_DIR": metrics_dir})
    log = StderrLines(proc)
    try:
        wait_for_port(port, proc=proc)
        log.wait_for("listening on", count=workers)
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        log.close()
        os.unlink(path)
    assert proc.returncode == 0, "".join(log.lines)


@contextlib.contextmanager
def unanswered_port() -> Iterator[int]:
    """A port whose SYNs go unanswered: a backlog-0 listener with a full queue."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", port))
            fillers.append(s)
        probe = socket.socket()
        probe.settimeout(0.2)
        try:
            probe.connect(("127.0.0.1", port))
            pytest.skip("this kernel completes handshakes beyond a full accept queue")
        except TimeoutError:
            pass
        finally:
            probe.close()
        yield port
    finally:
        for s in fillers:
            s.close()
        listener.close()


def compiled_twin_or_skip(name: str) -> ModuleType:
    """The compiled twin *name* kept outside relay._fast (e.g.
    ``relay.http._client_c``), skipped or failed as :func:`compiled_or_skip`."""
    reason = None
    if fast.NO_EXTENSIONS:
        reason = "disabled by RELAY_NO_EXTENSIONS"
    else:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            reason = f"{name} not built: {exc}"
        else:
            if fast._is_extension(module):
                return module
            reason = f"{name} is not a compiled extension"
    if EXPECT_COMPILED:
        pytest.fail(f"RELAY_EXPECT_EXTENSIONS=1 but {reason}")
    pytest.skip(reason)
