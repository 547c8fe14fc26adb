"""relay's own endpoints: ``/healthz``, ``/readyz``, ``/metrics``, ``/relay/usage``,
the status page ``/relay/`` and its live figures ``/relay/status``, and
``/relay/debug`` in debug mode only (see relay/debug.py).

They are answered by relay itself, never proxied, and not counted as
proxied requests (a Prometheus scrape must not inflate the traffic it
measures).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from .. import debug
from ..http.protocol import ClientConnection
from ..http.request import Request
from .page import status_page
from .status import status_snapshot

if TYPE_CHECKING:
    from ..pipeline import Pipeline

__all__ = ["Endpoint", "own_endpoints"]

Endpoint = Callable[[Request, ClientConnection], Coroutine[Any, Any, None]]

_JSON_TYPE = b"Content-Type: application/json\r\n"


def own_endpoints(pipeline: Pipeline) -> dict[bytes, Endpoint]:
    """The endpoint handlers by exact path, bound to one pipeline generation."""
    runtime = pipeline.runtime

    async def healthz(request: Request, client: ClientConnection) -> None:
        client.respond(200, (_JSON_TYPE,), b'{"status":"ok"}')

    async def readyz(request: Request, client: ClientConnection) -> None:
        reason = runtime.not_ready_reason(pipeline)
        # Which targets are open (their breakers): a load balancer only needs
        # the status, an operator the names.
        open_targets = runtime.open_targets(pipeline)
        if reason is None:
            body = json.dumps({"status": "ready", "open_targets": open_targets}).encode()
            client.respond(200, (_JSON_TYPE,), body)
        else:
            body = json.dumps(
                {"status": "not ready", "reason": reason, "open_targets": open_targets}
            ).encode()
            client.respond(503, (_JSON_TYPE,), body)

    async def metrics(request: Request, client: ClientConnection) -> None:
        body, content_type = await runtime.render_metrics()
        client.respond(200, (b"Content-Type: %s\r\n" % content_type.encode(),), body)

    async def usage(request: Request, client: ClientConnection) -> None:
        snapshot = await runtime.usage_snapshot()
        client.respond(200, (_JSON_TYPE,), json.dumps(snapshot, sort_keys=True).encode())

    async def page(request: Request, client: ClientConnection) -> None:
        shown = status_page()
        client.respond(200, shown.headers, shown.body)

    async def to_page(request: Request, client: ClientConnection) -> None:
        client.respond(308, (b"Location: /relay/\r\n",), b"")

    metrics_enabled = pipeline.config.metrics.enabled

    async def status(request: Request, client: ClientConnection) -> None:
        # Reads every worker's metric files: off the loop, like /metrics.
        snapshot = await runtime.loop.run_in_executor(
            None,
            functools.partial(status_snapshot, runtime.metrics, metrics_enabled=metrics_enabled),
        )
        client.respond(200, (_JSON_TYPE,), json.dumps(snapshot).encode())

    endpoints: dict[bytes, Endpoint] = {
        b"/relay": to_page,
        b"/relay/": page,
        b"/relay/status": status,
        b"/healthz": healthz,
        b"/readyz": readyz,
        b"/metrics": metrics,
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
