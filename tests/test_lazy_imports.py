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
import subprocess
import sys

from tests.support import ROOT

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
