"""The admin API under ``/relay/admin/``: virtual keys over HTTP.

``Authorization: Bearer <keys.admin_key>`` on every call (else 401); with
no admin key configured every path under ``/relay/admin`` is 404, so a
relay without one does not even reveal that the API exists.

    POST   /relay/admin/keys              create (the answer holds the secret, once)
    GET    /relay/admin/keys              list
    GET    /relay/admin/keys/{id}         one key
    PATCH  /relay/admin/keys/{id}         change settings
    POST   /relay/admin/keys/{id}/rotate  new secret; the old one stops at once
    DELETE /relay/admin/keys/{id}         revoke
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from relay.http import errors
from relay.http.protocol import ClientConnection
from relay.http.request import Request

from . import ADMIN_PREFIX
from .manage import KeyManager, NotFound
from .model import KeyError_
from .store import StoreUnavailable

__all__ = ["ADMIN_PREFIX", "AdminAPI"]

_KEYS = "/relay/admin/keys"
_JSON_TYPE = b"Content-Type: application/json\r\n"
_NO_STORE = b"Cache-Control: no-store\r\n"


def _not_found(what: str = "Not found") -> errors.GatewayError:
    return errors.GatewayError(404, what, "invalid_request_error", "not_found")


def _bad(field: str, reason: str) -> errors.GatewayError:
    return errors.GatewayError(
        400, f"Invalid field {field!r}: {reason}", "invalid_request_error", "invalid_request"
    )


class AdminAPI:
    """Handles every request under ``/relay/admin`` for one config generation."""

    def __init__(self, admin_key: str, manager: KeyManager | None) -> None:
        self._expected = b"Bearer " + admin_key.encode() if admin_key else b""
        self._manager = manager

    async def handle(self, request: Request, client: ClientConnection) -> None:
        try:
            status, body = await self._answer(request)
        except errors.GatewayError as exc:
            client.send_error(exc, (_NO_STORE,))
            return
        client.respond(status, (_JSON_TYPE, _NO_STORE), json.dumps(body).encode())

    def _authorized(self, request: Request) -> bool:
        given = request.authorization or b""
        # Constant time: the comparison must not tell how much of a guess was right.
        return hmac.compare_digest(given.strip(), self._expected)

    async def _answer(self, request: Request) -> tuple[int, Any]:
        manager = self._manager
        if not self._expected or manager is None:
            raise _not_found()
        if not self._authorized(request):
            raise errors.GatewayError(
                401, "Admin API: send 'Authorization: Bearer <keys.admin_key>'",
                "invalid_request_error", "invalid_api_key",
            )
        path = request.path.decode("latin-1").rstrip("/")
        if path != _KEYS and not path.startswith(_KEYS + "/"):
            raise _not_found()
        parts = path[len(_KEYS):].strip("/").split("/") if path != _KEYS else []
        method = request.method
        try:
            if not parts:
                if method == b"GET":
                    return 200, await manager.list()
                if method == b"POST":
                    return 201, await manager.create(self._body(request))
                raise self._method(method, "GET, POST")
            key_id = parts[0]
            if len(parts) == 1:
                if method == b"GET":
                    return 200, await manager.show(key_id)
                if method == b"PATCH":
                    return 200, await manager.update(key_id, self._body(request))
                if method == b"DELETE":
                    return 200, await manager.revoke(key_id)
                raise self._method(method, "GET, PATCH, DELETE")
            if len(parts) == 2 and parts[1] == "rotate":
                if method == b"POST":
                    return 200, await manager.rotate(key_id)
                raise self._method(method, "POST")
        except KeyError_ as exc:
            raise _bad(exc.field, exc.reason) from None
        except NotFound:
            raise _not_found(f"No key with id {parts[0]!r}") from None
        except StoreUnavailable:
            raise errors.GatewayError(
                503, "The key store is unavailable; try again", "api_error", "store_unavailable",
                headers=((b"Retry-After", b"1"),),
            ) from None
        raise _not_found()

    @staticmethod
    def _method(method: bytes, allowed: str) -> errors.GatewayError:
        return errors.GatewayError(
            405, f"Method {method.decode('latin-1')} not allowed here (allowed: {allowed})",
            "invalid_request_error", "method_not_allowed",
            headers=((b"Allow", allowed.encode()),),
        )

    @staticmethod
    def _body(request: Request) -> Any:
        doc = request.json()
        if not isinstance(doc, dict):
            raise KeyError_("body", "must be a JSON object")
        return doc
