"""The parsed client request, as the pipeline sees it: the pure twin.

``relay.http.request`` is the module the rest of relay imports; it takes
this source or ``_request_c`` (the same source compiled with
``_request_c.pxd``: a ``cdef class`` whose fields are struct members).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from relay._fast import NOT_AN_OBJECT, VARYING_NAMES, RequestFacts, request_facts, request_facts_of

__all__ = ["VARYING_HEADERS", "Request"]

_UNPARSED = object()

# Request headers that change the answer to the same body, so they are part
# of the cache key (lowercase names): the API version and beta features of
# Anthropic, the organization and project an OpenAI request is billed to.
# Picked out while the head is parsed (relay._fast.request_head).
VARYING_HEADERS = VARYING_NAMES


class Request:
    """One complete client request.

    The body is read whole (bounded by ``server.max_body_bytes``) before the
    request is dispatched: the cache key, model routing and usage accounting
    all need it, and AI API request bodies are small. Headers keep their
    original spelling for forwarding; the few relay acts on are picked out
    while parsing so nothing is searched per request.
    """

    __slots__ = (
        "method",
        "target",
        "path",
        "headers",
        "body",
        "keep_alive",
        "http_minor",
        "client_ip",
        "authorization",
        "api_key",
        "cache_control",
        "forwarded_for",
        "forward_headers",
        "credential_headers",
        "varying",
        "started",
        "relay_key",
        "on_finished",
        "_json",
        "_facts",
        "_credential",
    )

    def __init__(
        self,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        keep_alive: bool,
        http_minor: int,
        client_ip: str,
        started: float,
    ) -> None:
        self.method = method
        self.target = target
        q = target.find(b"?")
        self.path = target if q < 0 else target[:q]
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive
        self.http_minor = http_minor
        self.client_ip = client_ip
        self.started = started
        self.authorization: bytes | None = None
        self.api_key: bytes | None = None
        self.cache_control: bytes | None = None
        self.forwarded_for: bytes | None = None
        # End-to-end headers rendered as "Name: value\r\n" lines, ready to be
        # written upstream (hop-by-hop, Host, Expect, X-Forwarded-* removed),
        # without the credential headers (Authorization, x-api-key, api-key):
        # those are in credential_headers, sent upstream only when the
        # upstream has no key of its own. Admission that consumes a relay
        # key sets credential_headers to b"" so it is never forwarded.
        self.forward_headers = b""
        self.credential_headers = b""
        # The admitted virtual key (relay.keys.admission.KeyTicket), if any.
        self.relay_key: Any = None
        # Called once the handler's coroutine for this request ended, however
        # it ended (returned, raised, cancelled): gives back what the handler
        # still holds for the request (a virtual key's unused reservation)
        # without a wrapper coroutine around every such request.
        self.on_finished: Callable[[], None] | None = None
        # "name:value" of each VARYING_HEADERS header, picked out while parsing.
        self.varying: list[bytes] | None = None
        self._json: Any = _UNPARSED
        self._facts: RequestFacts | None = None
        self._credential: Any = _UNPARSED

    @property
    def credential(self) -> bytes | None:
        """The caller's credential (Authorization, else x-api-key), if any.

        The ``Bearer`` scheme is taken off, so a key counts as the same
        caller whether an SDK sends it as ``Authorization: Bearer k``
        (OpenAI) or ``x-api-key: k`` (Anthropic). Worked out once: the
        limiter, the cache key, usage and the request log all ask.
        """
        credential = self._credential
        if credential is _UNPARSED:
            value = self.authorization
            if value is None:
                credential = self.api_key
            elif value[:7].lower() == b"bearer ":
                credential = value[7:].strip() or None
            else:
                credential = value
            self._credential = credential
        return credential  # type: ignore[no-any-return]

    def varying_key(self) -> bytes:
        """The varying headers as one canonical value for the cache key.

        Sorted, so the order the client sent them in does not matter; header
        values cannot hold a newline, so the join is unambiguous.
        """
        varying = self.varying
        if varying is None:
            return b""
        if len(varying) == 1:
            return varying[0]
        return b"\n".join(sorted(varying))

    def json(self) -> Any:
        """The body decoded as JSON, parsed at most once; None if it is not JSON."""
        if self._json is _UNPARSED:
            value: Any = None
            if self.body:
                try:
                    value = json.loads(self.body)
                except (ValueError, UnicodeDecodeError):
                    value = None
            self._json = value
        return self._json

    def facts(self) -> RequestFacts:
        """The few JSON facts relay reads from the body (stream, model, ...), once.

        Found by a scan that decodes nothing else (``relay._fast``); a body
        already decoded by :meth:`json` is read from its document instead.
        """
        facts = self._facts
        if facts is None:
            doc = self._json
            if doc is _UNPARSED:
                facts = request_facts(self.body)
            else:
                facts = request_facts_of(doc, self.body) if type(doc) is dict else NOT_AN_OBJECT
            self._facts = facts
        return facts

    def model(self) -> str | None:
        """The JSON body's ``model`` field, when there is one."""
        return self.facts().model

    def replace_body(self, body: bytes) -> None:
        """Swap in a rewritten body (e.g. usage injection); drops the parsed JSON and facts."""
        self.body = body
        self._json = _UNPARSED
        self._facts = None
