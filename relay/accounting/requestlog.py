"""One JSON line per request (``log.requests: true``).

Fields: ``time`` (ISO 8601 UTC, milliseconds), ``method``, ``path``,
``status``, ``model``, ``prompt_tokens``, ``completion_tokens``,
``cost_usd``, ``cache`` (HIT/MISS/BYPASS), ``latency_ms``, ``upstream``,
``key``.

Nothing secret goes in: ``key`` is the short credential hash the caller
passes (never the key), no header is logged, and ``path`` is logged
*without its query string*, because some clients put keys or tokens there
(``?key=...``, ``?api-version=...&sig=...``). Client-chosen strings are
JSON-escaped (no log injection) and truncated.

Lines are buffered and written together: when an event loop is running,
at most ``flush_interval`` seconds after the first buffered line (or at
once when ``max_buffered`` lines are waiting); without a running loop,
line by line.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from ..http.request import Request
    from .keyhash import KeyHashes
    from .usage import Usage

__all__ = ["RequestLogger", "strip_query"]

_MAX_PATH = 2048
_MAX_FIELD = 256
_MEMO_MAX = 4096


def strip_query(path: bytes | str) -> str:
    """The path part of a request target: no query string, no fragment."""
    if isinstance(path, bytes):
        path = path.decode("latin-1")
    for sep in ("?", "#"):
        cut = path.find(sep)
        if cut >= 0:
            path = path[:cut]
    return path[:_MAX_PATH]


def _number(value: float) -> str:
    """*value* as json.dumps writes it (a finite float or an int as its repr)."""
    kind = type(value)
    if kind is int or (kind is float and value - value == 0.0):
        return repr(value)
    return json.dumps(value)


def _text(value: bytes | str | None, limit: int = _MAX_FIELD) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return value[:limit]


class RequestLogger:
    """Writes request log lines to ``stream`` (standard error by default)."""

    def __init__(
        self,
        stream: TextIO | None = None,
        flush_interval: float = 0.5,
        max_buffered: int = 256,
    ) -> None:
        self.stream = stream  # None: standard error, as it is when a batch is written
        self.flush_interval = flush_interval
        self.max_buffered = max_buffered
        self._lines: list[str] = []
        self._timer: asyncio.TimerHandle | None = None
        self._second = -1
        self._second_text = ""
        self.dropped = 0  # lines lost to a broken stream
        # JSON text of the strings already logged, by field kind (the cuts differ).
        self._methods: dict[Any, str] = {}
        self._paths: dict[Any, str] = {}
        self._strings: dict[Any, str] = {}
        self._keys: dict[Any, str] = {}

    def _timestamp(self, now: float) -> str:
        second = int(now)
        if second != self._second:  # strftime once per second, not per line
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{int((now - second) * 1000):03d}Z"

    def log(
        self,
        *,
        method: bytes | str,
        path: bytes | str,
        status: int,
        model: str | None = None,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        cost_usd: float = 0.0,
        cache: str = "BYPASS",
        latency_ms: float = 0.0,
        upstream: str | None = None,
        key: str | None = None,
        now: float | None = None,
    ) -> None:
        """Log one finished request. ``key`` must be a hash, never a key."""
        self._add(
            method, path, status, model, prompt_tokens, completion_tokens, cost_usd, cache,
            latency_ms, upstream, key, time.time() if now is None else now,
        )

    def _add(
        self,
        method: bytes | str,
        path: bytes | str,
        status: int,
        model: str | None,
        prompt_tokens: int,
        completion_tokens: int,
        cost_usd: float,
        cache: str,
        latency_ms: float,
        upstream: str | None,
        key: str | None,
        now: float,
    ) -> None:
        # The line json.dumps would write for the record (same keys, order
        # and separators), assembled from pieces: the strings repeat from
        # request to request, so each is escaped once and remembered (a
        # JSON text is never empty, so ``or`` falls back only on a miss).
        strings = self._strings
        line = (
            f'{{"time":"{self._timestamp(now)}"'
            f',"method":{self._methods.get(method) or self._json(self._methods, method, 16)}'
            f',"path":{self._paths.get(path) or self._json(self._paths, path, 0)}'
            f',"status":{status if status.__class__ is int else _number(status)}'
            f',"model":{strings.get(model) or self._json(strings, model, _MAX_FIELD)}'
            f',"prompt_tokens":'
            f'{prompt_tokens if prompt_tokens.__class__ is int else _number(prompt_tokens)}'
            f',"completion_tokens":'
            f'{completion_tokens if completion_tokens.__class__ is int else _number(completion_tokens)}'
            f',"cost_usd":{_number(cost_usd)}'
            f',"cache":{strings.get(cache) or self._json(strings, cache, _MAX_FIELD)}'
            f',"latency_ms":{_number(round(latency_ms, 3))}'
            f',"upstream":{strings.get(upstream) or self._json(strings, upstream, _MAX_FIELD)}'
            f',"key":{self._keys.get(key) or self._json(self._keys, key, 64)}}}\n'
        )
        self._lines.append(line)
        if len(self._lines) >= self.max_buffered:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._timer = loop.call_later(self.flush_interval, self._on_timer)

    @staticmethod
    def _json(memo: dict[Any, str], value: bytes | str | None, limit: int) -> str:
        """*value* as its JSON string (``null`` for None), cut to *limit*
        (0: a path, without its query); remembered in *memo*, which is bounded."""
        text = memo.get(value)
        if text is None:
            if len(memo) >= _MEMO_MAX:
                memo.clear()  # the values come from clients
            cut = strip_query(value) if limit == 0 and value is not None else _text(value, limit)
            text = memo[value] = json.dumps(cut)  # type: ignore[arg-type]
        return text

    def finished(
        self,
        request: Request,
        upstream: str,
        status: int,
        seconds: float,
        cache: str,
        model: str | None,
        usage: Usage | None,
        cost: float,
        key_hashes: KeyHashes,
    ) -> None:
        """Log a request relay answered; its caller is shown by a virtual
        key's name, else by the hash of its credential."""
        credential = request.credential
        ticket = request.relay_key
        self._add(
            request.method,
            request.path,
            status,
            model,
            usage.prompt_tokens if usage else 0,
            usage.completion_tokens if usage else 0,
            cost,
            cache,
            seconds * 1000.0,
            upstream,
            ticket.record.name if ticket is not None else (
                key_hashes.of(credential) if credential else None
            ),
            time.time(),
        )

    def _on_timer(self) -> None:
        self._timer = None
        self.flush()

    def flush(self) -> None:
        """Write out every buffered line now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._lines:
            return
        lines, self._lines = self._lines, []
        stream = self.stream if self.stream is not None else sys.stderr
        try:
            stream.write("".join(lines))
            stream.flush()
        except (OSError, ValueError):  # closed or broken stream: never fail a request
            self.dropped += len(lines)

    def close(self) -> None:
        """Flush what is left (call at shutdown)."""
        self.flush()
