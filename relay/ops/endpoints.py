"""relay's own endpoints: ``/healthz``, ``/readyz``, ``/metrics``, ``/relay/usage``,
the status page ``/relay/`` and its live figures ``/relay/status``, and
``/relay/debug`` in debug mode only (see relay/debug.py).

They are answered by relay itself, never proxied, and not counted as
proxied requests (a Prometheus scrape must not inflate the traffic it
measures). The pipeline builds them with what they read: its targets, the
metrics, the usage totals, whether the process is draining.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from .. import debug
from ..features.breaker import open_targets
from ..http.protocol import ClientConnection
from ..http.request import Request
from ..upstream.target import Upstream
from .metrics import Metrics
from .page import status_page
from .status import status_snapshot

__all__ = ["Endpoint", "not_ready_reason", "own_endpoints"]

Endpoint = Callable[[Request, ClientConnection], Awaitable[None]]

_JSON_TYPE = b"Content-Type: application/json\r\n"


def not_ready_reason(
    draining: bool, targets: Sequence[Upstream], breakers: bool, now: float
) -> str | None:
    """Why ``/readyz`` says "not ready", or None when relay can serve."""
    if draining:
        return "shutting down"
    # An open breaker whose recovery time has passed admits a probe, so
    # relay can serve again: report ready then, or a load balancer that
    # stops sending traffic would keep it open (and unready) for ever.
    if breakers and targets and len(open_targets(targets, now)) == len(targets):
        return "circuit breaker open for every upstream"
    return None


def own_endpoints(
    *,
    targets: Sequence[Upstream],
    breakers: bool,
    draining: Callable[[], bool],
    metrics: Metrics,
    metrics_enabled: bool,
    usage_snapshot: Callable[[], Awaitable[dict[str, Any]]],
    loop: asyncio.AbstractEventLoop,
) -> dict[bytes, Endpoint]:
    """The endpoint handlers by exact path, bound to one pipeline generation.

    *targets*: every target of the generation, once each; *breakers*:
    whether circuit breakers are on; *draining*: whether the process is
    stopping (asked per call).
    """

    async def healthz(request: Request, client: ClientConnection) -> None:
        client.respond(200, (_JSON_TYPE,), b'{"status":"ok"}')

    async def readyz(request: Request, client: ClientConnection) -> None:
        now = time.monotonic()
        reason = not_ready_reason(draining(), targets, breakers, now)
        # Which targets are open (their breakers): a load balancer only needs
        # the status, an operator the names.
        opened = open_targets(targets, now) if breakers else []
        if reason is None:
            body = json.dumps({"status": "ready", "open_targets": opened}).encode()
            client.respond(200, (_JSON_TYPE,), body)
        else:
            body = json.dumps(
                {"status": "not ready", "reason": reason, "open_targets": opened}
            ).encode()
            client.respond(503, (_JSON_TYPE,), body)

    async def prometheus(request: Request, client: ClientConnection) -> None:
        # Multi-worker rendering reads every worker's files: keep it off the loop.
        body, content_type = await loop.run_in_executor(None, metrics.render)
        client.respond(200, (b"Content-Type: %s\r\n" % content_type.encode(),), body)

    async def usage(request: Request, client: ClientConnection) -> None:
        snapshot = await usage_snapshot()
        client.respond(200, (_JSON_TYPE,), json.dumps(snapshot, sort_keys=True).encode())

    async def page(request: Request, client: ClientConnection) -> None:
        shown = status_page()
        client.respond(200, shown.headers, shown.body)

    async def to_page(request: Request, client: ClientConnection) -> None:
        client.respond(308, (b"Location: /relay/\r\n",), b"")

    async def status(request: Request, client: ClientConnection) -> None:
        # Reads every worker's metric files: off the loop, like /metrics.
        snapshot = await loop.run_in_executor(
            None,
            functools.partial(status_snapshot, metrics, metrics_enabled=metrics_enabled),
        )
        client.respond(200, (_JSON_TYPE,), json.dumps(snapshot).encode())

    endpoints: dict[bytes, Endpoint] = {
        b"/relay": to_page,
        b"/relay/": page,
        b"/relay/status": status,
        b"/healthz": healthz,
        b"/readyz": readyz,
        b"/metrics": prometheus,
        b"/relay/usage": usage,
    }
    if debug.ENABLED:
        # Only in debug mode: otherwise the path is proxied like any other.
        endpoints[b"/relay/debug"] = debug_counters
    return endpoints


async def debug_counters(request: Request, client: ClientConnection) -> None:
    """This process's debug counts (this request and its connection included)."""
    body = json.dumps(debug.report(), sort_keys=True).encode()
    client.respond(200, (_JSON_TYPE,), body)
