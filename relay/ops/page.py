"""The status page of ``GET /relay/``: one HTML file shipped in the package.

The page carries its style and script inline, so it needs nothing from any
other URL. It is served with a Content-Security-Policy that allows exactly
that inline style and script (by their SHA-256), requests to relay's own
origin and nothing else: no other origin, no plugin, no framing, no form
target, no inline event handler. Even if some text reached the page as
markup, no script of it could run.
"""

from __future__ import annotations

import base64
import functools
import re

__all__ = ["StatusPage", "status_page"]

_BLOCK = re.compile(rb"<(script|style)>(.*?)</\1>", re.DOTALL)


class StatusPage:
    """The page's bytes and the response head lines that go with them."""

    __slots__ = ("body", "headers")

    def __init__(self, html: bytes) -> None:
        import hashlib  # here: most workers never serve the page

        sources: dict[bytes, list[str]] = {b"script": [], b"style": []}
        for match in _BLOCK.finditer(html):
            digest = base64.b64encode(hashlib.sha256(match.group(2)).digest()).decode()
            sources[match.group(1)].append(f"'sha256-{digest}'")
        policy = "; ".join(
            (
                "default-src 'none'",
                "script-src " + (" ".join(sources[b"script"]) or "'none'"),
                "style-src " + (" ".join(sources[b"style"]) or "'none'"),
                "connect-src 'self'",
                "img-src 'none'",
                "base-uri 'none'",
                "form-action 'none'",
                "frame-ancestors 'none'",
            )
        )
        self.body = html
        self.headers: tuple[bytes, ...] = (
            b"Content-Type: text/html; charset=utf-8\r\n",
            b"Content-Security-Policy: %s\r\n" % policy.encode(),
            b"X-Content-Type-Options: nosniff\r\n",
            b"X-Frame-Options: DENY\r\n",
            b"Referrer-Policy: no-referrer\r\n",
            b"Cache-Control: no-store\r\n",
        )


@functools.cache
def status_page() -> StatusPage:
    """The packaged page, read once per process."""
    from importlib import resources  # with tempfile and shutil: only once the page is asked for

    html = resources.files("relay.ops").joinpath("status.html").read_bytes()
    return StatusPage(html)
