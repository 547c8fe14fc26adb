"""What the suite starts: the upstreams and every gateway under test.

Upstreams (one nginx process, ``upstream.conf``):

* ``canned``: answers every request with the same 590-byte chat completion,
  as fast as nginx can; the throughput and latency scenarios use it, so the
  gateway is what is measured.
* ``stream``: nginx in front of relay's fake upstream that sets the fake's
  shaping headers itself, so every gateway gets the same stream whether it
  forwards client headers or not: ``/`` is a 200-event stream sent at once,
  ``/slow/`` a 10-event stream with 50 ms between events (to see whether a
  gateway passes events on as they come or holds them).

Gateways: nginx as a keep-alive reverse proxy (2 workers), relay (compiled
and pure, 1 and 2 workers, every feature on), LiteLLM proxy (1 and 2
workers), Portkey gateway. Only 127.0.0.1 is ever listened on or targeted
by the suite itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .procs import Processes, Started, free_port, wait_for_port

__all__ = ["CANNED_BODY", "RELAY_VARIANTS", "Env", "StreamRoute", "Target"]

# Rows that change one thing against "relay (compiled, 1 worker)" with every
# feature on, so the cost of each comes out as a ratio of one run.
RELAY_VARIANTS = {
    "off": ", every feature off",
    "log": ", log.requests on",
    "keys": ", virtual keys on",
    "targets": ", 2 targets + retries",
}

# A typical non-streamed chat completion: 590 bytes.
CANNED_BODY = (
    '{"id":"chatcmpl-bench0000000000000000000000","object":"chat.completion","created":1735689600,'
    '"model":"gpt-4o-2024-08-06","choices":[{"index":0,"message":{"role":"assistant","content":'
    '"Reusing skips the handshakes.","refusal":null},"logprobs":null,"finish_reason":"stop"}],'
    '"usage":{"prompt_tokens":38,"completion_tokens":21,"total_tokens":59,"prompt_tokens_details":'
    '{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,'
    '"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},'
    '"service_tier":"default","system_fingerprint":"fp_bench"}'
)

STREAM_EVENTS = 200
SLOW_EVENTS = 10
SLOW_DELAY_S = 0.05
CHAT_PATH = "/v1/chat/completions"

# Config keys relay reads from the environment (SECTION_KEY): never inherited
# from whoever runs the suite, so the config file alone decides.
_RELAY_ENV_PREFIXES = ("SERVER_", "PROXY_", "CACHE_", "RATELIMIT_", "CIRCUIT_BREAKER_",
                       "REDIS_", "LOG_", "MODELS_", "ROUTES_", "RELAY_")


@dataclass(slots=True)
class StreamRoute:
    """How a target is asked for the fast (200-event) or the slow stream."""

    port: int
    path: str
    headers: dict[str, str]
    model: str = "gpt-4o"


@dataclass(slots=True)
class Target:
    key: str                       # short id, e.g. "relay-c1"
    label: str                     # as shown in tables
    kind: str                      # direct | nginx | relay | litellm | portkey
    port: int
    headers: dict[str, str] = field(default_factory=dict)
    proc: Started | None = None    # None: nothing of its own to measure (direct)
    workers: int | None = None
    impl: str | None = None        # relay: compiled | pure
    variant: str = ""              # relay: "" (every feature on) or a RELAY_VARIANTS key
    fast: StreamRoute | None = None
    slow: StreamRoute | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{CHAT_PATH}"


def _nginx_common(workdir: Path, name: str, workers: int) -> str:
    temp = workdir / f"{name}-temp"
    temp.mkdir(exist_ok=True)
    return f"""
