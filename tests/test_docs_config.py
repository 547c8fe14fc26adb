"""The operator docs say what relay does.

- docs/configuration.md documents exactly the keys of
  configs/config.example.yaml, and its Default / Environment / Reload columns
  agree with relay.config.
- Every fenced command block in docs/*.md and README.md is either marked
  `<!-- not runnable here: needs ... -->` (Docker, Kubernetes, Helm) or is
  listed in EXERCISED below and run for real by this file.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
CONFIG_DOC = DOCS / "configuration.md"
EXAMPLE = REPO / "configs" / "config.example.yaml"
IN_CI = bool(os.environ.get("CI"))
COMMAND_LANGS = {"", "bash", "sh", "shell", "console", "zsh"}
NOT_RUNNABLE = re.compile(r"<!--\s*not runnable here:\s*needs [^>]+-->")
# What a block marked not runnable may contain: tools with no engine,
# cluster or chart repository here.
NEEDS_OUTSIDE = re.compile(r"\b(docker|kubectl|helm|kustomize)\b")


def require_relay() -> None:
    if not (REPO / "relay" / "cli.py").exists():
        if IN_CI:
            pytest.fail("relay/cli.py is missing")
        pytest.skip("relay/cli.py does not exist yet")


# ---------------------------------------------------------------------------
# Config keys: example file <-> docs <-> relay.config


def example_keys(doc: dict[str, Any]) -> set[str]:
    """Dotted keys of a config file; list items as `routes[].x`, model names as `<name>`."""
    keys: set[str] = set()
    for section, body in doc.items():
        if section == "routes":
            keys.add("routes")
            for route in body or []:
                keys.update(f"routes[].{k}" for k in route)
        elif section == "models":
            keys.add("models")
            for price in (body or {}).values():
                keys.add("models.<name>")
                if isinstance(price, dict):
                    keys.update(f"models.<name>.{k}" for k in price)
        else:
            keys.update(f"{section}.{k}" for k in body or {})
    return keys


@dataclass(frozen=True)
class DocKey:
    type: str
    default: str
    env: str
    reload: str


def documented_keys() -> dict[str, DocKey]:
    """Rows of the key tables under `## Keys` in docs/configuration.md."""
    text = CONFIG_DOC.read_text()
    section = text.split("\n## Keys\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, DocKey] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 6 or not cells[0].startswith("`"):
            continue
        key = cells[0].strip("`")
        assert key not in rows, f"{key} documented twice"
        rows[key] = DocKey(cells[1], cells[2].strip("`"), cells[3].strip("`"), cells[4])
    return rows


def test_docs_and_example_list_the_same_keys() -> None:
    if not EXAMPLE.exists():
        if IN_CI:
            pytest.fail(f"{EXAMPLE.relative_to(REPO)} is missing")
        pytest.skip("configs/config.example.yaml does not exist yet")
    in_example = example_keys(yaml.safe_load(EXAMPLE.read_text()))
    in_docs = set(documented_keys())
    assert in_example - in_docs == set(), "in the example file but not documented"
    assert in_docs - in_example == set(), "documented but not in the example file"


def test_docs_cover_log_section() -> None:
    docs = documented_keys()
    assert docs["log.level"].default == "info" and docs["log.level"].env == "LOG_LEVEL"
    assert docs["log.requests"].default == "false" and docs["log.requests"].env == "LOG_REQUESTS"


def test_docs_agree_with_relay_config() -> None:
    """Defaults, environment names, types and reload behaviour, key by key."""
    require_relay()
    sys.path.insert(0, str(REPO))
    try:
        from relay import config as rc
    finally:
        sys.path.remove(str(REPO))
    docs = documented_keys()
    scalars = {k: v for k, v in docs.items() if not k.startswith(("routes", "models", "keys.static"))}
    assert set(scalars) == set(rc.known_keys())
    env_names = {f"{s}.{k}": name for name, (s, k) in rc.ENV_KEYS.items()}
    defaults = rc.load_config(None, env={})
    for key, row in scalars.items():
        section, name = key.split(".")
        assert row.env == env_names[key], key
        # server.port carries the host too: both restart keys live in it
        restart = key in rc.RESTART_KEYS
        assert row.reload == ("restart" if restart else "yes"), key
        documented = yaml.safe_load(row.default)
        if isinstance(documented, list):  # lists load as tuples (frozen config)
            documented = tuple(documented)
        if key == "server.port":
            assert rc.parse_listen_address(documented) == (defaults.server.host, defaults.server.port)
            continue
        actual = getattr(getattr(defaults, section), name)
        if isinstance(actual, tuple):  # a list key (retries.on): items as relay keeps them
            documented = tuple(str(item) for item in documented)
        assert documented == actual, f"{key}: docs say {documented!r}, relay uses {actual!r}"
        expected_type = {bool: "bool", int: "int", float: "number", str: "string", tuple: "list"}[
            type(actual)
        ]
        assert row.type == expected_type, key
    assert rc.RESTART_KEYS <= set(scalars) | {"server.host"}
    assert defaults.routes == () and len(defaults.models) == 0
    assert docs["routes"].default == "[]" and docs["models"].default == "{}"
    assert docs["keys.static"].default == "[]" and defaults.keys.static == ()


# A value other than the default for each scalar key, as an environment string.
ENV_SAMPLES = {
    "server.port": "127.0.0.1:9999",
    "proxy.target": "http://127.0.0.1:1",
    "cache.scope": "global",
    "ratelimit.key": "ip",
    "redis.address": "127.0.0.1:6390",
    "redis.password": "not-the-default",
    "proxy.api_key": "sk-not-the-default",
    "proxy.auth": "x-api-key",
    "redis.mode": "cluster",
    "redis.master_name": "other-master",
    "log.level": "debug",
    "keys.store": "sqlite",  # redis would also need redis.enabled
    "keys.path": "other-keys.db",
    "keys.admin_key": "not-the-default",
}
# Environment strings that load as something other than themselves.
ENV_PARSED = {
    "redis.addresses": ("127.0.0.1:26379,127.0.0.1:26380", ("127.0.0.1:26379", "127.0.0.1:26380")),
}


def test_documented_environment_names_override_the_file(tmp_path: Path) -> None:
    require_relay()
    sys.path.insert(0, str(REPO))
    try:
        from relay import config as rc
    finally:
        sys.path.remove(str(REPO))
    defaults = rc.load_config(None, env={})
    for key, row in documented_keys().items():
        if row.env in {"–", "-", ""} or key == "keys.static":
            continue
        section, name = key.split(".")
        if key == "server.port":
            loaded = rc.load_config(None, env={row.env: ENV_SAMPLES[key]})
            assert (loaded.server.host, loaded.server.port) == ("127.0.0.1", 9999)
            continue
        current = getattr(getattr(defaults, section), name)
        expected: Any
        if key in ENV_PARSED:
            text, expected = ENV_PARSED[key]
        elif key in ENV_SAMPLES:
            text = expected = ENV_SAMPLES[key]
        elif isinstance(current, tuple):  # a list key: comma-separated
            text, expected = "connect,500", ("connect", "500")
        elif isinstance(current, bool):
            expected = not current
            text = str(expected).lower()
        elif isinstance(current, int):
            expected = current + 1
            text = str(expected)
        else:
            expected = float(current) * 2
            text = str(expected)
        loaded = rc.load_config(None, env={row.env: text})
        assert getattr(getattr(loaded, section), name) == expected, key


# ---------------------------------------------------------------------------
# Command blocks


@dataclass(frozen=True)
class Block:
    file: str
    line: int
    lang: str
    text: str
    marked: bool


def fenced_blocks(path: Path) -> list[Block]:
    blocks = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)(```+|~~~+)\s*([\w+-]*)", lines[i])
        if not m:
            i += 1
            continue
        fence, lang = m.group(2), m.group(3).lower()
        start = i
        body = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        prev = next((ln for ln in reversed(lines[:start]) if ln.strip()), "")
        blocks.append(Block(str(path.relative_to(REPO)), start + 1, lang, "\n".join(body),
                            bool(NOT_RUNNABLE.search(prev))))
        i += 1
    return blocks


def doc_files() -> list[Path]:
    files = sorted(DOCS.glob("*.md"))
    if (REPO / "README.md").exists():
        files.append(REPO / "README.md")
    return files


def normalize(text: str) -> str:
    """One command per line: continuations joined, prompts and blanks dropped."""
    joined = re.sub(r"\\\n\s*", " ", text.strip())
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line.startswith("$ "):
            line = line[2:]
        if line:
            out.append(re.sub(r"\s+", " ", line))
    return "\n".join(out)


def command_blocks() -> list[Block]:
    return [b for f in doc_files() for b in fenced_blocks(f) if b.lang in COMMAND_LANGS]


def test_every_command_block_is_exercised_or_marked() -> None:
    unhandled = []
    for b in command_blocks():
        if b.marked:
            assert NEEDS_OUTSIDE.search(b.text), (
                f"{b.file}:{b.line} is marked not runnable but needs no Docker engine, "
                "cluster or Helm: exercise it instead"
            )
            continue
        if normalize(b.text) not in EXERCISED:
            unhandled.append(f"{b.file}:{b.line}:\n{b.text}")
    assert not unhandled, (
        "command blocks neither marked `<!-- not runnable here: needs ... -->` nor exercised "
        "in tests/test_docs_config.py:\n\n" + "\n\n".join(unhandled)
    )


def test_exercised_blocks_still_exist() -> None:
    present = {normalize(b.text) for b in command_blocks()}
    stale = [cmd for cmd in EXERCISED if cmd not in present]
    assert not stale, f"EXERCISED lists blocks no doc contains any more: {stale}"


# ---------------------------------------------------------------------------
# Running the blocks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shell_env(**extra: str) -> dict[str, str]:
    """`python` and `pip` of this interpreter first on PATH, relay importable."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RELAY_", "SERVER_", "REDIS_", "PROXY_", "CACHE_", "RATELIMIT_",
                                "CIRCUIT_BREAKER_", "LOG_", "PROMETHEUS_MULTIPROC"))}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env.update(extra)
    return env


