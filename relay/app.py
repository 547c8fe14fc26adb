"""One relay process: server, pipeline, hot reload and graceful stop, wired together.

:class:`Gateway` is what a worker process runs. It owns the
:class:`~relay.runtime.Runtime` (long-lived state), the current
:class:`~relay.pipeline.Pipeline` (swapped whole on reload) and the
:class:`~relay.http.server.RelayServer` (sockets and connections).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Coroutine
from typing import Any

from . import _fast, debug
from .config import Config, ConfigError, keep_restart_values
from .configwatch import ConfigWatcher
from .http.protocol import ClientConnection, ConnectionLimits
from .http.request import Request
from .http.server import RelayServer, bind_socket
from .ops.metrics import Metrics
from .pipeline import Pipeline
from .runtime import Runtime

__all__ = ["Gateway", "run_worker"]

log = logging.getLogger("relay")


def _limits(config: Config) -> ConnectionLimits:
    s = config.server
    return ConnectionLimits(s.max_body_bytes, s.max_header_bytes, s.header_timeout, s.idle_timeout)


class Gateway:
    """Everything one relay process serves with."""

    @debug.opens("gateways")
    def __init__(
        self,
        config: Config,
        loop: asyncio.AbstractEventLoop,
        *,
        metrics: Metrics | None = None,
        worker_index: int = 0,
        file_config: Config | None = None,
    ) -> None:
        self.config = config
        # What the file said before command-line overrides (--port,
        # --workers): edits are compared with it, so an untouched file does
        # not look like a change of the overridden keys.
        self._file_config = file_config if file_config is not None else config
        self.loop = loop
        self.worker_index = worker_index
        self.runtime = Runtime(
            loop, metrics or Metrics(), count_reload_errors=worker_index == 0
        )
        self.pipeline = self.runtime.apply(config, lambda: Pipeline(config, self.runtime))
        self.server = RelayServer(self.dispatch, _limits(config), loop)
        self._watcher: ConfigWatcher | None = None
        self._stopping: asyncio.Future[None] = loop.create_future()

    def dispatch(
        self, request: Request, client: ClientConnection
    ) -> Coroutine[Any, Any, None] | None:
        # The pipeline is read per request, so a reload applies to the next one.
        return self.pipeline.answer(request, client)

    async def start(self, sock: socket.socket) -> None:
        await self.runtime.settled()
        await self.server.start(sock)
        if self.config.source is not None:
            self._watcher = ConfigWatcher(
                self.config.source, self._file_config, self._reloaded, self._reload_failed
            )
            self._watcher.start()

    # ------------------------------------------------------------------ #
    # hot reload
    # ------------------------------------------------------------------ #
    def _reloaded(self, new: Config, restart_needed: list[str]) -> None:
        for key in restart_needed:
            log.warning("config: %s changed; it takes effect after a restart", key)
        config = keep_restart_values(self.config, new)
        try:
            limits = _limits(config)
            pipeline = self.runtime.apply(config, lambda: Pipeline(config, self.runtime))
        except Exception as exc:  # a config that validates but cannot be built
            # Runtime.apply undid everything of it. Every worker sees the
            # same edit fail; one of them counts it.
            log.error("config: reload of %s failed, keeping the running config: %s", new.source, exc)
            if self.runtime.count_reload_errors:
                self.runtime.metrics.config_reload_errors.inc()
            return
        self.config = config
        self.pipeline = pipeline
        self.server.set_limits(limits)
        log.info("config: reloaded %s", new.source)

    def _reload_failed(self, error: ConfigError) -> None:
        for problem in error.problems:
            log.error("config: edit refused, keeping the running config: %s", problem)
        if self.runtime.count_reload_errors:
            self.runtime.metrics.config_reload_errors.inc()

    # ------------------------------------------------------------------ #
    # stop
    # ------------------------------------------------------------------ #
    def request_stop(self) -> None:
        if not self._stopping.done():
            self._stopping.set_result(None)

    async def wait_stopped(self) -> None:
        await self._stopping

    @debug.closes("gateways")
    async def stop(self) -> bool:
        """Drain in-flight requests for up to ``server.shutdown_timeout``."""
        self.runtime.draining = True
        if self._watcher is not None:
            self._watcher.stop()
        clean = await self.server.drain(self.config.server.shutdown_timeout)
        await self.runtime.close()
        return clean


def describe(config: Config, address: tuple[str, int], gateway: Gateway) -> str:
    """The start-up line: address, targets, backends, extensions."""
    host, port = address
    shown = f"[{host}]" if ":" in host else host
    targets = [config.proxy.target, *(t.url for r in config.routes for t in r.targets)]
    unique = list(dict.fromkeys(targets))
    backend = "redis" if config.redis.enabled else "memory"
    # Which kind of Redis (never its password) when it is not one server.
    topology = f"redis={config.redis.mode} " if backend == "redis" and config.redis.mode != "standalone" else ""
    return (
        f"relay listening on http://{shown}:{port} pid={os.getpid()} "
        f"target{'s' if len(unique) > 1 else ''}={','.join(unique)} "
        f"cache={backend if config.cache.enabled else 'off'} "
        f"ratelimit={backend if config.ratelimit.enabled else 'off'} "
        f"{topology}extensions={_fast.IMPLEMENTATION}"
    )


async def serve(
    config: Config,
    sock: socket.socket,
    *,
    worker_index: int = 0,
    install_signals: bool = True,
    file_config: Config | None = None,
) -> int:
    """Serve on *sock* until SIGTERM/SIGINT, then drain; returns the exit code."""
    loop = asyncio.get_running_loop()
    gateway = Gateway(config, loop, worker_index=worker_index, file_config=file_config)
    await gateway.start(sock)
    log.info(describe(config, gateway.server.address, gateway))
    if install_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, gateway.request_stop)
    await gateway.wait_stopped()
    log.info("relay stopping: draining in-flight requests (up to %ss)", config.server.shutdown_timeout)
    clean = await gateway.stop()
    if not clean:
        log.warning("relay stopped with requests still in flight after the shutdown timeout")
    if debug.ENABLED:
        await debug.log_at_stop(log)
    return 0


def run_worker(
    config: Config,
    *,
    reuse_port: bool,
    worker_index: int = 0,
    file_config: Config | None = None,
) -> int:
    """Bind, run the event loop (uvloop) and serve until stopped."""
    import uvloop

    sock = bind_socket(config.server.host, config.server.port, reuse_port=reuse_port)
    _tune_gc()
    return uvloop.run(
        serve(config, sock, worker_index=worker_index, file_config=file_config)
    )


def _tune_gc() -> None:
    """Fewer, cheaper garbage collections on the request path.

    Profiles under load showed the cyclic collector at ~4% of the CPU: with
    the default gen-0 threshold of 700 it runs every few requests and walks
    the long-lived objects (modules, config, pools) each time. Those are
    frozen out of its view after start-up, and per-request objects (which
    rarely form cycles) are collected less often.
    """
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)