daemon off;
master_process on;
worker_processes {workers};
pid {workdir}/{name}.pid;
error_log {workdir}/{name}-error.log warn;
events {{ worker_connections 8192; multi_accept on; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 120s;
  client_body_temp_path {temp}/body;
  proxy_temp_path {temp}/proxy;
  fastcgi_temp_path {temp}/fastcgi;
  uwsgi_temp_path {temp}/uwsgi;
  scgi_temp_path {temp}/scgi;
"""


def _proxy_block(upstream: str, buffering: bool) -> str:
    return f"""
      proxy_pass http://{upstream};
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering {"on" if buffering else "off"};
      proxy_read_timeout 600s;
"""


@dataclass(slots=True)
class Env:
    """Shared facts for starting things: where, with what, and who owns them."""

    repo: Path
    workdir: Path
    procs: Processes
    python: str = sys.executable
    nginx: str | None = None
    canned_port: int = 0
    stream_port: int = 0            # nginx stream front; 0 when nginx is missing
    fake_port: int = 0
    relay_key: str = field(default_factory=lambda: "sk-bench-" + secrets.token_hex(16))
    # The virtual key of the "keys" row (a relay key: never forwarded upstream).
    virtual_key: str = field(default_factory=lambda: "rk-" + secrets.token_urlsafe(32))

    # -------------------------------------------------------------- upstreams
    def start_fake_upstream(self) -> Started:
        self.fake_port = free_port()
        proc = self.procs.start(
            "fake-upstream",
            [self.python, "-m", "relay.testing.fake_upstream", "--host", "127.0.0.1",
             "--port", str(self.fake_port)],
            env=self._python_env(), cwd=self.repo,
        )
        if not wait_for_port(self.fake_port, 20, proc):
            raise RuntimeError("relay's fake upstream did not start:\n" + proc.log_tail())
        return proc

    def start_nginx_upstream(self) -> Started:
        assert self.nginx is not None
        self.canned_port = free_port()
        self.stream_port = free_port()
        if "$" in CANNED_BODY or "'" in CANNED_BODY:
            raise ValueError("the canned body must not hold nginx syntax")
        conf = _nginx_common(self.workdir, "upstream", 1) + f"""
  upstream fake {{ server 127.0.0.1:{self.fake_port}; keepalive 32; }}
  server {{
    listen 127.0.0.1:{self.canned_port} backlog=4096;
    location / {{
      default_type application/json;
      return 200 '{CANNED_BODY}';
    }}
  }}
  server {{
    listen 127.0.0.1:{self.stream_port} backlog=4096;
    location /slow/ {{
      proxy_set_header x-fake-events {SLOW_EVENTS};
      proxy_set_header x-fake-event-delay {SLOW_DELAY_S};
      {_proxy_block("fake/", buffering=False)}
    }}
    location / {{
      proxy_set_header x-fake-events {STREAM_EVENTS};
      {_proxy_block("fake", buffering=False)}
    }}
  }}
}}
"""
        return self._start_nginx("upstream", conf, self.canned_port)

    def _start_nginx(self, name: str, conf: str, port: int) -> Started:
        assert self.nginx is not None
        path = self.workdir / f"{name}.conf"
        path.write_text(conf)
        proc = self.procs.start(name, [self.nginx, "-c", str(path), "-p", str(self.workdir),
                                       "-e", str(self.workdir / f"{name}-error.log")])
        if not wait_for_port(port, 15, proc):
            raise RuntimeError(f"nginx ({name}) did not start:\n{proc.log_tail()}")
        return proc

    # ------------------------------------------------------------- direct
    def direct(self) -> Target:
        t = Target("direct", "direct (no gateway)", "direct", self.canned_port,
                   {"Authorization": f"Bearer {self.relay_key}"})
        if self.stream_port:
            t.fast = StreamRoute(self.stream_port, CHAT_PATH, dict(t.headers))
            t.slow = StreamRoute(self.stream_port, "/slow" + CHAT_PATH, dict(t.headers))
        return t

    # -------------------------------------------------------------- nginx
    def start_nginx_proxy(self) -> Target:
        port, stream = free_port(), free_port()
        conf = _nginx_common(self.workdir, "nginx-proxy", 2) + f"""
  upstream canned {{ server 127.0.0.1:{self.canned_port}; keepalive 64; }}
  upstream stream {{ server 127.0.0.1:{self.stream_port}; keepalive 16; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096 reuseport;
    location / {{ {_proxy_block("canned", buffering=True)} }}
  }}
  server {{
    listen 127.0.0.1:{stream} backlog=4096 reuseport;
    location / {{ {_proxy_block("stream", buffering=False)} }}
  }}
}}
"""
        proc = self._start_nginx("nginx-proxy", conf, port)
        headers = {"Authorization": f"Bearer {self.relay_key}"}
        return Target("nginx", "nginx reverse proxy (2 workers)", "nginx", port, headers, proc,
                      workers=2,
                      fast=StreamRoute(stream, CHAT_PATH, dict(headers)),
                      slow=StreamRoute(stream, "/slow" + CHAT_PATH, dict(headers)))

    # -------------------------------------------------------------- relay
    def _python_env(self, pure: bool = False) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(_RELAY_ENV_PREFIXES)}
        env["PYTHONPATH"] = str(self.repo) + (os.pathsep + env["PYTHONPATH"]
                                              if env.get("PYTHONPATH") else "")
        if pure:
            env["RELAY_NO_EXTENSIONS"] = "1"
        return env

    # ------------------------------------------------------------- Redis
    def start_redis(self, mode: str) -> list[str]:
        """A redis-server (``standalone``) or a three-master Redis Cluster
        (``cluster``) on free 127.0.0.1 ports, without persistence; returns
        the addresses relay is given."""
        binary = shutil.which("redis-server")
        cli = shutil.which("redis-cli")
        if binary is None or (mode == "cluster" and cli is None):
            raise RuntimeError("redis-server (and redis-cli for a cluster) not installed")
        addresses = []
        for index in range(3 if mode == "cluster" else 1):
            port = free_port()
            home = self.workdir / f"redis-{mode}-{index}"
            home.mkdir()
            argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "no", "--dir", str(home)]
            if mode == "cluster":
                argv += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                         "--cluster-port", str(free_port())]
            proc = self.procs.start(f"redis-{mode}-{index}", argv, cwd=home)
            if not wait_for_port(port, 10, proc):
                raise RuntimeError(f"redis-server did not start:\n{proc.log_tail()}")
            addresses.append(f"127.0.0.1:{port}")
        if mode == "cluster":
            assert cli is not None
            subprocess.run([cli, "--cluster", "create", *addresses, "--cluster-replicas", "0",
                            "--cluster-yes"], check=True, capture_output=True, timeout=60)
            host, port_text = addresses[0].split(":")
            deadline = time.monotonic() + 30
            while b"cluster_state:ok" not in subprocess.run(
                [cli, "-h", host, "-p", port_text, "cluster", "info"], capture_output=True,
                timeout=10,
            ).stdout:
                if time.monotonic() > deadline:
                    raise RuntimeError("the benchmark's Redis Cluster did not become ready")
                time.sleep(0.1)
        return addresses

    def relay_config(self, name: str, upstream_port: int, redis: str = "",
                     variant: str = "") -> Path:
        """Every feature on: cache (memory, or Redis when ``redis`` is a
        config section for it), rate limit never tripped, breaker, cost.

        ``variant`` changes one thing, so its row compares with the plain one
        in the same run (see ``RELAY_VARIANTS``)."""
        path = self.workdir / f"{name}.yaml"
        redis_section = redis or "redis:\n  enabled: false"
        if variant == "off":
            path.write_text(f"""\