def run_block(text: str, cwd: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    require_relay()
    return subprocess.run(["bash", "-e", "-o", "pipefail", "-c", text], cwd=cwd, env=shell_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def http_get(port: int, path: str, timeout: float = 5) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


class Server:
    """A long-running documented command, started in its own process group."""

    def __init__(self, text: str, cwd: Path, port: int, path: str = "/healthz",
                 logdir: Path | None = None) -> None:
        require_relay()
        self.text = text
        self.err = (logdir or cwd) / f"server-{port}.err"
        self.proc = subprocess.Popen(
            ["bash", "-c", text], cwd=cwd, env=shell_env(), stdout=subprocess.DEVNULL,
            stderr=self.err.open("wb"), start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"`{text}` exited with {self.proc.returncode}:\n{self.stderr()}")
            try:
                if path:
                    if http_get(port, path, timeout=1)[0] == 200:
                        break
                else:
                    with socket.create_connection(("127.0.0.1", port), timeout=1):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"`{text}` did not answer on port {port} within 30 s:\n{self.stderr()}")
            time.sleep(0.1)

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")[-4000:]

    def stop(self, timeout: float = 40) -> int:
        """SIGTERM, as a supervisor would, and the exit status."""
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def with_ports(text: str, relay: int, upstream: int = 0) -> str:
    text = text.replace("127.0.0.1:8080", f"127.0.0.1:{relay}")
    if upstream:
        text = text.replace("127.0.0.1:9000", f"127.0.0.1:{upstream}").replace("--port 9000", f"--port {upstream}")
    return text


# -- configuration.md ---------------------------------------------------------

CHECK_EXAMPLE = "python -m relay --check-config --config configs/config.example.yaml"
CHECK_WITH_ENV = ("CACHE_TTL=600 RATELIMIT_REQUESTS_PER_SECOND=50 python -m relay --check-config "
                  "--config configs/config.example.yaml")


def exercise_check_config(text: str, tmp_path: Path) -> None:
    out = run_block(text, REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    # and the same command really catches a bad value
    bad = run_block(text.replace("CACHE_TTL=600", "CACHE_TTL=soon"), REPO) if "CACHE_TTL" in text else \
        run_block("SERVER_WORKERS=0 " + text, REPO)
    assert bad.returncode != 0
    assert ("CACHE_TTL" if "CACHE_TTL" in text else "SERVER_WORKERS") in bad.stdout + bad.stderr


# -- deployment.md ------------------------------------------------------------

LAUNCH = "python -m relay --config configs/config.example.yaml --port 127.0.0.1:8080 --workers 2"
PROBES = "\n".join([
    "curl -s http://127.0.0.1:8080/healthz",
    "curl -s http://127.0.0.1:8080/readyz",
    "curl -s http://127.0.0.1:8080/metrics | grep '^relay_'",
    "curl -s http://127.0.0.1:8080/relay/usage",
])
WHEEL = "pip wheel --no-deps --wheel-dir dist ."


def exercise_launch(text: str, tmp_path: Path) -> None:
    """Starts with two workers on the example config, serves, drains on SIGTERM, exits 0."""
    port = free_port()
    server = Server(with_ports(text, port), REPO, port, logdir=tmp_path)
    try:
        status, body = http_get(port, "/readyz")
        assert status == 200, body
    finally:
        code = server.stop()
    assert code == 0, server.stderr()


def exercise_probes(text: str, tmp_path: Path) -> None:
    if shutil.which("curl") is None:
        if IN_CI:
            pytest.fail("curl is required under CI")
        pytest.skip("curl is not installed")
    port = free_port()
    server = Server(f"exec python -m relay --port 127.0.0.1:{port}", tmp_path, port)
    try:
        out = run_block(with_ports(text, port), tmp_path, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
    finally:
        server.stop()
    # bodies without a final newline run together: decode them one by one
    decoder = json.JSONDecoder()
    health, end = decoder.raw_decode(out.stdout)
    ready, end = decoder.raw_decode(out.stdout, end)
    assert health["status"] == "ok" and ready["status"] == "ready"
    *metric_lines, usage_line = out.stdout[end:].strip().splitlines()
    assert metric_lines and all(ln.startswith("relay_") for ln in metric_lines)
    assert {"totals", "models", "keys"} <= set(json.loads(usage_line))


def exercise_wheel(text: str, tmp_path: Path) -> None:
    """Builds the wheel from exactly the files the Docker build context holds,
    and checks the compiled extensions are inside and load (the Dockerfile's
    runtime check)."""
    ctx = tmp_path / "context"
    ctx.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        if not (REPO / name).exists():
            if IN_CI:
                pytest.fail(f"{name} is missing")
            pytest.skip(f"{name} does not exist yet")
        shutil.copy(REPO / name, ctx / name)
    shutil.copytree(REPO / "relay", ctx / "relay",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.c", "*.html", "*.pyc"))
    out = run_block(text, ctx, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (wheel,) = (ctx / "dist").glob("relay-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert [n for n in names if n.startswith("relay/_fast/") and n.endswith(".so")], names
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site),
                    str(wheel)], check=True, timeout=300)
    env = dict(os.environ, PYTHONPATH=str(site))
    env.pop("RELAY_NO_EXTENSIONS", None)
    check = "import relay._fast as f; assert f.IMPLEMENTATION == 'compiled', f.IMPLEMENTATION"
    res = subprocess.run([sys.executable, "-c", check], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr


# -- api.md -------------------------------------------------------------------

FAKE_UPSTREAM = "python -m relay.testing.fake_upstream --host 127.0.0.1 --port 9000"
RELAY_ON_FAKE = "PROXY_TARGET=http://127.0.0.1:9000 python -m relay --port 127.0.0.1:8080"
CURL_CHAT = normalize("""curl -si http://127.0.0.1:8080/v1/chat/completions \\
  -H 'Authorization: Bearer sk-test' \\
  -H 'Content-Type: application/json' \\
  -d '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}]}'""")
CURL_STREAM = normalize("""curl -sN http://127.0.0.1:8080/v1/chat/completions \\
  -H 'Authorization: Bearer sk-test' \\
  -H 'Content-Type: application/json' \\
  -d '{"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "Hello"}]}'""")


@pytest.fixture(scope="module")
def api_demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int, Path]]:
    """The two servers of api.md's walkthrough, started with its own commands."""
    require_relay()
    cwd = tmp_path_factory.mktemp("api-demo")
    relay_port, upstream_port = free_port(), free_port()
    upstream = Server(with_ports(FAKE_UPSTREAM, relay_port, upstream_port), cwd, upstream_port, path="")
    try:
        relay = Server(with_ports(RELAY_ON_FAKE, relay_port, upstream_port), cwd, relay_port)
        try:
            yield relay_port, upstream_port, cwd
        finally:
            assert relay.stop() == 0, relay.stderr()
    finally:
        upstream.stop()


def exercise_fake_upstream(text: str, tmp_path: Path) -> None:
    port = free_port()
    server = Server(with_ports(text, 0, port), tmp_path, port, path="")
    try:
        status, body = http_get(port, "/v1/models")
        assert status == 200, body
    finally:
        assert server.stop() == 0, server.stderr()


def exercise_curl(text: str, demo: tuple[int, int, Path]) -> None:
    if shutil.which("curl") is None:
        if IN_CI:
            pytest.fail("curl is required under CI")
        pytest.skip("curl is not installed")
    relay_port, upstream_port, cwd = demo
    out = run_block(with_ports(text, relay_port, upstream_port), cwd, timeout=60)
    assert out.returncode == 0, out.stderr
    if "-si" in text:
        head, _, body = out.stdout.replace("\r\n", "\n").partition("\n\n")
        assert head.startswith("HTTP/1.1 200"), head
        headers = {ln.split(":", 1)[0].lower(): ln.split(":", 1)[1].strip() for ln in head.splitlines()[1:]}
        assert headers["x-relay-cache"] in {"MISS", "HIT"}
        assert int(headers["x-ratelimit-limit"]) >= int(headers["x-ratelimit-remaining"]) >= 0
        assert json.loads(body)["choices"]
        # the walkthrough's claim: the same request again is a cache hit
        again = run_block(with_ports(text, relay_port, upstream_port), cwd, timeout=60)
        assert "x-relay-cache: hit" in again.stdout.lower()
    else:
        events = [ln for ln in out.stdout.splitlines() if ln.startswith("data: ")]
        assert events and events[-1] == "data: [DONE]"
        # relay asked for usage upstream but the client did not: no usage-only chunk
        for ev in events[:-1]:
            assert json.loads(ev[6:]).get("choices"), ev


def exercise_sdk_example(demo: tuple[int, int, Path]) -> None:
    relay_port, _, cwd = demo
    (code,) = [b.text for b in fenced_blocks(DOCS / "api.md") if b.lang == "python"]
    res = subprocess.run([sys.executable, "-c", with_ports(code, relay_port)], cwd=cwd, env=shell_env(),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip()


# Normalized block text -> how it is exercised. Handlers get (block text, tmp_path);
# those marked "demo" run against the api.md walkthrough servers instead.
BENCHMARK_RUNS = "\n".join([
    "python -m benchmarks.run --quick   # about 5 minutes",
    "python -m benchmarks.run           # full run, about 20 minutes",
    "python -m benchmarks.run --micro   # micro-benchmarks of the hot-path pieces",
])


def exercise_benchmark_commands(text: str, tmp_path: Path) -> None:
    """A benchmark run takes minutes (over CI's budget for one test): check
    instead that each documented invocation is one the runner accepts, and
    that the runner starts and explains itself."""
    import shlex

    from benchmarks.run import _arguments

    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        assert words[:3] == ["python", "-m", "benchmarks.run"], line
        _arguments(words[3:])  # argparse exits on an unknown flag
    result = run_block("python -m benchmarks.run --help", REPO, timeout=60)
    assert result.returncode == 0 and "--quick" in result.stdout, result.stderr


# -- troubleshooting.md -------------------------------------------------------

DEBUG_LAUNCH = "RELAY_DEBUG=1 python -m relay --config configs/config.example.yaml --port 127.0.0.1:8080"
DEBUG_CURL = "curl -s http://127.0.0.1:8080/relay/debug"


def exercise_debug_mode(text: str, tmp_path: Path) -> None:
    """Debug mode on: /relay/debug answers with the counts (by the documented
    curl), and the stopped worker logs that everything was released."""
    if shutil.which("curl") is None:
        if IN_CI:
            pytest.fail("curl is required under CI")
        pytest.skip("curl is not installed")
    port = free_port()
    server = Server(with_ports(text, port), REPO, port, logdir=tmp_path)
    try:
        out = run_block(with_ports(DEBUG_CURL, port), tmp_path, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
    finally:
        code = server.stop()
    assert code == 0, server.stderr()
    report = json.loads(out.stdout)
    assert report["open"]["client_connections"] == 1 and report["open"]["requests"] == 1
    assert report["buffers"]["client_queued_requests"] == 0
    assert "debug: every connection, request, task and buffer was released" in server.stderr()


# -- keys.md ------------------------------------------------------------------

KEYS_CREATE = ("python -m relay keys create --name billing-app --budget-usd 20 --budget-period monthly "
               "--rpm 60 --models 'gpt-4o*'")


def exercise_keys_create(text: str, tmp_path: Path) -> None:
    """Without a config file the CLI uses the default SQLite store in the
    current directory; the printed key carries its secret once."""
    out = run_block(text, tmp_path, timeout=60)
    assert out.returncode == 0, out.stderr
    key = json.loads(out.stdout)
    assert key["secret"].startswith("rk-") and key["name"] == "billing-app"
    assert key["budget_usd"] == 20 and key["rpm"] == 60 and key["models"] == ["gpt-4o*"]
    assert (tmp_path / "relay-keys.db").exists()
    listed = run_block("python -m relay keys list", tmp_path, timeout=60)
    assert listed.returncode == 0 and key["secret"] not in listed.stdout
    assert [k["id"] for k in json.loads(listed.stdout)] == [key["id"]]


EXERCISED: dict[str, tuple[str, Callable[..., None]]] = {
    KEYS_CREATE: ("plain", exercise_keys_create),
    normalize(BENCHMARK_RUNS): ("plain", exercise_benchmark_commands),
    CHECK_EXAMPLE: ("plain", exercise_check_config),
    CHECK_WITH_ENV: ("plain", exercise_check_config),
    LAUNCH: ("plain", exercise_launch),
    PROBES: ("plain", exercise_probes),
    WHEEL: ("plain", exercise_wheel),
    FAKE_UPSTREAM: ("plain", exercise_fake_upstream),
    RELAY_ON_FAKE: ("demo", lambda text, demo: None),  # started by the api_demo fixture
    CURL_CHAT: ("demo", exercise_curl),
    CURL_STREAM: ("demo", exercise_curl),
    DEBUG_LAUNCH: ("plain", exercise_debug_mode),
    DEBUG_CURL: ("plain", lambda text, tmp_path: None),  # run by exercise_debug_mode
}


@pytest.mark.parametrize("command", [
    pytest.param(c, marks=[pytest.mark.slow] if c == WHEEL else [])
    for c, (kind, _) in EXERCISED.items() if kind == "plain"
])
def test_documented_command_runs(command: str, tmp_path: Path) -> None:
    EXERCISED[command][1](command, tmp_path)


@pytest.mark.parametrize("command", [c for c, (kind, _) in EXERCISED.items() if kind == "demo"])
def test_documented_walkthrough_runs(command: str, api_demo: tuple[int, int, Path]) -> None:
    EXERCISED[command][1](command, api_demo)


def test_documented_sdk_example_runs(api_demo: tuple[int, int, Path]) -> None:
    exercise_sdk_example(api_demo)
