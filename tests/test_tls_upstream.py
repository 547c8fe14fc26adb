"""https upstreams: certificate verification on, SNI sent, pooled like http ones."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import shutil
import ssl
import subprocess
import threading

import pytest

from tests.support import free_port, start_relay_process, wait_for_port, write_config

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")

BODY = json.dumps({"id": "x", "object": "chat.completion", "model": "m",
                   "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}).encode()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for "localhost" (what a private CA would issue)."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost"],
        check=True, capture_output=True, timeout=60,
    )
    return str(cert), str(key)


class TLSUpstream:
    """A tiny HTTPS server answering every request with one JSON body; records SNI."""

    def __init__(self, cert: str, key: str) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        self.server_names: list[str | None] = []
        self.context.sni_callback = lambda sock, name, ctx: self.server_names.append(name)
        self.connections = 0
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                if length:
                    await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.context)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stop.wait()
        server.close()

    def __enter__(self) -> TLSUpstream:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def _relay(target: str, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], int, str]:
    port = free_port()
    path = write_config({"server": {"port": f"127.0.0.1:{port}"}, "proxy": {"target": target},
                         "cache": {"enabled": False}, "ratelimit": {"enabled": False},
                         "circuit_breaker": {"enabled": False}})
    proc = start_relay_process(["--config", path], env=env)
    wait_for_port(port, proc=proc)
    return proc, port, path


def _post(port: int) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    conn.request("POST", "/v1/chat/completions", b'{"model":"m","messages":[]}',
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    out = resp.status, resp.read()
    conn.close()
    return out


def _stop(proc: subprocess.Popen[bytes], path: str) -> None:
    proc.terminate()
    proc.wait(15)
    os.unlink(path)


def test_trusted_certificate_is_accepted_with_sni_and_reuse(certificate):
    cert, key = certificate
    with TLSUpstream(cert, key) as upstream:
        # SSL_CERT_FILE is how an operator adds a private CA to the system trust.
        proc, port, path = _relay(f"https://localhost:{upstream.port}", {"SSL_CERT_FILE": cert})
        try:
            for _ in range(5):
                status, body = _post(port)
                assert status == 200 and body == BODY
        finally:
            _stop(proc, path)
        assert upstream.server_names and set(upstream.server_names) == {"localhost"}
        assert upstream.connections == 1  # one TLS handshake, then keep-alive


def test_untrusted_certificate_is_refused(certificate):
    cert, key = certificate
    with TLSUpstream(cert, key) as upstream:
        proc, port, path = _relay(f"https://localhost:{upstream.port}", {"SSL_CERT_FILE": "/nonexistent"})
        try:
            status, body = _post(port)
        finally:
            _stop(proc, path)
    assert status == 502
    error = json.loads(body)["error"]
    assert error["code"] == "bad_gateway" and "TLS" in error["message"]
