"""Responses that relay itself makes, in the OpenAI error shape.

SDKs (openai, anthropic, LangChain...) parse ``{"error": {...}}`` bodies into
typed exceptions, so every error relay produces uses that shape: a client
cannot tell a relay-made 429 from a provider-made one except by the message.
Status lines and bodies for the common cases are rendered once at import.
"""

from __future__ import annotations

import json
from http import HTTPStatus

__all__ = ["GatewayError", "error_body", "status_line"]


def status_line(status: int) -> bytes:
    """``HTTP/1.1 200 OK\\r\\n`` for *status*, cached for the known codes."""
    line = _STATUS_LINES.get(status)
    if line is None:
        line = b"HTTP/1.1 %d %s\r\n" % (status, _reason(status).encode("latin-1"))
    return line


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


_STATUS_LINES: dict[int, bytes] = {
    s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode("latin-1")) for s in HTTPStatus
}


def error_body(message: str, type_: str, code: str) -> bytes:
    """Serialize an OpenAI-shaped error object."""
    return json.dumps(
        {"error": {"message": message, "type": type_, "code": code}},
        separators=(",", ":"),
    ).encode()


class GatewayError(Exception):
    """An error relay answers itself, with a status and an OpenAI error body.

    ``close`` says whether the client connection must be closed after the
    response (framing errors: the rest of the stream cannot be trusted).
    """

    __slots__ = ("status", "message", "type", "code", "close", "headers")

    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        code: str,
        *,
        close: bool = False,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.close = close
        self.headers = headers

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code)


def bad_request(message: str) -> GatewayError:
    return GatewayError(400, message, "invalid_request_error", "bad_request", close=True)


def headers_too_large(limit: int) -> GatewayError:
    return GatewayError(
        431,
        f"Request header fields too large (limit {limit} bytes)",
        "invalid_request_error",
        "request_header_fields_too_large",
        close=True,
    )


def body_too_large(limit: int) -> GatewayError:
    return GatewayError(
        413,
        f"Request body too large (limit {limit} bytes)",
        "invalid_request_error",
        "request_too_large",
        close=True,
    )


def bad_gateway(message: str) -> GatewayError:
    return GatewayError(502, message, "upstream_error", "bad_gateway")


def gateway_timeout(message: str) -> GatewayError:
    return GatewayError(504, message, "upstream_error", "gateway_timeout")


def version_not_supported() -> GatewayError:
    return GatewayError(
        505,
        "HTTP version not supported: relay speaks HTTP/1.1 and HTTP/1.0",
        "invalid_request_error",
        "http_version_not_supported",
        close=True,
    )