# Every feature off: the bare proxy.
server:
  shutdown_timeout: 3
proxy:
  target: "http://127.0.0.1:{upstream_port}"
  pool_size: 64
cache:
  enabled: false
ratelimit:
  enabled: false
circuit_breaker:
  enabled: false
metrics:
  enabled: false
usage:
  enabled: false
log:
  level: warning
""")
            return path
        extra = ""
        if variant == "log":
            extra = "  requests: true\n"
        elif variant == "keys":
            digest = hashlib.sha256(self.virtual_key.encode()).hexdigest()
            redis_section += f"""
keys:
  enabled: true
  store: sqlite
  path: "{self.workdir / (name + '-keys.db')}"
  static:
    - {{id: bench, name: bench, secret_sha256: "{digest}", budget_usd: 1000000000,
       rpm: 1000000000, tpm: 1000000000000}}"""
        elif variant == "targets":
            redis_section += f"""
routes:
  - path: "/"
    strategy: weighted
    targets:
      - {{url: "http://127.0.0.1:{upstream_port}", name: a, weight: 1}}
      - {{url: "http://127.0.0.1:{upstream_port}", name: b, weight: 1}}
retries:
  attempts: 1"""
        path.write_text(f"""\
# Every feature on. The rate limit is huge so it is consulted on every
# request but never trips.
server:
  shutdown_timeout: 3
proxy:
  target: "http://127.0.0.1:{upstream_port}"
  pool_size: 64
cache:
  enabled: true
  ttl: 3600
  max_entries: 10000
  scope: api_key
ratelimit:
  enabled: true
  requests_per_second: 1000000000
  burst: 1000000000
  key: api_key
circuit_breaker:
  enabled: true
  failure_threshold: 5
  recovery_timeout: 30
{redis_section}
models:
  gpt-4o: {{input: 0.0025, output: 0.01, cached_input: 0.00125}}
