"""A worker loads a feature's library only when that feature needs it.

Each of these libraries holds megabytes once imported (prometheus-client
brings an HTTP server and WSGI modules; tiktoken its tokenizer tables), and a
worker keeps whatever it imported for its whole life. A fresh interpreter
serves a request with every in-process feature on (memory cache, rate limit,
breaker, metrics, usage) and Redis and keys off, then reports which of them
it imported (the virtual-key modules too: a worker without keys holds none
of them, and the admin API loads its part on its first request); the metrics
library must arrive with the first scrape, so the check is seen to notice an
import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.support import ROOT, free_port, wait_for_port, write_config

_CHILD = r"""
import json, sys

from relay.testing import ThreadedFakeUpstream
from tests.support import RelayThread, make_config, raw_exchange

KEY_MODULES = tuple("relay.keys." + name for name in (
    "admin", "admission", "manage", "model", "service", "store", "stores"
))

WATCHED = ("redis", "prometheus_client", "tiktoken", "sqlite3", *KEY_MODULES)

def loaded():
    return sorted(name for name in WATCHED if name in sys.modules)

body = b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}'
request = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
)
with ThreadedFakeUpstream() as upstream:
    config = make_config(
        upstream.url,
        cache={"enabled": True, "max_entries": 100},
        ratelimit={"enabled": True, "requests_per_second": 1000, "burst": 1000},
        circuit_breaker={"enabled": True},
        metrics={"enabled": True},
        usage={"enabled": True},
        redis={"enabled": False},
        models={"gpt-4o": {"input": 0.0025, "output": 0.01}},
    )
    with RelayThread(config) as relay:
        status = raw_exchange(relay.port, request).split(b" ", 2)[1].decode()
        served = loaded()
        relay.call(relay.gateway.runtime.metrics.render)
        scraped = loaded()
        admin = raw_exchange(
            relay.port, b"GET /relay/admin/keys HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )
        admin_status = admin.split(b" ", 2)[1].decode()
        administered = loaded()
print(json.dumps({
    "status": status, "served": served, "scraped": scraped,
    "admin_status": admin_status, "administered": administered,
}))
"""


def test_a_worker_with_redis_and_keys_off_imports_no_library_it_does_not_use() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.splitlines()[-1])
    # The admin API (off: no admin key) still answers its prefix, and its
    # modules arrive with that first request, not before.
    assert report == {
        "status": "200",
        "served": [],
        "scraped": ["prometheus_client"],
        "admin_status": "404",
        "administered": [
            "prometheus_client",
            "relay.keys.admin",
            "relay.keys.manage",
            "relay.keys.model",
            "relay.keys.service",
            "relay.keys.store",
        ],
    }


# The worker itself, as `python -m relay` runs it (no test helper imported in
# its interpreter): after one proxied request with every in-process feature
# on, it reports the standard modules it holds that relay does not need.
_WORKER = r"""
import json, os, signal, socket, sys, threading, time

STDLIB = ("hashlib", "_hashlib", "shutil", "secrets", "encodings.idna", "bz2", "lzma")
port = int(sys.argv[sys.argv.index("--port") + 1].rsplit(":", 1)[1])
body = b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}'
request = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
    b"Authorization: Bearer sk-lazy\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
    % (len(body), body)
)

def client():
    for _ in range(400):
        try:
            sock = socket.create_connection((b"127.0.0.1", port), timeout=10)  # bytes: no idna codec here either
            break
        except OSError:
            time.sleep(0.05)
    with sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    print(json.dumps({"status": answer.split(b" ", 2)[1].decode(),
                      "loaded": sorted(m for m in STDLIB if m in sys.modules)}), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=client, daemon=True).start()
from relay.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_worker_holds_no_standard_module_it_does_not_need() -> None:
    """hashlib (OpenSSL's digest tables), shutil (argparse's width, with bz2
    and lzma), secrets and the idna codec each stay loaded for a worker's
    life: relay hashes with CPython's own SHA-256, gives argparse its width
    and resolves ASCII hosts as bytes."""
    upstream_port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, "-m", "relay.testing.fake_upstream", "--host", "127.0.0.1",
         "--port", str(upstream_port)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    config = write_config({
        "proxy": {"target": f"http://127.0.0.1:{upstream_port}"},
        "cache": {"enabled": True, "max_entries": 100, "scope": "api_key"},
        "ratelimit": {"enabled": True, "requests_per_second": 1000, "burst": 1000},
        "circuit_breaker": {"enabled": True},
        "metrics": {"enabled": True},
        "usage": {"enabled": True},
        "redis": {"enabled": False},
        "models": {"gpt-4o": {"input": 0.0025, "output": 0.01}},
        "log": {"level": "warning"},
    })
    try:
        wait_for_port(upstream_port, 20)
        out = subprocess.run(
            [sys.executable, "-c", _WORKER, "--config", config, "--port",
             f"127.0.0.1:{free_port()}"],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )
    finally:
        upstream.terminate()
        upstream.wait(10)
        os.unlink(config)
    assert out.stdout, out.stderr
    report = json.loads(out.stdout.splitlines()[-1])
    assert report == {"status": "200", "loaded": []}, out.stderr
