"""Configuration: defaults, YAML, environment overrides, validation, reload."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import pathlib
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop
import yaml

from relay.config import (
    ENV_KEYS,
    RESTART_KEYS,
    BreakerConfig,
    CacheConfig,
    Config,
    ConfigError,
    LogConfig,
    ModelPrice,
    Problem,
    ProxyConfig,
    RateLimitConfig,
    RedisConfig,
    Route,
    ServerConfig,
    check_config,
    keep_restart_values,
    known_keys,
    load_config,
    parse_listen_address,
    resolve_config_path,
    restart_changes,
)
from relay.configwatch import ConfigWatcher

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "configs" / "config.example.yaml"
SECRET = "s3cr3t-hunter2"


def write(tmp_path: pathlib.Path, text: str, name: str = "relay.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def problems_of(path: str | None, env: dict[str, str] | None = None) -> list[Problem]:
    with pytest.raises(ConfigError) as info:
        load_config(path, env or {})
    return info.value.problems


def only_problem(path: str | None, env: dict[str, str] | None = None) -> Problem:
    problems = problems_of(path, env)
    assert len(problems) == 1, problems
    return problems[0]


# --------------------------------------------------------------------------
# Defaults and merging


def test_defaults_match_the_contract() -> None:
    config = load_config(None, {})
    assert config == Config()
    assert config.source is None
    assert config.server == ServerConfig(
        host="",
        port=8080,
        workers=1,
        max_body_bytes=10485760,
        max_header_bytes=65536,
        header_timeout=10,
        idle_timeout=75,
        shutdown_timeout=30,
    )
    assert config.proxy == ProxyConfig("https://api.openai.com", 10, 600, 64)
    assert config.routes == ()
    assert config.cache == CacheConfig(True, 3600, 10000, 1048576, "api_key")
    assert config.ratelimit == RateLimitConfig(True, 10.0, 20, "api_key")
    assert config.circuit_breaker == BreakerConfig(True, 5, 30)
    assert config.redis == RedisConfig(False, "localhost:6379", "", 0, 0.25)
    assert dict(config.models) == {}
    assert config.log == LogConfig("info", False)


def test_config_objects_are_frozen_and_read_only() -> None:
    config = load_config(None, {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.cache.ttl = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.models["x"] = ModelPrice(1, 1)  # type: ignore[index]
    assert not hasattr(config.server, "__dict__")  # slots


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n"])
def test_empty_file_means_defaults(tmp_path: pathlib.Path, text: str) -> None:
    path = write(tmp_path, text)
    assert load_config(path, {}) == dataclasses.replace(Config(), source=path)


def test_file_is_merged_over_defaults(tmp_path: pathlib.Path) -> None:
    path = write(
        tmp_path,
        "cache:\n  ttl: 60\nratelimit:\n  burst: 3\nredis:\nlog:\n  level: DEBUG\n",
    )
    config = load_config(path, {})
    assert config.cache == CacheConfig(ttl=60.0)
    assert isinstance(config.cache.ttl, float)
    assert config.ratelimit == RateLimitConfig(burst=3)
    assert config.redis == RedisConfig()  # empty section: defaults
    assert config.log.level == "debug"
    assert config.source == path


@pytest.mark.parametrize(
    ("value", "host", "port"),
    [
        ('":8080"', "", 8080),
        ('"127.0.0.1:9000"', "127.0.0.1", 9000),
        ('"0.0.0.0:80"', "0.0.0.0", 80),
        ('"[::1]:8081"', "::1", 8081),
        ('"localhost:1"', "localhost", 1),
        ("8080", "", 8080),
        ('"8080"', "", 8080),
        ("0", "", 0),
        ('":65535"', "", 65535),
    ],
)
def test_server_port_forms(tmp_path: pathlib.Path, value: str, host: str, port: int) -> None:
    config = load_config(write(tmp_path, f"server:\n  port: {value}\n"), {})
    assert (config.server.host, config.server.port) == (host, port)


@pytest.mark.parametrize(
    "value", ['"::1:8080"', '"abc"', "70000", '":"', "true", '"[::1]8080"', "-1"]
)
def test_server_port_rejects(tmp_path: pathlib.Path, value: str) -> None:
    path = write(tmp_path, f"server:\n  port: {value}\n")
    problem = only_problem(path)
    assert problem.key == "server.port"
    assert problem.file == path


def test_parse_listen_address_for_the_cli() -> None:
    assert parse_listen_address(":9000") == ("", 9000)
    assert parse_listen_address("127.0.0.1:9000") == ("127.0.0.1", 9000)
    with pytest.raises(ValueError, match="0..65535"):
        parse_listen_address(":99999")


# --------------------------------------------------------------------------
# Environment overrides


@pytest.mark.parametrize(
    ("env", "attribute", "expected"),
    [
        ({"SERVER_PORT": "9000"}, ("server", "port"), 9000),
        ({"SERVER_PORT": "127.0.0.1:9001"}, ("server", "host"), "127.0.0.1"),
        ({"SERVER_WORKERS": "4"}, ("server", "workers"), 4),
        ({"SERVER_MAX_BODY_BYTES": " 2048 "}, ("server", "max_body_bytes"), 2048),
        ({"SERVER_HEADER_TIMEOUT": "2.5"}, ("server", "header_timeout"), 2.5),
        ({"PROXY_TARGET": "http://127.0.0.1:9999/"}, ("proxy", "target"), "http://127.0.0.1:9999"),
        ({"PROXY_POOL_SIZE": "8"}, ("proxy", "pool_size"), 8),
        ({"CACHE_ENABLED": "false"}, ("cache", "enabled"), False),
        ({"CACHE_TTL": "5"}, ("cache", "ttl"), 5.0),
        ({"CACHE_SCOPE": "GLOBAL"}, ("cache", "scope"), "global"),
        ({"RATELIMIT_REQUESTS_PER_SECOND": "2.5"}, ("ratelimit", "requests_per_second"), 2.5),
        ({"RATELIMIT_KEY": "ip"}, ("ratelimit", "key"), "ip"),
        ({"CIRCUIT_BREAKER_FAILURE_THRESHOLD": "9"}, ("circuit_breaker", "failure_threshold"), 9),
        ({"CIRCUIT_BREAKER_ENABLED": "off"}, ("circuit_breaker", "enabled"), False),
        ({"CIRCUIT_BREAKER_RECOVERY_TIMEOUT": "1.5"}, ("circuit_breaker", "recovery_timeout"), 1.5),
        ({"REDIS_ADDRESS": "redis:6380"}, ("redis", "address"), "redis:6380"),
        ({"REDIS_PASSWORD": SECRET}, ("redis", "password"), SECRET),
        ({"REDIS_DB": "3"}, ("redis", "db"), 3),
        ({"REDIS_ENABLED": "YES"}, ("redis", "enabled"), True),
        ({"LOG_LEVEL": "Warn"}, ("log", "level"), "warning"),
        ({"LOG_REQUESTS": "1"}, ("log", "requests"), True),
    ],
)
def test_env_overrides_parse_to_the_key_type(
    env: dict[str, str], attribute: tuple[str, str], expected: Any
) -> None:
    config = load_config(None, env)
    value = getattr(getattr(config, attribute[0]), attribute[1])
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [(t, True) for t in ("true", "TRUE", "1", "yes", "On")]
    + [(t, False) for t in ("false", "False", "0", "no", "OFF")],
)
def test_env_booleans(text: str, expected: bool) -> None:
    assert load_config(None, {"RATELIMIT_ENABLED": text}).ratelimit.enabled is expected


def test_env_wins_over_the_file(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, 'server:\n  port: ":8080"\ncache:\n  ttl: 60\n  enabled: true\n')
    config = load_config(path, {"SERVER_PORT": ":9090", "CACHE_ENABLED": "0"})
    assert config.server.port == 9090
    assert config.cache.enabled is False
    assert config.cache.ttl == 60.0  # untouched by the environment


def test_env_names_cover_every_scalar_key() -> None:
    expected = {f"{s}_{k}".upper() for s, k in (key.split(".") for key in known_keys())}
    assert set(ENV_KEYS) == expected
    assert ENV_KEYS["CIRCUIT_BREAKER_FAILURE_THRESHOLD"] == ("circuit_breaker", "failure_threshold")
    # Every dataclass field of every section is reachable through some key.
    covered = {tuple(k.split(".")) for k in known_keys()} | {("server", "host")}
    for section, cls in [
        ("server", ServerConfig),
        ("proxy", ProxyConfig),
        ("cache", CacheConfig),
        ("ratelimit", RateLimitConfig),
        ("circuit_breaker", BreakerConfig),
        ("redis", RedisConfig),
        ("log", LogConfig),
    ]:
        for f in dataclasses.fields(cls):
            assert (section, f.name) in covered


def test_unrelated_env_vars_are_ignored() -> None:
    env = {
        "CACHE_COLOR": "blue",
        "CIRCUIT_X": "1",
        "CIRCUIT_BREAKER_BOGUS": "x",
        "SERVER": "x",
        "REDIS_URL": "redis://x",
        "PATH": "/usr/bin",
        "server_port": "1",  # lower case is not ours
    }
    assert load_config(None, env) == Config()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CACHE_ENABLED", "maybe"),
        ("CACHE_TTL", "soon"),
        ("CACHE_TTL", "nan"),
        ("SERVER_WORKERS", "2.5"),
        ("SERVER_WORKERS", ""),
        ("SERVER_PORT", "http"),
        ("RATELIMIT_BURST", "0"),
        ("CIRCUIT_BREAKER_FAILURE_THRESHOLD", "-1"),
        ("LOG_LEVEL", "loud"),
        ("PROXY_TARGET", "ftp://x"),
    ],
)
def test_bad_env_value_is_an_error_naming_the_variable(name: str, value: str) -> None:
    problem = only_problem(None, {name: value})
    assert problem.file == f"${name}"
    section, key = ENV_KEYS[name]
    assert problem.key == f"{section}.{key}"
    assert str(problem).startswith(f"${name}: {section}.{key}: ")


# --------------------------------------------------------------------------
# Validation


def test_problem_text_names_file_key_and_reason(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "ratelimit:\n  burst: 0\n")
    problem = only_problem(path)
    assert problem == Problem(path, "ratelimit.burst", "must be >= 1, got 0")
    assert str(problem) == f"{path}: ratelimit.burst: must be >= 1, got 0"


def test_unknown_section_and_key_suggest_the_right_name(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "cahce:\n  ttl: 1\nratelimit:\n  brust: 3\nlogging:\n  level: info\n")
    text = [str(p) for p in problems_of(path)]
    assert f"{path}: cahce: unknown section (did you mean 'cache'?)" in text
    assert f"{path}: ratelimit.brust: unknown key (did you mean 'burst'?)" in text
    assert f"{path}: logging: unknown section (did you mean 'log'?)" in text


def test_unknown_names_without_a_close_match(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "zzz: 1\ncache:\n  qqqq: 1\n")
    text = [str(p) for p in problems_of(path)]
    assert text == [f"{path}: zzz: unknown section", f"{path}: cache.qqqq: unknown key"]


def test_server_host_points_at_port(tmp_path: pathlib.Path) -> None:
    problem = only_problem(write(tmp_path, "server:\n  host: 127.0.0.1\n"))
    assert problem.key == "server.host"
    assert "server.port" in problem.reason


@pytest.mark.parametrize(
    ("yaml_text", "key", "reason"),
    [
        ("cache:\n  enabled: 1\n", "cache.enabled", "must be true or false, got 1"),
        ('cache:\n  enabled: "yes"\n', "cache.enabled", "must be true or false, got 'yes'"),
        ("cache:\n  ttl: fast\n", "cache.ttl", "must be a number, got 'fast'"),
        ("cache:\n  ttl: true\n", "cache.ttl", "must be a number, got true"),
        ("cache:\n  ttl: .inf\n", "cache.ttl", "must be a finite number, got inf"),
        ("cache:\n  ttl:\n", "cache.ttl", "has no value (remove the key to use the default)"),
        ("cache:\n  max_entries: 1.5\n", "cache.max_entries", "must be an integer, got 1.5"),
        ("cache:\n  max_entries: [1]\n", "cache.max_entries", "must be an integer, got a list"),
        ("proxy:\n  target: 5\n", "proxy.target", "must be a string (quote it), got 5"),
        ("cache: [1, 2]\n", "cache", "must be a mapping, got a list"),
    ],
)
def test_wrong_types(tmp_path: pathlib.Path, yaml_text: str, key: str, reason: str) -> None:
    path = write(tmp_path, yaml_text)
    assert only_problem(path) == Problem(path, key, reason)


@pytest.mark.parametrize(
    ("section", "key", "value", "reason"),
    [
        ("server", "workers", 0, "must be >= 1, got 0"),
        ("server", "max_body_bytes", 0, "must be > 0, got 0"),
        ("server", "max_header_bytes", -5, "must be > 0, got -5"),
        ("server", "header_timeout", 0, "must be > 0, got 0.0"),
        ("server", "idle_timeout", -1, "must be > 0, got -1.0"),
        ("server", "shutdown_timeout", 0, "must be > 0, got 0.0"),
        ("server", "port", 65536, "port must be 0..65535, got 65536"),
        ("proxy", "connect_timeout", 0, "must be > 0, got 0.0"),
        ("proxy", "read_timeout", 0, "must be > 0, got 0.0"),
        ("proxy", "pool_size", 0, "must be > 0, got 0"),
        ("cache", "ttl", 0, "must be > 0, got 0.0"),
        ("cache", "max_entries", 0, "must be > 0, got 0"),
        ("cache", "max_body_bytes", 0, "must be > 0, got 0"),
        ("ratelimit", "requests_per_second", 0, "must be > 0, got 0.0"),
        ("ratelimit", "burst", 0, "must be >= 1, got 0"),
        ("circuit_breaker", "failure_threshold", 0, "must be >= 1, got 0"),
        ("circuit_breaker", "recovery_timeout", 0, "must be > 0, got 0.0"),
        ("redis", "db", -1, "must be >= 0, got -1"),
        ("redis", "timeout", 0, "must be > 0, got 0.0"),
    ],
)
def test_out_of_range(
    tmp_path: pathlib.Path, section: str, key: str, value: int, reason: str
) -> None:
    path = write(tmp_path, f"{section}:\n  {key}: {value}\n")
    assert only_problem(path) == Problem(path, f"{section}.{key}", reason)


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("server", "workers", 1, 1),
        ("server", "port", 0, 0),
        ("redis", "db", 0, 0),
        ("ratelimit", "burst", 1, 1),
        ("ratelimit", "requests_per_second", 0.01, 0.01),
        ("circuit_breaker", "failure_threshold", 1, 1),
    ],
)
def test_range_edges_accepted(
    tmp_path: pathlib.Path, section: str, key: str, value: Any, expected: Any
) -> None:
    config = load_config(write(tmp_path, f"{section}:\n  {key}: {value}\n"), {})
    assert getattr(getattr(config, section), key) == expected


@pytest.mark.parametrize(
    ("key", "value", "expected_text"),
    [
        (
            "cache.scope",
            "globl",
            "must be one of api_key | global, got 'globl' (did you mean 'global'?)",
        ),
        ("ratelimit.key", "user", "must be one of api_key | ip | global, got 'user'"),
        ("log.level", "verbose", "must be one of debug | info | warning | error, got 'verbose'"),
    ],
)
def test_enums(tmp_path: pathlib.Path, key: str, value: str, expected_text: str) -> None:
    section, name = key.split(".")
    path = write(tmp_path, f"{section}:\n  {name}: {value}\n")
    assert only_problem(path) == Problem(path, key, expected_text)


@pytest.mark.parametrize(
    ("target", "normalized"),
    [
        ("https://api.openai.com", "https://api.openai.com"),
        ("https://api.openai.com/", "https://api.openai.com"),
        ("HTTP://LocalHost:8000", "http://localhost:8000"),
        ("http://[::1]:8000", "http://[::1]:8000"),
    ],
)
def test_targets_are_normalized(tmp_path: pathlib.Path, target: str, normalized: str) -> None:
    config = load_config(write(tmp_path, f'proxy:\n  target: "{target}"\n'), {})
    assert config.proxy.target == normalized


@pytest.mark.parametrize(
    ("target", "reason_part"),
    [
        ("ftp://example.com", "http:// or https://"),
        ("api.openai.com", "http:// or https://"),
        ("https://", "http:// or https://"),
        ("https://api.openai.com/v1", "must not have a path"),
        ("https://api.openai.com?x=1", "query"),
        ("https://api.openai.com:99999", "invalid port"),
        ("https://a b.com", "http:// or https://"),
    ],
)
def test_bad_targets(tmp_path: pathlib.Path, target: str, reason_part: str) -> None:
    path = write(tmp_path, f'proxy:\n  target: "{target}"\n')
    problem = only_problem(path)
    assert problem.key == "proxy.target"
    assert reason_part in problem.reason


def test_routes(tmp_path: pathlib.Path) -> None:
    path = write(
        tmp_path,
        "routes:\n"
        '  - {model: "claude-*", target: "https://api.anthropic.com/"}\n'
        '  - {path: "/v1/messages", target: "https://api.anthropic.com"}\n'
        '  - {model: "llama*", path: "/v1/chat", target: "http://127.0.0.1:8001"}\n',
    )
    assert load_config(path, {}).routes == (
        Route("https://api.anthropic.com", model="claude-*"),
        Route("https://api.anthropic.com", path="/v1/messages"),
        Route("http://127.0.0.1:8001", model="llama*", path="/v1/chat"),
    )


@pytest.mark.parametrize(
    ("routes_yaml", "key", "reason_part"),
    [
        ('  - {model: "x*"}\n', "routes[0].target", "missing"),
        ('  - {target: "http://a"}\n', "routes[0]", "needs model, path or both"),
        ('  - {path: "v1", target: "http://a"}\n', "routes[0].path", 'starting with "/"'),
        ('  - {path: "/v1?x", target: "http://a"}\n', "routes[0].path", "no query"),
        ('  - {model: "", target: "http://a"}\n', "routes[0].model", "non-empty glob"),
        ('  - {model: "x", target: "http://a/v1"}\n', "routes[0].target", "must not have a path"),
        ('  - {modle: "x", path: "/", target: "http://a"}\n', "routes[0].modle", "'model'"),
        ('  - "http://a"\n', "routes[0]", "must be a mapping"),
    ],
)
def test_bad_routes(tmp_path: pathlib.Path, routes_yaml: str, key: str, reason_part: str) -> None:
    path = write(tmp_path, "routes:\n" + routes_yaml)
    problem = only_problem(path)
    assert (problem.file, problem.key) == (path, key)
    assert reason_part in problem.reason


def test_routes_must_be_a_list(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, 'routes:\n  model: "x"\n')
    assert only_problem(path).key == "routes"


def test_models(tmp_path: pathlib.Path) -> None:
    path = write(
        tmp_path,
        "models:\n"
        "  gpt-4: 0.03\n"
        "  gpt-4o: {input: 0.0025, output: 0.01, cached_input: 0.00125}\n"
        "  free: 0\n"
        '  "gpt-3.5-turbo": {input: 1, output: 2}\n'
        "  claude-sonnet-4: {input: 0.003, output: 0.015, cached_input: 0.0003,"
        " cache_write_input: 0.00375}\n",
    )
    models = load_config(path, {}).models
    assert models["claude-sonnet-4"] == ModelPrice(0.003, 0.015, 0.0003, 0.00375)
    assert models["gpt-4"] == ModelPrice(0.03, 0.03, None)
    assert models["gpt-4o"] == ModelPrice(0.0025, 0.01, 0.00125)
    assert models["free"] == ModelPrice(0.0, 0.0)
    assert models["gpt-3.5-turbo"] == ModelPrice(1.0, 2.0)
    assert all(isinstance(p.input, float) for p in models.values())


@pytest.mark.parametrize(
    ("models_yaml", "key", "reason_part"),
    [
        ("  gpt-4: -1\n", "models.gpt-4", "must be >= 0, got -1"),
        ('  gpt-4: "cheap"\n', "models.gpt-4", "price in USD per 1K tokens"),
        ("  gpt-4: {input: 1}\n", "models.gpt-4.output", "missing"),
        ("  gpt-4: {input: 1, output: -2}\n", "models.gpt-4.output", "must be >= 0"),
        (
            "  gpt-4: {input: 1, output: 2, cahced_input: 1}\n",
            "models.gpt-4.cahced_input",
            "'cached_input'",
        ),
        (
            "  gpt-4: {input: 1, output: 2, cache_write_input: -1}\n",
            "models.gpt-4.cache_write_input",
            "must be >= 0",
        ),
        (
            "  gpt-4: {input: 1, output: 2, cache_write: 1}\n",
            "models.gpt-4.cache_write",
            "'cache_write_input'",
        ),
        ("  3.5: 1\n", "models.3.5", "must be a string"),
    ],
)
def test_bad_models(tmp_path: pathlib.Path, models_yaml: str, key: str, reason_part: str) -> None:
    path = write(tmp_path, "models:\n" + models_yaml)
    problem = only_problem(path)
    assert (problem.file, problem.key) == (path, key)
    assert reason_part in problem.reason


def test_yaml_syntax_error_names_file_and_line(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "server:\n  workers: 1\n  port: [1, 2\ncache:\n  ttl: 3\n")
    problem = only_problem(path)
    assert problem.file == path
    assert "YAML syntax error at line 4" in problem.reason
    assert str(problem).startswith(f"{path}: YAML syntax error at line")


def test_duplicate_keys_are_reported(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "cache:\n  ttl: 1\n  ttl: 2\n")
    problem = only_problem(path)
    assert problem.reason == "line 3: duplicate key 'ttl' (first at line 2)"


@pytest.mark.parametrize("text", ["- a\n- b\n", "just words\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path: pathlib.Path, text: str) -> None:
    assert "must be a mapping of sections" in only_problem(write(tmp_path, text)).reason


def test_every_problem_is_reported_at_once(tmp_path: pathlib.Path) -> None:
    path = write(
        tmp_path,
        "server:\n  workers: 0\n"
        "cache:\n  ttl: -1\n  scope: nobody\n"
        "ratelimit:\n  burst: 0\n"
        "nonsense: 1\n"
        "routes:\n  - {model: x}\n"
        "models:\n  m: -1\n",
    )
    problems = problems_of(path, {"CACHE_ENABLED": "perhaps"})
    keys = {p.key for p in problems}
    assert keys == {
        "server.workers",
        "cache.ttl",
        "cache.scope",
        "ratelimit.burst",
        "nonsense",
        "routes[0].target",
        "models.m",
        "cache.enabled",
    }
    assert all(p.file == path for p in problems if p.key != "cache.enabled")


def test_missing_and_unreadable_files(tmp_path: pathlib.Path) -> None:
    missing = str(tmp_path / "nope.yaml")
    assert only_problem(missing) == Problem(missing, "", "file not found")
    assert "directory" in only_problem(str(tmp_path)).reason
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    assert "UTF-8" in only_problem(str(binary)).reason


# --------------------------------------------------------------------------
# Secrets


def _all_text(error: ConfigError) -> str:
    return "\n".join([str(error), repr(error)] + [str(p) + repr(p) for p in error.problems])


@pytest.mark.parametrize(
    "text",
    [
        f'redis:\n  password: "{SECRET}\nb: [1\n',  # syntax error on the password line
        f"redis:\n  password: {SECRET}: x\n",  # mapping values not allowed here
        f"redis:\n  password: [{SECRET}]\n",  # wrong type
        f'proxy:\n  target: "https://user:{SECRET}@api.openai.com"\n',
        f'proxy:\n  target: "ftp://user:{SECRET}@api.openai.com"\n',
        f'routes:\n  - {{model: x, target: "https://u:{SECRET}@a/v1"}}\n',
        f"redis:\n  password: {SECRET}\n  password: {SECRET}\n",  # duplicate
    ],
)
def test_password_never_in_problems(tmp_path: pathlib.Path, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), {})
    assert SECRET not in _all_text(info.value)


def test_numeric_password_is_refused_without_echo(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "redis:\n  password: 8675309\n")
    problem = only_problem(path)
    assert problem.key == "redis.password"
    assert "8675309" not in str(problem)


def test_password_masked_in_repr(tmp_path: pathlib.Path) -> None:
    config = load_config(write(tmp_path, f'redis:\n  password: "{SECRET}"\n'), {})
    assert config.redis.password == SECRET
    assert SECRET not in repr(config)
    assert SECRET not in repr(config.redis)
    assert 'password="***"' in repr(config.redis)
    assert 'password=""' in repr(RedisConfig())
    env_config = load_config(None, {"REDIS_PASSWORD": SECRET})
    assert SECRET not in repr(env_config) and SECRET not in str(env_config)


# --------------------------------------------------------------------------
# The example file


def _example_keys(document: dict[str, Any]) -> set[str]:
    keys = set()
    for section, body in document.items():
        if section in ("routes", "models"):
            keys.add(section)
            continue
        for key in body:
            keys.add(f"{section}.{key}")
    return keys


def test_example_file_loads_and_equals_defaults_except_examples() -> None:
    config = load_config(str(EXAMPLE), {})
    assert config.routes  # deliberately shows example routes
    assert config.models  # and example prices
    assert dataclasses.replace(config, routes=(), models=Config().models, source=None) == Config()


def test_example_file_documents_every_key_and_only_real_keys() -> None:
    document = yaml.safe_load(EXAMPLE.read_text())
    assert _example_keys(document) == set(known_keys()) | {"routes", "models", "keys.static"}
    # Every scalar key carries a comment on its line.
    for line in EXAMPLE.read_text().splitlines():
        if line.startswith("  ") and not line.lstrip().startswith(("#", "-", "target:")):
            assert "#" in line, f"undocumented line: {line!r}"


# --------------------------------------------------------------------------
# Locating the file and --check-config


def test_resolve_config_path_order(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    flag = write(tmp_path, "", "flag.yaml")
    from_env = write(tmp_path, "", "env.yaml")
    assert resolve_config_path(None, {}) is None
    (tmp_path / "configs").mkdir()
    write(tmp_path / "configs", "", "config.yaml")
    assert resolve_config_path(None, {}) == "configs/config.yaml"
    assert resolve_config_path(None, {"RELAY_CONFIG": from_env}) == from_env
    assert resolve_config_path(flag, {"RELAY_CONFIG": from_env}) == flag


def test_resolve_config_path_missing_file_is_an_error(tmp_path: pathlib.Path) -> None:
    missing = str(tmp_path / "missing.yaml")
    for cli, env in [(missing, {}), (None, {"RELAY_CONFIG": missing})]:
        with pytest.raises(ConfigError) as info:
            resolve_config_path(cli, env)
        assert info.value.problems == [Problem(missing, "", "file not found")]


def test_check_config_ok(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert check_config(None, {}) == 0
    assert capsys.readouterr().out == "OK: built-in defaults\n"
    path = write(tmp_path, "cache:\n  ttl: 5\n")
    assert check_config(path, {}) == 0
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == (f"OK: {path}\n", "")


def test_check_config_errors(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, "ratelimit:\n  burst: 0\ncache:\n  ttl: 0\n")
    assert check_config(path, {"LOG_LEVEL": "shout"}) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        f"{path}: ratelimit.burst: must be >= 1, got 0",
        f"{path}: cache.ttl: must be > 0, got 0.0",
        "$LOG_LEVEL: log.level: must be one of debug | info | warning | error, got 'shout'",
    ]
    assert check_config(str(tmp_path / "missing.yaml"), {}) == 1
    assert "file not found" in capsys.readouterr().err


# --------------------------------------------------------------------------
# Restart keys


def test_restart_changes_and_keep_restart_values() -> None:
    running = Config()
    new = dataclasses.replace(
        running,
        server=dataclasses.replace(running.server, port=9000, workers=4, idle_timeout=5),
        cache=dataclasses.replace(running.cache, ttl=1),
    )
    assert restart_changes(running, new) == ["server.port", "server.workers"]
    assert restart_changes(running, running) == []
    kept = keep_restart_values(running, new)
    assert (kept.server.port, kept.server.workers) == (8080, 1)
    assert kept.server.idle_timeout == 5 and kept.cache.ttl == 1
    assert RESTART_KEYS == {"server.port", "server.host", "server.workers"}


# --------------------------------------------------------------------------
# Hot reload

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    def runner(coro: Coroutine[Any, Any, Any]) -> Any:
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as r:
            return r.run(coro)

    return runner


class Recorder:
    """Collects watcher callbacks and lets a test await the next one."""

    def __init__(self) -> None:
        self.changes: list[tuple[Config, list[str]]] = []
        self.errors: list[ConfigError] = []
        self._event = asyncio.Event()

    def on_change(self, config: Config, restart_needed: list[str]) -> None:
        self.changes.append((config, restart_needed))
        self._event.set()

    def on_error(self, error: ConfigError) -> None:
        self.errors.append(error)
        self._event.set()

    async def next(self, timeout: float) -> None:
        await asyncio.wait_for(self._event.wait(), timeout)
        self._event.clear()


def replace_atomically(path: str, text: str) -> None:
    """What editors do: write a temporary file, then rename it over."""
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


async def settled_watcher(
    path: str, recorder: Recorder, interval: float, env: dict[str, str] | None = None
) -> ConfigWatcher:
    watcher = ConfigWatcher(
        path,
        load_config(path, env or {}),
        recorder.on_change,
        recorder.on_error,
        interval=interval,
        env=env or {},
    )
    # The first two polls read the unchanged file once: nothing to report.
    watcher.poll()
    watcher.poll()
    assert recorder.changes == [] and recorder.errors == []
    watcher.start()
    return watcher


def test_watcher_detects_an_edit_within_two_seconds(tmp_path: pathlib.Path, run: Any) -> None:
    path = write(tmp_path, "cache:\n  ttl: 60\n")

    async def main() -> float:
        recorder = Recorder()
        watcher = await settled_watcher(path, recorder, interval=0.5)  # the default
        try:
            started = time.monotonic()
            with open(path, "w") as fh:  # an in-place save
                fh.write("cache:\n  ttl: 120\n")
            await recorder.next(timeout=2.0)
            elapsed = time.monotonic() - started
        finally:
            watcher.stop()
        assert len(recorder.changes) == 1
        config, restart_needed = recorder.changes[0]
        assert config.cache.ttl == 120.0
        assert restart_needed == []
        assert watcher.current is config
        return elapsed

    assert run(main()) < 2.0


def test_watcher_catches_atomic_rename(tmp_path: pathlib.Path, run: Any) -> None:
    path = write(tmp_path, "ratelimit:\n  burst: 5\n")

    async def main() -> None:
        recorder = Recorder()
        watcher = await settled_watcher(path, recorder, interval=0.05)
        try:
            replace_atomically(path, "ratelimit:\n  burst: 6\n")  # same size
            await recorder.next(timeout=2.0)
        finally:
            watcher.stop()
        assert recorder.changes[0][0].ratelimit.burst == 6

    run(main())


def test_invalid_edit_is_refused_and_old_config_kept(tmp_path: pathlib.Path, run: Any) -> None:
    path = write(tmp_path, "ratelimit:\n  burst: 5\n")

    async def main() -> None:
        recorder = Recorder()
        watcher = await settled_watcher(path, recorder, interval=0.05)
        old = watcher.current
        try:
            replace_atomically(path, "ratelimit:\n  burst: 0\n")
            await recorder.next(timeout=2.0)
            assert recorder.changes == []
            assert [str(p) for p in recorder.errors[0].problems] == [
                f"{path}: ratelimit.burst: must be >= 1, got 0"
            ]
            assert watcher.current is old
            # Reported once, not on every poll.
            for _ in range(5):
                watcher.poll()
            assert len(recorder.errors) == 1
            # A later good edit is applied.
            replace_atomically(path, "ratelimit:\n  burst: 7\n")
            await recorder.next(timeout=2.0)
            assert watcher.current.ratelimit.burst == 7
        finally:
            watcher.stop()

    run(main())


def test_restart_keys_reported(tmp_path: pathlib.Path, run: Any) -> None:
    path = write(tmp_path, 'server:\n  port: ":8080"\n  workers: 1\n')

    async def main() -> None:
        recorder = Recorder()
        watcher = await settled_watcher(path, recorder, interval=0.05)
        try:
            replace_atomically(path, 'server:\n  port: "127.0.0.1:9000"\n  workers: 2\n')
            await recorder.next(timeout=2.0)
            config, restart_needed = recorder.changes[0]
            assert restart_needed == ["server.host", "server.port", "server.workers"]
            assert (config.server.host, config.server.port) == ("127.0.0.1", 9000)
            # Still pending on the next unrelated edit: the process has not restarted.
            replace_atomically(
                path, 'server:\n  port: "127.0.0.1:9000"\n  workers: 2\ncache:\n  ttl: 1\n'
            )
            await recorder.next(timeout=2.0)
            assert recorder.changes[1][1] == ["server.host", "server.port", "server.workers"]
        finally:
            watcher.stop()

    run(main())


def test_unchanged_content_and_env_reapplied(tmp_path: pathlib.Path, run: Any) -> None:
    path = write(tmp_path, "cache:\n  ttl: 60\n")
    env = {"CACHE_ENABLED": "false"}

    async def main() -> None:
        recorder = Recorder()
        watcher = await settled_watcher(path, recorder, interval=0.05, env=env)
        try:
            # Same content, new inode: nothing to apply, no callback.
            replace_atomically(path, "cache:\n  ttl: 60\n")
            with pytest.raises(TimeoutError):
                await recorder.next(timeout=0.3)
            replace_atomically(path, "cache:\n  ttl: 61\n")
            await recorder.next(timeout=2.0)
        finally:
            watcher.stop()
        config = recorder.changes[0][0]
        assert config.cache.ttl == 61.0
        assert config.cache.enabled is False  # the override survives reloads

    run(main())


def test_deleted_file_is_reported_once_and_reappearing_file_loaded(
    tmp_path: pathlib.Path, run: Any
) -> None:
    path = write(tmp_path, "cache:\n  ttl: 60\n")

    async def main() -> None:
        recorder = Recorder()
        watcher = await settled_watcher(path, recorder, interval=0.05)
        try:
            os.unlink(path)
            await recorder.next(timeout=2.0)
            assert recorder.errors[0].problems == [Problem(path, "", "file not found")]
            assert watcher.current.cache.ttl == 60.0
            write(tmp_path, "cache:\n  ttl: 30\n")
            await recorder.next(timeout=2.0)
            assert watcher.current.cache.ttl == 30.0
            assert len(recorder.errors) == 1
        finally:
            watcher.stop()

    run(main())


def test_stop_ends_polling_and_callback_errors_do_not(tmp_path: pathlib.Path, run: Any) -> None:
    path = write(tmp_path, "cache:\n  ttl: 60\n")

    async def main() -> None:
        calls: list[int] = []
        event = asyncio.Event()

        def on_change(config: Config, restart_needed: list[str]) -> None:
            calls.append(int(config.cache.ttl))
            event.set()
            raise RuntimeError("a bug in the caller")

        watcher = ConfigWatcher(
            path, load_config(path, {}), on_change, lambda e: None, interval=0.05, env={}
        )
        watcher.start()
        try:
            replace_atomically(path, "cache:\n  ttl: 61\n")
            await asyncio.wait_for(event.wait(), 2.0)
            event.clear()
            replace_atomically(path, "cache:\n  ttl: 62\n")  # still polling after the error
            await asyncio.wait_for(event.wait(), 2.0)
        finally:
            watcher.stop()
        assert calls == [61, 62]
        replace_atomically(path, "cache:\n  ttl: 63\n")
        await asyncio.sleep(0.3)  # six intervals: a running watcher would have fired
        assert calls == [61, 62]

    run(main())



# --------------------------------------------------------------------------- #
# redis topologies
# --------------------------------------------------------------------------- #
def test_redis_topology_keys_load_from_file_and_environment(tmp_path):
    path = write(
        tmp_path,
        "redis:\n  mode: Sentinel\n  addresses: ['s1:26379', '[::1]:26380']\n"
        "  master_name: cache-master\n",
    )
    redis_config = load_config(path, {}).redis
    assert redis_config.mode == "sentinel"
    assert redis_config.addresses == ("s1:26379", "[::1]:26380")
    assert redis_config.master_name == "cache-master"
    assert redis_config.seeds == ("s1:26379", "[::1]:26380")
    env = {"REDIS_MODE": "cluster", "REDIS_ADDRESSES": " n1:7000, n2:7001 ,"}
    from_env = load_config(path, env).redis
    assert (from_env.mode, from_env.addresses) == ("cluster", ("n1:7000", "n2:7001"))
    # cluster without seeds of its own starts from redis.address
    alone = load_config(None, {"REDIS_MODE": "cluster", "REDIS_ADDRESS": "n9:7009"}).redis
    assert alone.seeds == ("n9:7009",)
    assert load_config(None, {}).redis.seeds == ("localhost:6379",)


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("redis:\n  mode: clustr\n", "redis.mode", "did you mean 'cluster'?"),
        ("redis:\n  mode: sentinel\n", "redis.addresses", "must list the sentinels"),
        ("redis:\n  mode: cluster\n  db: 2\n", "redis.db", "must be 0 when redis.mode is cluster"),
        ("redis:\n  addresses: 'a:1'\n", "redis.addresses", "must be a list"),
        ("redis:\n  addresses: ['a:1', 5]\n", "redis.addresses", 'item 1 must be a "host:port"'),
        ("redis:\n  addresses: ['a:1', 'a']\n", "redis.addresses", 'item 1 must be "host:port"'),
        ("redis:\n  addresses: ['a:1', 'a:1']\n", "redis.addresses", "lists an address twice"),
        ("redis:\n  master_name: 'my master'\n", "redis.master_name", "without spaces"),
    ],
)
def test_redis_topology_keys_are_validated(tmp_path, text, key, reason):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    [problem] = info.value.problems
    assert (problem.file, problem.key) == (path, key)
    assert reason in problem.reason


def test_redis_addresses_from_environment_are_validated():
    with pytest.raises(ConfigError) as info:
        load_config(None, {"REDIS_ADDRESSES": "ok:1,bad"})
    [problem] = info.value.problems
    assert (problem.file, problem.key) == ("$REDIS_ADDRESSES", "redis.addresses")