log:
  level: warning
{extra}""")
        return path

    def start_relay(self, workers: int, pure: bool, *, stream: bool = False,
                    redis_mode: str = "", variant: str = "") -> Target:
        """relay in front of the fake upstream; with ``redis_mode``
        (standalone | cluster) its cache and limiter live in a Redis of that
        kind started for it, so the two rows compare the topologies."""
        impl = "pure" if pure else "compiled"
        key = f"relay-{impl[0]}{workers}" + ("-stream" if stream else "")
        upstream = self.stream_port if stream else self.canned_port
        redis = ""
        if redis_mode:
            key += "-redis" if redis_mode == "standalone" else "-cluster"
            addresses = self.start_redis(redis_mode)
            redis = (f"redis:\n  enabled: true\n  mode: {redis_mode}\n"
                     f"  address: \"{addresses[0]}\"\n  addresses: {json.dumps(addresses)}")
        if variant:
            key += f"-{variant}"
        config = self.relay_config(key, upstream, redis, variant)
        port = free_port()
        proc = self.procs.start(
            key,
            [self.python, "-m", "relay", "--config", str(config), "--port", f"127.0.0.1:{port}",
             "--workers", str(workers)],
            env=self._python_env(pure), cwd=self.repo,
        )
        if not wait_for_port(port, 30, proc):
            raise RuntimeError(f"relay did not start:\n{proc.log_tail()}")
        secret = self.virtual_key if variant == "keys" else self.relay_key
        headers = {"Authorization": f"Bearer {secret}"}
        plural = "s" if workers > 1 else ""
        where = {"": "", "standalone": ", Redis", "cluster": ", Redis Cluster"}[redis_mode]
        where += RELAY_VARIANTS.get(variant, "")
        t = Target(key, f"relay ({impl}, {workers} worker{plural}{where})", "relay", port, headers,
                   proc, workers=workers, impl=impl, variant=variant)
        if stream:
            t.fast = StreamRoute(port, CHAT_PATH, dict(headers))
            t.slow = StreamRoute(port, "/slow" + CHAT_PATH, dict(headers))
        return t

    # ------------------------------------------------------------ LiteLLM
    def start_litellm(self, exe: str, version: str, workers: int) -> Target:
        port = free_port()
        master_key = "sk-" + secrets.token_hex(32)
        config = self.workdir / f"litellm-{workers}.yaml"
        models = [("gpt-4o", f"http://127.0.0.1:{self.canned_port}/v1")]
        if self.stream_port:
            models += [("bench-stream", f"http://127.0.0.1:{self.stream_port}/v1"),
                       ("bench-stream-slow", f"http://127.0.0.1:{self.stream_port}/slow/v1")]
        lines = ["model_list:"]
        for name, base in models:
            lines += [f"  - model_name: {name}", "    litellm_params:",
                      "      model: openai/gpt-4o", f"      api_base: {base}",
                      "      api_key: sk-upstream-not-used"]
        lines += ["litellm_settings:", "  telemetry: false", "general_settings:",
                  f"  master_key: {master_key}"]
        config.write_text("\n".join(lines) + "\n")
        env = dict(os.environ)
        env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_TELEMETRY="False",
                   LITELLM_MASTER_KEY=master_key)
        key = f"litellm-{workers}"
        proc = self.procs.start(
            key,
            [exe, "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
             "--num_workers", str(workers)],
            env=env, cwd=self.workdir,
        )
        if not wait_for_port(port, 120, proc):
            raise RuntimeError(f"LiteLLM did not start:\n{proc.log_tail()}")
        headers = {"Authorization": f"Bearer {master_key}"}
        plural = "s" if workers > 1 else ""
        t = Target(key, f"LiteLLM {version} ({workers} worker{plural})", "litellm", port,
                   headers, proc, workers=workers)
        if self.stream_port:
            t.fast = StreamRoute(port, CHAT_PATH, dict(headers), model="bench-stream")
            t.slow = StreamRoute(port, CHAT_PATH, dict(headers), model="bench-stream-slow")
        return t

    # ------------------------------------------------------------ Portkey
    def start_portkey(self, node: str, script: str, version: str) -> Target:
        port = free_port()
        env = dict(os.environ, NODE_ENV="production")
        proc = self.procs.start(
            "portkey", [node, script, f"--port={port}", "--headless"], env=env, cwd=self.workdir)
        if not wait_for_port(port, 60, proc):
            raise RuntimeError(f"Portkey did not start:\n{proc.log_tail()}")

        def route(upstream: str) -> dict[str, str]:
            return {"x-portkey-provider": "openai", "x-portkey-custom-host": upstream,
                    "Authorization": f"Bearer {self.relay_key}"}

        t = Target("portkey", f"Portkey gateway {version}", "portkey", port,
                   route(f"http://127.0.0.1:{self.canned_port}/v1"), proc, workers=1)
        if self.stream_port:
            t.fast = StreamRoute(port, CHAT_PATH, route(f"http://127.0.0.1:{self.stream_port}/v1"))
            t.slow = StreamRoute(port, CHAT_PATH,
                                 route(f"http://127.0.0.1:{self.stream_port}/slow/v1"))
        return t
