"""Virtual keys through real sockets: the admin API, the CLI, admission with
the official OpenAI and Anthropic SDKs, and every rejection code.

Relays run on the SQLite store (one file per test) unless a test says
otherwise; the Redis, multi-instance and crash cases are in
tests/test_keys_shared.py.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import openai
import pytest
import yaml

from relay.config import ConfigError, load_config
from relay.testing import ThreadedFakeUpstream
from tests.support import ROOT, RelayThread, make_config

ADMIN = "admin-secret-for-tests"
PRICES = {"gpt-4o-mini": {"input": 1.0, "output": 2.0}, "claude-3-haiku": {"input": 1.0, "output": 2.0}}
MESSAGES = [{"role": "user", "content": "hello there"}]


@pytest.fixture
def upstream(fake_upstream: ThreadedFakeUpstream) -> ThreadedFakeUpstream:
    fake_upstream.reset_stats()
    return fake_upstream


def keys_section(tmp_path: Any, **extra: Any) -> dict[str, Any]:
    return {"enabled": True, "admin_key": ADMIN, "path": str(tmp_path / "keys.db"), **extra}


@pytest.fixture
def relay_with_keys(
    upstream: ThreadedFakeUpstream, tmp_path: Any, request: pytest.FixtureRequest
) -> Iterator[Callable[..., RelayThread]]:
    started: list[RelayThread] = []

    def make(loop: str = "uvloop", **sections: Any) -> RelayThread:
        sections.setdefault("keys", keys_section(tmp_path))
        sections.setdefault("models", PRICES)
        sections.setdefault("circuit_breaker", {"enabled": False})
        sections.setdefault("server", {"shutdown_timeout": 2})
        relay = RelayThread(make_config(upstream.url, **sections), loop=loop)
        relay.start()
        started.append(relay)
        return relay

    yield make
    for relay in started:
        relay.stop()


def http_json(
    port: int, method: str, path: str, body: Any = None, token: str | None = ADMIN,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    sent = {"Content-Type": "application/json", **(headers or {})}
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    conn.request(method, path, data, sent)
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    parsed = json.loads(raw) if raw else None
    return resp.status, parsed, {k.lower(): v for k, v in resp.getheaders()}


def create_key(port: int, **fields: Any) -> dict[str, Any]:
    status, key, _ = http_json(port, "POST", "/relay/admin/keys", {"name": "app", **fields})
    assert status == 201, key
    return key


def show_key(port: int, key_id: str) -> dict[str, Any]:
    status, key, _ = http_json(port, "GET", f"/relay/admin/keys/{key_id}")
    assert status == 200, key
    return key


def until(check: Callable[[], Any], deadline: float = 10.0) -> Any:
    end = time.monotonic() + deadline
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > end:
            pytest.fail(f"not within {deadline} s")
        time.sleep(0.02)


def openai_client(relay: RelayThread, secret: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=relay.url + "/v1", api_key=secret, max_retries=0, timeout=20)


def chat(client: openai.OpenAI, model: str = "gpt-4o-mini", max_tokens: int = 5, **extra: Any) -> Any:
    return client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=max_tokens, **extra  # type: ignore[arg-type]
    )


def settled(relay: RelayThread, key_id: str, requests: int) -> dict[str, Any]:
    """The key once ``requests`` requests have been settled."""
    return until(lambda: (k := show_key(relay.port, key_id))["requests"] >= requests and k)


KEY_FIELDS = {
    "id", "name", "budget_usd", "budget_period", "rpm", "tpm", "models", "expires_at",
    "metadata", "created_at", "revoked", "spend_usd", "tokens", "requests",
}


# --------------------------------------------------------------------------- admin API


def test_keys_admin_api_round_trip(relay_with_keys):
    relay = relay_with_keys()
    port = relay.port
    assert http_json(port, "GET", "/relay/admin/keys")[:2] == (200, [])
    key = create_key(port, budget_usd=5, budget_period="monthly", rpm=60, tpm=10000,
                     models=["gpt-4o*"], expires_at="2099-01-01T00:00:00Z",
                     metadata={"team": "search"})
    assert set(key) == KEY_FIELDS | {"secret"}
    assert key["secret"].startswith("rk-") and len(key["secret"]) >= 35
    assert key["budget_usd"] == 5 and key["budget_period"] == "monthly"
    assert key["models"] == ["gpt-4o*"] and key["expires_at"] == "2099-01-01T00:00:00Z"
    assert key["spend_usd"] == 0 and key["tokens"] == {"prompt": 0, "completion": 0}
    assert key["revoked"] is False and key["metadata"] == {"team": "search"}

    status, listed, headers = http_json(port, "GET", "/relay/admin/keys")
    assert status == 200 and [k["id"] for k in listed] == [key["id"]]
    assert "secret" not in listed[0] and key["secret"] not in json.dumps(listed)
    assert headers["content-type"] == "application/json"
    shown = show_key(port, key["id"])
    assert set(shown) == KEY_FIELDS

    status, patched, _ = http_json(port, "PATCH", f"/relay/admin/keys/{key['id']}",
                                   {"rpm": None, "budget_usd": 7.5, "name": "renamed"})
    assert status == 200 and patched["rpm"] is None and patched["budget_usd"] == 7.5
    assert patched["name"] == "renamed" and patched["tpm"] == 10000

    status, rotated, _ = http_json(port, "POST", f"/relay/admin/keys/{key['id']}/rotate")
    assert status == 200 and rotated["secret"] != key["secret"] and rotated["id"] == key["id"]

    status, revoked, _ = http_json(port, "DELETE", f"/relay/admin/keys/{key['id']}")
    assert status == 200 and revoked["revoked"] is True
    assert show_key(port, key["id"])["revoked"] is True


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "a", "colour": "red"}, "colour"),
        ({"name": ["a"]}, "name"),
        ({"name": "a", "budget_usd": -0.01}, "budget_usd"),
        ({"name": "a", "budget_usd": "ten"}, "budget_usd"),
        ({"name": "a", "rpm": -5}, "rpm"),
        ({"name": "a", "tpm": "many"}, "tpm"),
        ({"name": "a", "budget_period": "hourly"}, "budget_period"),
        ({"name": "a", "expires_at": "soon"}, "expires_at"),
        ({"name": "a", "models": "gpt-4o"}, "models"),
        ({"budget_usd": 1}, "name"),
    ],
)
def test_keys_admin_api_bad_fields_are_400_naming_them(relay_with_keys, body, field):
    relay = relay_with_keys()
    status, error, _ = http_json(relay.port, "POST", "/relay/admin/keys", body)
    assert status == 400
    assert error["error"]["code"] == "invalid_request"
    assert error["error"]["type"] == "invalid_request_error"
    assert repr(field) in error["error"]["message"]
    # Nothing was created, and the same holds for an edit of an existing key.
    assert http_json(relay.port, "GET", "/relay/admin/keys")[1] == []
    key = create_key(relay.port)
    if field != "name":
        status, error, _ = http_json(relay.port, "PATCH", f"/relay/admin/keys/{key['id']}", body)
        assert status == 400 and repr(field) in error["error"]["message"]
    assert show_key(relay.port, key["id"])["budget_usd"] is None


def test_keys_admin_api_auth_unknown_ids_and_methods(relay_with_keys, tmp_path):
    relay = relay_with_keys()
    port = relay.port
    for token in (None, "wrong", ADMIN + "x"):
        status, error, _ = http_json(port, "GET", "/relay/admin/keys", token=token)
        assert status == 401 and error["error"]["code"] == "invalid_api_key"
    for method, path in (("GET", "/relay/admin/keys/key_nope"), ("PATCH", "/relay/admin/keys/key_nope"),
                         ("DELETE", "/relay/admin/keys/key_nope"),
                         ("POST", "/relay/admin/keys/key_nope/rotate")):
        status, error, _ = http_json(port, method, path, {"rpm": 5} if method == "PATCH" else None)
        assert status == 404 and error["error"]["code"] == "not_found", (method, path)
    status, error, headers = http_json(port, "PUT", "/relay/admin/keys")
    assert status == 405 and headers["allow"] == "GET, POST"
    status, error, _ = http_json(port, "POST", "/relay/admin/keys", b"{not json")
    assert status == 400 and error["error"]["code"] == "invalid_request"
    assert http_json(port, "GET", "/relay/admin/other")[0] == 404


def test_keys_admin_api_is_404_without_an_admin_key(relay_with_keys, tmp_path):
    relay = relay_with_keys(keys={"enabled": True, "path": str(tmp_path / "k.db")})
    for token in (None, "", "anything"):
        for path in ("/relay/admin/keys", "/relay/admin/keys/x", "/relay/admin"):
            status, error, _ = http_json(relay.port, "GET", path, token=token)
            assert status == 404 and error["error"]["code"] == "not_found"


# --------------------------------------------------------------------------- admission


def test_keys_created_by_api_work_with_both_sdks_and_spend_is_exact(relay_with_keys, upstream):
    relay = relay_with_keys()
    key = create_key(relay.port, budget_usd=10)
    reply = chat(openai_client(relay, key["secret"]))
    assert reply.usage is not None
    message = anthropic.Anthropic(base_url=relay.url, api_key=key["secret"], max_retries=0).messages.create(
        model="claude-3-haiku", max_tokens=8, messages=MESSAGES  # type: ignore[arg-type]
    )
    shown = settled(relay, key["id"], 2)
    prompt = reply.usage.prompt_tokens + message.usage.input_tokens
    completion = reply.usage.completion_tokens + message.usage.output_tokens
    assert shown["tokens"] == {"prompt": prompt, "completion": completion}
    assert shown["spend_usd"] == pytest.approx(prompt / 1000 * 1.0 + completion / 1000 * 2.0)
    # The relay key never reaches the provider, from either header.
    for recorded in upstream.requests:
        assert not any("rk-" in value for _, value in recorded.headers)
        assert recorded.header("authorization") is None and recorded.header("x-api-key") is None


def test_keys_missing_unknown_revoked_expired_are_401(relay_with_keys, upstream):
    relay = relay_with_keys()
    port = relay.port
    status, error, _ = http_json(port, "POST", "/v1/chat/completions",
                                 {"model": "gpt-4o-mini", "messages": MESSAGES}, token=None)
    assert status == 401 and error["error"]["code"] == "invalid_api_key"
    for secret in ("sk-provider-key", "rk-" + "x" * 43):
        with pytest.raises(openai.AuthenticationError) as caught:
            chat(openai_client(relay, secret))
        assert caught.value.code == "invalid_api_key"
        assert secret not in str(caught.value.body)
    revoked = create_key(port, name="gone")
    http_json(port, "DELETE", f"/relay/admin/keys/{revoked['id']}")
    expired = create_key(port, name="old", expires_at="2001-01-01T00:00:00Z")
    for key in (revoked, expired):
        with pytest.raises(openai.AuthenticationError):
            chat(openai_client(relay, key["secret"]))
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=relay.url, api_key=revoked["secret"], max_retries=0).messages.create(
            model="claude-3-haiku", max_tokens=8, messages=MESSAGES  # type: ignore[arg-type]
        )
    assert upstream.requests == []  # none of them went upstream


def test_keys_model_not_allowed_is_403(relay_with_keys, upstream):
    relay = relay_with_keys()
    key = create_key(relay.port, models=["gpt-4o*", "claude-3-*"])
    chat(openai_client(relay, key["secret"]), model="gpt-4o-mini")
    with pytest.raises(openai.PermissionDeniedError) as caught:
        chat(openai_client(relay, key["secret"]), model="o1-preview")
    assert caught.value.code == "model_not_allowed"
    assert len(upstream.requests) == 1


def test_keys_budget_exceeded_is_403_before_going_upstream(relay_with_keys, upstream):
    relay = relay_with_keys()
    # Each request reserves ~38 prompt + 5 output tokens (about $0.048) and
    # costs 2 prompt + 5 completion tokens ($0.012) at these prices.
    key = create_key(relay.port, budget_usd=0.1)
    client = openai_client(relay, key["secret"])
    answered = 0
    with pytest.raises(openai.PermissionDeniedError) as caught:
        for _ in range(10):
            chat(client)
            answered += 1
            settled(relay, key["id"], answered)
    assert caught.value.code == "budget_exceeded"
    assert caught.value.status_code == 403
    assert answered >= 2
    assert len(upstream.requests) == answered
    assert show_key(relay.port, key["id"])["spend_usd"] <= 0.1


def test_keys_rpm_is_429_with_openai_headers(relay_with_keys):
    relay = relay_with_keys()
    key = create_key(relay.port, rpm=2)
    client = openai_client(relay, key["secret"])
    chat(client)
    chat(client)
    status, error, headers = http_json(
        relay.port, "POST", "/v1/chat/completions",
        {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 5}, token=key["secret"],
    )
    assert status == 429 and error["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(headers["retry-after"]) <= 30
    assert headers["x-ratelimit-limit-requests"] == "2"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"].endswith("s")
    assert "x-ratelimit-limit-tokens" not in headers
    with pytest.raises(openai.RateLimitError):
        chat(client)


def test_keys_tpm_is_429_with_openai_headers(relay_with_keys, upstream):
    relay = relay_with_keys()
    key = create_key(relay.port, tpm=100)
    client = openai_client(relay, key["secret"])
    chat(client, max_tokens=30)  # reserves ~68 of 100, uses 7; 61 come back at the end
    settled(relay, key["id"], 1)
    status, error, headers = http_json(
        relay.port, "POST", "/v1/chat/completions",
        {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 60}, token=key["secret"],
    )
    assert status == 429 and error["error"]["code"] == "rate_limit_exceeded"
    assert headers["x-ratelimit-limit-tokens"] == "100"
    assert 0 <= int(headers["x-ratelimit-remaining-tokens"]) <= 100 - 7
    assert int(headers["retry-after"]) >= 1
    assert len(upstream.requests) == 1
    chat(client, max_tokens=5)  # a small one fits


def test_keys_cache_hits_cost_nothing_and_scope_is_the_key(relay_with_keys, upstream):
    relay = relay_with_keys(cache={"enabled": True})
    key = create_key(relay.port, budget_usd=1)
    other = create_key(relay.port, name="other")
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 5}
    first = http_json(relay.port, "POST", "/v1/chat/completions", body, token=key["secret"])
    assert first[2]["x-relay-cache"] == "MISS"
    spend = settled(relay, key["id"], 1)["spend_usd"]
    assert spend > 0
    hit = http_json(relay.port, "POST", "/v1/chat/completions", body, token=key["secret"])
    assert hit[2]["x-relay-cache"] == "HIT" and hit[1] == first[1]
    assert settled(relay, key["id"], 2)["spend_usd"] == spend
    # Another key never gets this key's cached answer.
    assert http_json(relay.port, "POST", "/v1/chat/completions", body,
                     token=other["secret"])[2]["x-relay-cache"] == "MISS"
    # A rotated secret is the same caller: its cache entries stay.
    rotated = http_json(relay.port, "POST", f"/relay/admin/keys/{key['id']}/rotate")[1]
    assert http_json(relay.port, "POST", "/v1/chat/completions", body,
                     token=rotated["secret"])[2]["x-relay-cache"] == "HIT"
    assert len(upstream.requests) == 2


def test_keys_usage_log_and_metrics_name_keys_never_secrets(relay_with_keys):
    relay = relay_with_keys()
    key = create_key(relay.port, name="billing-app", models=["gpt-*"])
    chat(openai_client(relay, key["secret"]))
    with pytest.raises(openai.PermissionDeniedError):
        chat(openai_client(relay, key["secret"]), model="claude-3-haiku")
    with pytest.raises(openai.AuthenticationError):
        chat(openai_client(relay, "rk-unknown-secret-value-0123456789abcdef"))
    settled(relay, key["id"], 1)
    usage = http_json(relay.port, "GET", "/relay/usage", token=None)[1]
    assert "billing-app" in usage["keys"]
    conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    assert 'relay_key_spend_usd_total{key="billing-app"}' in text
    assert 'relay_key_rejected_total{key="billing-app",reason="model"} 1.0' in text
    assert 'relay_key_rejected_total{key="unknown",reason="invalid"} 1.0' in text
    assert key["secret"] not in text and "rk-unknown" not in text
    assert key["secret"] not in json.dumps(usage)


def test_keys_spend_survives_a_restart(upstream, tmp_path):
    config = make_config(upstream.url, keys=keys_section(tmp_path), models=PRICES)
    with RelayThread(config) as relay:
        key = create_key(relay.port, budget_usd=1)
        for _ in range(3):
            chat(openai_client(relay, key["secret"]))
        before = settled(relay, key["id"], 3)
    with RelayThread(config, loop="asyncio") as relay:
        after = show_key(relay.port, key["id"])
        assert after == before
        chat(openai_client(relay, key["secret"]))  # the same secret still works
        assert settled(relay, key["id"], 4)["spend_usd"] > before["spend_usd"]


def test_keys_reservation_held_in_flight_refuses_what_would_overspend(relay_with_keys, upstream):
    relay = relay_with_keys()
    # Room for one reservation ($0.048) at a time, and for a second request
    # once the first is settled at its exact cost ($0.012).
    key = create_key(relay.port, budget_usd=0.07)
    import threading

    result: list[Any] = []
    slow = threading.Thread(target=lambda: result.append(
        chat(openai_client(relay, key["secret"]), extra_headers={"x-fake-delay": "0.5"})))
    slow.start()
    until(lambda: len(upstream.requests) == 1)
    with pytest.raises(openai.PermissionDeniedError) as caught:
        chat(openai_client(relay, key["secret"]))
    assert caught.value.code == "budget_exceeded"
    slow.join(20)
    assert result and result[0].usage is not None
    settled(relay, key["id"], 1)
    chat(openai_client(relay, key["secret"]))
    assert settled(relay, key["id"], 2)["spend_usd"] == pytest.approx(0.024)


def test_keys_client_gone_before_send_releases_its_reservation(relay_with_keys, upstream):
    import socket

    from tests.support import unanswered_port

    with unanswered_port() as port:
        relay = relay_with_keys(
            routes=[{"model": "slow-*", "target": f"http://127.0.0.1:{port}"}],
            proxy={"target": upstream.url, "connect_timeout": 1},
            models={**PRICES, "slow-model": {"input": 1.0, "output": 2.0}},
        )
        key = create_key(relay.port, budget_usd=0.07)  # one reservation at a time
        body = json.dumps({"model": "slow-model", "messages": MESSAGES, "max_tokens": 5}).encode()
        with socket.create_connection(("127.0.0.1", relay.port)) as gone:
            gone.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                b"Authorization: Bearer " + key["secret"].encode() + b"\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
                + body
            )
            time.sleep(0.2)  # admitted, now waiting for the upstream's connect
        shown = settled(relay, key["id"], 1)
        assert shown["spend_usd"] == 0 and shown["tokens"] == {"prompt": 0, "completion": 0}
        # Its reservation is back: the whole budget is free for the next one.
        chat(openai_client(relay, key["secret"]))


# --------------------------------------------------------------------------- CLI


def run_cli(*args: str, config: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RELAY_CONFIG": config}
    return subprocess.run([sys.executable, "-m", "relay", "keys", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_keys_cli_manages_the_store_relay_uses(upstream, tmp_path):
    path = str(tmp_path / "relay.yaml")
    data = {"proxy": {"target": upstream.url}, "keys": keys_section(tmp_path),
            "cache": {"enabled": False}, "ratelimit": {"enabled": False}, "models": PRICES,
            "server": {"port": "127.0.0.1:0"}}
    with open(path, "w") as f:
        yaml.safe_dump(data, f)
    made = run_cli("create", "--name", "cli-app", "--budget-usd", "2", "--budget-period", "daily",
                   "--rpm", "100", "--tpm", "10000", "--models", "gpt-4o*,claude-*",
                   "--expires-at", "2099-06-01T00:00:00Z", config=path)
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)
    assert set(key) == KEY_FIELDS | {"secret"}
    assert key["models"] == ["gpt-4o*", "claude-*"] and key["budget_period"] == "daily"

    with RelayThread(load_config(path, env={})) as relay:
        chat(openai_client(relay, key["secret"]))
        settled(relay, key["id"], 1)
        listed = run_cli("--config", path, "list", config="")
        assert listed.returncode == 0 and [k["id"] for k in json.loads(listed.stdout)] == [key["id"]]
        shown = json.loads(run_cli("show", key["id"], config=path).stdout)
        assert shown["requests"] == 1 and shown["spend_usd"] > 0 and "secret" not in shown
        updated = run_cli("update", key["id"], "--rpm", "none", "--budget-usd", "3", config=path)
        assert updated.returncode == 0 and json.loads(updated.stdout)["rpm"] is None
        rotated = json.loads(run_cli("rotate", key["id"], config=path).stdout)
        # Within a second the running relay refuses the old secret.
        until(lambda: _refused(relay, key["secret"]), 2.0)
        chat(openai_client(relay, rotated["secret"]))
        revoked = run_cli("revoke", key["id"], config=path)
        assert revoked.returncode == 0 and json.loads(revoked.stdout)["revoked"] is True
        until(lambda: _refused(relay, rotated["secret"]), 2.0)

    for args, needle in (
        (("create", "--name", "x", "--budget-usd", "-1"), "budget-usd"),
        (("create", "--name", "x", "--rpm", "ten"), "rpm"),
        (("create", "--name", "x", "--budget-period", "yearly"), "budget-period"),
        (("create", "--name", "x", "--expires-at", "whenever"), "expires-at"),
        (("show", "key_missing"), "key_missing"),
        (("update", key["id"]), "at least one"),
    ):
        bad = run_cli(*args, config=path)
        assert bad.returncode != 0 and needle in bad.stderr, (args, bad.stderr)
        assert bad.stdout == ""
    missing = run_cli("--config", str(tmp_path / "nope.yaml"), "list", config="")
    assert missing.returncode != 0 and "not found" in missing.stderr


def _refused(relay: RelayThread, secret: str) -> bool:
    try:
        chat(openai_client(relay, secret))
    except openai.AuthenticationError:
        return True
    return False


# --------------------------------------------------------------------------- config


def test_keys_config_is_validated_at_load(tmp_path):
    def problems(data: dict[str, Any], env: dict[str, str] | None = None) -> str:
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(ConfigError) as caught:
            load_config(str(path), env=env or {})
        return str(caught.value)

    assert "keys.store" in problems({"keys": {"store": "postgres"}})
    assert "keys.store: redis needs redis.enabled" in problems({"keys": {"store": "redis"}})
    assert "keys.default_reserve_tokens" in problems({"keys": {"default_reserve_tokens": -1}})
    assert "keys.admin_key" in problems({"keys": {"admin_key": 12345}})
    assert "keys.static[0].secret_sha256" in problems(
        {"keys": {"static": [{"id": "k1", "name": "a", "secret_sha256": "abc"}]}})
    assert "keys.static[0].secret_sha256: missing" in problems(
        {"keys": {"static": [{"id": "k1", "name": "a"}]}})
    assert "keys.static[0].rpm" in problems(
        {"keys": {"static": [{"id": "k1", "name": "a", "secret_sha256": "a" * 64, "rpm": -3}]}})
    assert "keys.static[1].id: duplicate" in problems({"keys": {"static": [
        {"id": "k1", "name": "a", "secret_sha256": "a" * 64},
        {"id": "k1", "name": "b", "secret_sha256": "b" * 64}]}})
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump({"keys": {"enabled": True, "static": [
        {"id": "k1", "name": "a", "secret_sha256": "A" * 64, "budget_usd": 3,
         "budget_period": "weekly", "models": ["gpt-*"], "metadata": {"team": "x"}}]}}))
    config = load_config(str(path), env={"KEYS_ADMIN_KEY": "from-env"})
    assert config.keys.admin_key == "from-env" and "from-env" not in repr(config)
    static = config.keys.static[0]
    assert static.secret_sha256 == "a" * 64 and static.models == ("gpt-*",)


def test_keys_store_that_cannot_be_opened_stops_start(upstream, tmp_path):
    path = tmp_path / "relay.yaml"
    bad = tmp_path / "no-such-dir" / "keys.db"
    path.write_text(yaml.safe_dump({"proxy": {"target": upstream.url},
                                    "keys": {"enabled": True, "path": str(bad)}}))
    result = subprocess.run([sys.executable, "-m", "relay", "--config", str(path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert str(bad) in result.stderr and "cannot open the key store" in result.stderr


def test_keys_static_keys_apply_on_hot_reload(upstream, tmp_path):
    import hashlib

    secret = "rk-static-secret-for-the-reload-test-000000"
    path = str(tmp_path / "relay.yaml")
    base = {"server": {"port": "127.0.0.1:0", "shutdown_timeout": 2},
            "proxy": {"target": upstream.url}, "cache": {"enabled": False},
            "ratelimit": {"enabled": False}, "models": PRICES, "keys": keys_section(tmp_path)}

    def write(data: dict[str, Any]) -> None:
        with open(path + ".new", "w") as f:
            yaml.safe_dump(data, f)
        os.replace(path + ".new", path)

    write(base)
    with RelayThread(load_config(path, env={})) as relay:
        assert _refused(relay, secret)
        static = {"id": "static-app", "name": "static-app",
                  "secret_sha256": hashlib.sha256(secret.encode()).hexdigest(), "rpm": 1000,
                  "models": ["gpt-*"]}
        write({**base, "keys": {**base["keys"], "static": [static]}})
        until(lambda: not _refused(relay, secret), 5.0)
        shown = show_key(relay.port, "static-app")
        assert shown["rpm"] == 1000 and shown["models"] == ["gpt-*"]
        # Declared in the file: changed there, not through the API.
        status, error, _ = http_json(relay.port, "PATCH", "/relay/admin/keys/static-app", {"rpm": 5})
        assert status == 400 and "'id'" in error["error"]["message"]
        write(base)  # removed from the file: revoked
        until(lambda: _refused(relay, secret), 5.0)
        assert show_key(relay.port, "static-app")["revoked"] is True


def test_keys_request_log_names_the_key(relay_with_keys, capfd):
    relay = relay_with_keys(log={"requests": True})
    key = create_key(relay.port, name="logged-app")
    chat(openai_client(relay, key["secret"]))
    settled(relay, key["id"], 1)
    seen: list[str] = []

    def logged() -> list[dict[str, Any]]:  # the log is written in batches
        seen.append(capfd.readouterr().err)
        lines = [json.loads(line) for line in "".join(seen).splitlines()
                 if line.startswith("{") and '"status"' in line]
        return [e for e in lines if e.get("path") == "/v1/chat/completions"]

    (entry,) = until(logged)
    lines = logged()
    assert entry["key"] == "logged-app" and entry["status"] == 200
    assert key["secret"] not in json.dumps(lines)


def test_keys_provider_sees_only_the_configured_provider_key(relay_with_keys, upstream):
    relay = relay_with_keys(
        proxy={"target": upstream.url, "api_key": "sk-provider-openai"},
        routes=[{"path": "/v1/messages", "target": upstream.url, "api_key": "sk-ant-provider",
                 "auth": "x-api-key"}],
    )
    key = create_key(relay.port)
    chat(openai_client(relay, key["secret"]))
    anthropic.Anthropic(base_url=relay.url, api_key=key["secret"], max_retries=0).messages.create(
        model="claude-3-haiku", max_tokens=8, messages=MESSAGES  # type: ignore[arg-type]
    )
    openai_req, anthropic_req = upstream.requests
    assert openai_req.header("authorization") == "Bearer sk-provider-openai"
    assert openai_req.header("x-api-key") is None
    assert anthropic_req.header("x-api-key") == "sk-ant-provider"
    assert anthropic_req.header("authorization") is None
    for recorded in upstream.requests:
        assert not any(key["secret"] in value or "rk-" in value for _, value in recorded.headers)


def test_keys_reservation_reads_each_apis_output_limit(relay_with_keys):
    relay = relay_with_keys()
    key = create_key(relay.port, tpm=400)
    big, small = 1000, 10  # a reservation over the whole tpm can never fit: 429, Retry-After 60
    cases = [
        ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": MESSAGES}, "max_completion_tokens"),
        ("/v1/responses", {"model": "gpt-4o-mini", "input": "hello there"}, "max_output_tokens"),
        ("/v1/messages", {"model": "claude-3-haiku", "messages": MESSAGES}, "max_tokens"),
    ]
    for path, body, field in cases:
        status, error, headers = http_json(relay.port, "POST", path, {**body, field: big},
                                           token=key["secret"])
        assert status == 429 and headers["retry-after"] == "60", (path, error)
        status, _, _ = http_json(relay.port, "POST", path, {**body, field: small},
                                 token=key["secret"])
        assert status != 429, path
    # Without any limit the default reservation (4096 output tokens) applies.
    status, _, headers = http_json(relay.port, "POST", "/v1/chat/completions",
                                   {"model": "gpt-4o-mini", "messages": MESSAGES}, token=key["secret"])
    assert status == 429 and headers["retry-after"] == "60"


def test_keys_static_key_is_valid_from_the_first_request(upstream, tmp_path):
    """A key declared in the file answers the very first request after start:
    the launcher's socket may accept before the static keys are written, so a
    worker serves only once they are in the store."""
    import hashlib

    from tests.support import free_port, start_relay_process, wait_for_port

    secret = "rk-static-secret-for-the-first-request-0000"
    static = {"id": "boot-app", "name": "boot-app",
              "secret_sha256": hashlib.sha256(secret.encode()).hexdigest()}
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump({
        "server": {"shutdown_timeout": 2}, "proxy": {"target": upstream.url},
        "cache": {"enabled": False}, "ratelimit": {"enabled": False}, "models": PRICES,
        "keys": keys_section(tmp_path, static=[static])}))
    port = free_port()
    proc = start_relay_process(["--config", str(path), "--port", f"127.0.0.1:{port}"])
    try:
        wait_for_port(port, 30, proc)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=secret,
                               max_retries=0, timeout=20)
        assert chat(client).choices[0].message.content
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
