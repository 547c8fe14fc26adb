"""``python -m relay``: arguments, start line, config check, signals, workers."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from relay.testing.fake_upstream import ThreadedFakeUpstream
from tests.support import ROOT, free_port, start_relay_process, wait_for_port, write_config

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture(scope="module")
def upstream():
    with ThreadedFakeUpstream() as fake:
        yield fake


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ)
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "relay", *args], cwd=ROOT, env=full,
        capture_output=True, text=True, timeout=60,
    )


def test_check_config_valid_and_invalid(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("proxy:\n  target: http://127.0.0.1:9\n")
    result = _run(["--check-config", "--config", str(good)])
    assert result.returncode == 0
    assert "OK" in result.stdout

    bad = tmp_path / "bad.yaml"
    bad.write_text("ratelimit:\n  burst: 0\nproxy:\n  targett: x\n")
    result = _run(["--check-config", "--config", str(bad)])
    assert result.returncode != 0
    assert str(bad) in result.stderr
    assert "ratelimit.burst" in result.stderr
    assert "proxy.targett" in result.stderr

    missing = _run(["--check-config", "--config", str(tmp_path / "nope.yaml")])
    assert missing.returncode != 0 and "not found" in missing.stderr


def test_console_script_is_declared():
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert scripts["relay"] == "relay.cli:main"


def _get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path)
    resp = conn.getresponse()
    out = resp.status, resp.read()
    conn.close()
    return out


def test_start_line_port_flag_and_env_override(upstream):
    port = free_port()
    proc = start_relay_process(["--port", f"127.0.0.1:{port}"], env={"PROXY_TARGET": upstream.url,
                                                                     "RELAY_CONFIG": ""})
    try:
        wait_for_port(port, proc=proc)
        assert _get(port, "/healthz")[0] == 200
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/v1/chat/completions", json.dumps(CHAT))
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["model"] == CHAT["model"]
        conn.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    line = next(line for line in err.decode().splitlines() if "listening on" in line)
    assert f"127.0.0.1:{port}" in line
    assert upstream.url.replace("http://", "") in line
    assert "cache=memory" in line and "ratelimit=memory" in line
    assert "extensions=" in line


def test_sigterm_drains_an_in_flight_stream(upstream):
    port = free_port()
    path = write_config({"server": {"port": f"127.0.0.1:{port}", "shutdown_timeout": 20},
                         "proxy": {"target": upstream.url}, "cache": {"enabled": False}})
    proc = start_relay_process(["--config", path])
    try:
        wait_for_port(port, proc=proc)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        conn.request("POST", "/v1/chat/completions", json.dumps({**CHAT, "stream": True}),
                     {"x-fake-event-delay": "0.25", "x-fake-events": "8"})
        resp = conn.getresponse()
        assert resp.status == 200
        first = resp.readline()
        assert first.startswith(b"data:")
        proc.send_signal(signal.SIGTERM)
        rest = resp.read()
        conn.close()
        assert rest.rstrip().endswith(b"data: [DONE]")
        # New connections are refused while draining / after stop.
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.unlink(path)
    assert proc.returncode == 0


def test_two_workers_share_the_port(upstream):
    port = free_port()
    path = write_config({"server": {"port": f"127.0.0.1:{port}", "workers": 2},
                         "proxy": {"target": upstream.url}, "cache": {"enabled": False},
                         "ratelimit": {"enabled": False}})
    proc = start_relay_process(["--config", path])
    try:
        wait_for_port(port, proc=proc)
        deadline = time.monotonic() + 10
        # Both workers must have announced themselves.
        errors = []
        lines: list[str] = []

        def reader() -> None:
            assert proc.stderr is not None
            for raw in proc.stderr:
                lines.append(raw.decode(errors="replace"))

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        while time.monotonic() < deadline and sum("listening on" in x for x in lines) < 2:
            time.sleep(0.05)
        assert sum("listening on" in x for x in lines) == 2, lines
        for _ in range(20):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("POST", "/v1/chat/completions", json.dumps(CHAT))
            resp = conn.getresponse()
            if resp.status != 200:
                errors.append(resp.status)
            resp.read()
            conn.close()
        assert not errors
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        os.unlink(path)
    assert proc.returncode == 0


def test_usage_adds_up_across_workers_without_redis(upstream):
    port = free_port()
    path = write_config({"server": {"port": f"127.0.0.1:{port}", "workers": 2},
                         "proxy": {"target": upstream.url}, "cache": {"enabled": False},
                         "ratelimit": {"enabled": False}})
    proc = start_relay_process(["--config", path])
    try:
        wait_for_port(port, proc=proc)
        time.sleep(0.5)  # both workers listening
        for _ in range(30):  # fresh connections: the kernel spreads them over both
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("POST", "/v1/chat/completions", json.dumps(CHAT),
                         {"Authorization": "Bearer sk-workers"})
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
            conn.close()
        # Each worker writes its totals shortly after a change (0.5 s when
        # the machine is idle): wait, bounded, until every answer has them.
        answers: set[int] = set()
        for _ in range(300):
            answers = set()
            for _ in range(8):  # whichever worker answers gives the same sum
                status, body = _get(port, "/relay/usage")
                assert status == 200
                answers.add(json.loads(body)["totals"]["requests"])
            if answers == {30} or any(n > 30 for n in answers):
                break
            time.sleep(0.1)
        assert answers == {30}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        os.unlink(path)


@pytest.mark.parametrize("no_extensions", ["1", ""])
def test_pure_and_compiled_twins_serve_the_same(upstream, no_extensions):
    """The whole gateway on each implementation of relay._fast (cache key, bucket, breaker)."""
    port = free_port()
    path = write_config({"server": {"port": f"127.0.0.1:{port}"}, "proxy": {"target": upstream.url},
                         "cache": {"enabled": True}, "ratelimit": {"enabled": True, "burst": 3,
                                                                   "requests_per_second": 0.01}})
    proc = start_relay_process(["--config", path], env={"RELAY_NO_EXTENSIONS": no_extensions})
    try:
        wait_for_port(port, proc=proc)
        seen = []
        for body in (CHAT, {"messages": CHAT["messages"], "model": CHAT["model"]}, CHAT, CHAT):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Authorization": "Bearer sk-t"})
            resp = conn.getresponse()
            resp.read()
            seen.append((resp.status, resp.getheader("X-Relay-Cache")))
            conn.close()
        # Key order does not change the cache key; the bucket of 3 is then empty.
        assert seen == [(200, "MISS"), (200, "HIT"), (200, "HIT"), (429, "BYPASS")]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        os.unlink(path)
    expected = "extensions=pure" if no_extensions else "extensions=compiled"
    if not no_extensions and os.environ.get("RELAY_EXPECT_EXTENSIONS") != "1":
        expected = "extensions="  # not built here: either is fine
    assert expected in err.decode()


def test_command_line_overrides_are_not_mistaken_for_config_edits(upstream):
    """--port and --workers differ from the file; an untouched file must not reload."""
    port = free_port()
    path = write_config({"server": {"port": "127.0.0.1:1"}, "proxy": {"target": upstream.url}})
    proc = start_relay_process(["--config", path, "--port", f"127.0.0.1:{port}"])
    try:
        wait_for_port(port, proc=proc)
        time.sleep(2.0)  # the watcher polls every 0.5 s
        assert _get(port, "/healthz")[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        os.unlink(path)
    text = err.decode()
    assert "after a restart" not in text and "reloaded" not in text, text
