"""Configuration: YAML file + environment -> frozen dataclasses, with validation.

Order of precedence (later wins): built-in defaults, the YAML file, then the
environment (`SECTION_KEY`, e.g. `CACHE_TTL`, `CIRCUIT_BREAKER_ENABLED`).
Every problem is collected and reported together (file, key, reason) so an
operator fixes a broken file in one pass instead of one error per restart.

The resulting objects are immutable: request handling reads attributes that
were validated and typed once, never strings or dicts.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import os
import re
import sys
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import yaml

# --------------------------------------------------------------------------
# The configuration objects


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = ""  # "" = all interfaces
    port: int = 8080  # 0 = ephemeral (tests)
    workers: int = 1
    max_body_bytes: int = 10485760
    max_header_bytes: int = 65536
    header_timeout: float = 10.0
    idle_timeout: float = 75.0
    shutdown_timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    target: str = "https://api.openai.com"
    connect_timeout: float = 10.0
    read_timeout: float = 600.0
    pool_size: int = 64
    first_byte_timeout: float = 60.0
    max_connections: int = 1024
    api_key: str = ""
    auth: str = "bearer"

    def __repr__(self) -> str:
        # By hand, so an upstream key never reaches a log line or traceback.
        return (
            f"ProxyConfig(target={self.target!r}, connect_timeout={self.connect_timeout!r}, "
            f"read_timeout={self.read_timeout!r}, first_byte_timeout={self.first_byte_timeout!r}, "
            f"pool_size={self.pool_size!r}, max_connections={self.max_connections!r}, "
            f"api_key={'***' if self.api_key else ''!r}, auth={self.auth!r})"
        )


# How an upstream credential is sent: ``auth`` -> header name and value prefix.
AUTH_SCHEMES: Mapping[str, tuple[str, str]] = types.MappingProxyType(
    {
        "bearer": ("Authorization", "Bearer "),
        "x-api-key": ("x-api-key", ""),
        "api-key": ("api-key", ""),
    }
)


@dataclass(frozen=True, slots=True)
class Target:
    """One upstream of a route: where, how much of the traffic, with which key."""

    url: str
    weight: float = 1.0
    name: str | None = None  # the label in metrics and X-Relay-Upstream
    api_key: str = ""  # "" = the client's own credential passes through
    auth: str = "bearer"

    def __repr__(self) -> str:
        return (
            f"Target(url={self.url!r}, weight={self.weight!r}, name={self.name!r}, "
            f"api_key={'***' if self.api_key else ''!r}, auth={self.auth!r})"
        )


@dataclass(frozen=True, slots=True)
class Route:
    """One routing rule. `model` is a glob on the request body's "model",
    `path` a prefix of the request path; when both are set both must match.
    `target` is the first of `targets` (a route written with `target` has
    exactly one)."""

    target: str
    model: str | None = None
    path: str | None = None
    targets: tuple[Target, ...] = ()
    strategy: str = "weighted"
    fallback_models: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.targets:
            # Route(url, ...) is the one-target route it always was.
            object.__setattr__(self, "targets", (Target(self.target),))


# Failures a retry can be asked for: connect errors, first-byte/read
# timeouts, a connection closed before the response head, and statuses.
RETRY_CONDITIONS = ("connect", "timeout", "reset")
DEFAULT_RETRY_ON: tuple[str, ...] = ("connect", "timeout", "429", "500", "502", "503", "504")


@dataclass(frozen=True, slots=True)
class RetriesConfig:
    attempts: int = 0  # further tries after the first; 0 = none
    on: tuple[str, ...] = DEFAULT_RETRY_ON
    max_retry_after: float = 30.0


@dataclass(frozen=True, slots=True)
class CacheConfig:
    enabled: bool = True
    ttl: float = 3600.0
    max_entries: int = 10000
    max_body_bytes: int = 1048576
    scope: str = "api_key"


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    enabled: bool = True
    requests_per_second: float = 10.0
    burst: int = 20
    key: str = "api_key"


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    enabled: bool = True
    failure_threshold: int = 5
    recovery_timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class RedisConfig:
    enabled: bool = False
    address: str = "localhost:6379"
    password: str = ""
    db: int = 0
    timeout: float = 0.25
    # Topology: standalone uses `address`; sentinel asks the sentinels in
    # `addresses` for the master named `master_name`; cluster discovers the
    # nodes from the seeds in `addresses` (`address` when that is empty).
    mode: str = "standalone"
    addresses: tuple[str, ...] = ()
    master_name: str = "mymaster"

    def __repr__(self) -> str:
        # Written by hand so the password never reaches a log line or a
        # traceback through repr(config).
        password = '"***"' if self.password else '""'
        return (
            f"RedisConfig(enabled={self.enabled!r}, address={self.address!r}, "
            f"password={password}, db={self.db!r}, timeout={self.timeout!r}, "
            f"mode={self.mode!r}, addresses={self.addresses!r}, "
            f"master_name={self.master_name!r})"
        )

    @property
    def seeds(self) -> tuple[str, ...]:
        """The addresses relay connects to first: the sentinels, the cluster
        seed nodes, or the one standalone server."""
        if self.mode == "standalone":
            return (self.address,)
        return self.addresses or (self.address,)


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """USD per 1K tokens."""

    input: float
    output: float
    cached_input: float | None = None
    cache_write_input: float | None = None  # Anthropic cache_creation_input_tokens


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"
    requests: bool = False  # one JSON line per request


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    enabled: bool = True  # false: no per-request Prometheus series


@dataclass(frozen=True, slots=True)
class UsageConfig:
    enabled: bool = True  # false: no token/cost accounting, no usage injection


@dataclass(frozen=True, slots=True)
class StaticKey:
    """A virtual key declared in the file (``keys.static``); the file holds
    only the SHA-256 of its secret."""

    id: str
    name: str
    secret_sha256: str
    budget_usd: float | None = None
    budget_period: str | None = None
    rpm: int | None = None
    tpm: int | None = None
    models: tuple[str, ...] | None = None
    expires_at: float | None = None
    metadata: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True, slots=True)
class KeysConfig:
    enabled: bool = False  # true: every proxied request needs a relay key
    store: str = "sqlite"  # sqlite | redis
    path: str = "relay-keys.db"
    admin_key: str = ""  # protects /relay/admin/*; "" = the admin API is off (404)
    default_reserve_tokens: int = 4096
    static: tuple[StaticKey, ...] = ()

    @property
    def needs_store(self) -> bool:
        """Whether anything (admission, the admin API, static keys) uses the key store."""
        return self.enabled or bool(self.admin_key) or bool(self.static)

    def __repr__(self) -> str:
        # The admin key never reaches a log line through repr(config).
        admin = '"***"' if self.admin_key else '""'
        return (
            f"KeysConfig(enabled={self.enabled!r}, store={self.store!r}, path={self.path!r}, "
            f"admin_key={admin}, default_reserve_tokens={self.default_reserve_tokens!r}, "
            f"static=<{len(self.static)} keys>)"
        )


def _empty_models() -> Mapping[str, ModelPrice]:
    return types.MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    routes: tuple[Route, ...] = ()
    retries: RetriesConfig = field(default_factory=RetriesConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    ratelimit: RateLimitConfig = field(default_factory=RateLimitConfig)
    circuit_breaker: BreakerConfig = field(default_factory=BreakerConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    models: Mapping[str, ModelPrice] = field(default_factory=_empty_models)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    usage: UsageConfig = field(default_factory=UsageConfig)
    keys: KeysConfig = field(default_factory=KeysConfig)
    source: str | None = None  # the file it came from; None = built-in defaults


# Keys whose change only takes effect after a restart (the listening sockets
# and worker processes exist once per process lifetime).
RESTART_KEYS: frozenset[str] = frozenset({"server.port", "server.host", "server.workers"})

DEFAULT_CONFIG_PATH = "configs/config.yaml"
CONFIG_PATH_ENV = "RELAY_CONFIG"


# --------------------------------------------------------------------------
# Problems


@dataclass(frozen=True, slots=True)
class Problem:
    file: str  # the file path, or "$NAME" for an environment variable
    key: str  # dotted key, e.g. "ratelimit.burst", "routes[0].target"; "" = whole file
    reason: str

    def __str__(self) -> str:
        if self.key:
            return f"{self.file}: {self.key}: {self.reason}"
        return f"{self.file}: {self.reason}"


class ConfigError(Exception):
    """The configuration is unusable; `problems` lists every reason found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class _Invalid(Exception):
    """A single value failed its check; carries the reason text."""


# --------------------------------------------------------------------------
# Value checks: each takes an already typed value and returns the normalized
# value or raises _Invalid.


def _describe(value: Any, secret: bool = False) -> str:
    """How a bad value is shown in a problem (never a secret's content)."""
    if isinstance(value, bool):
        kind, text = "a boolean", "true" if value else "false"
    elif value is None:
        return "nothing (null)"
    elif isinstance(value, int):
        kind, text = "a number", _short(value)
    elif isinstance(value, float):
        kind, text = "a number", repr(value)
    elif isinstance(value, str):
        shown = value if len(value) <= 60 else value[:57] + "..."
        kind, text = "a string", repr(shown)
    elif isinstance(value, list):
        return "a list"
    elif isinstance(value, dict):
        return "a mapping"
    else:
        return f"a {type(value).__name__}"
    return kind if secret else text


def _number(text: float) -> str:
    if isinstance(text, int):
        return repr(text)
    return repr(int(text)) if text.is_integer() and abs(text) < 1e16 else repr(text)


def _above(limit: float) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if not value > limit:
            raise _Invalid(f"must be > {_number(limit)}, got {_describe(value)}")
        return value

    return check


def _at_least(limit: float) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if not value >= limit:
            raise _Invalid(f"must be >= {_number(limit)}, got {_describe(value)}")
        return value

    return check


def _between(low: float, high: float, *, above: bool = False) -> Callable[[Any], Any]:
    """``low <= value <= high`` (``low < value`` with ``above``)."""
    low_text = f"> {_number(low)}" if above else f">= {_number(low)}"

    def check(value: Any) -> Any:
        if not (value > low if above else value >= low):
            raise _Invalid(f"must be {low_text}, got {_describe(value)}")
        if not value <= high:  # also refuses NaN
            raise _Invalid(f"must be <= {_number(high)}, got {_describe(value)}")
        return value

    return check


def _one_of(*choices: str, aliases: Mapping[str, str] | None = None) -> Callable[[Any], Any]:
    aliases = aliases or {}

    def check(value: Any) -> Any:
        # Case-insensitive because LOG_LEVEL=INFO is what people type.
        name = value.strip().lower()
        name = aliases.get(name, name)
        if name not in choices:
            hint = _suggest(name, choices)
            raise _Invalid(f"must be one of {' | '.join(choices)}, got {_describe(value)}{hint}")
        return name

    return check


def _same(value: Any) -> Any:
    return value


def _non_empty(value: Any) -> Any:
    if not value.strip():
        raise _Invalid("must not be empty")
    return value


def parse_listen_address(text: str | int) -> tuple[str, int]:
    """Parse "[host]:port" (":8080", "127.0.0.1:9000", "[::1]:8080", "8080",
    8080) into (host, port); host "" means all interfaces.

    Raises ValueError with a readable reason. Also used for `--port`.
    """
    if isinstance(text, bool) or not isinstance(text, int | str):
        raise ValueError(f'must be "[host]:port" or a port number, got {_describe(text)}')
    if isinstance(text, int):
        host, port_text = "", str(text)
    else:
        value = text.strip()
        if value.startswith("["):
            end = value.find("]")
            if end < 0 or value[end + 1 : end + 2] != ":":
                raise ValueError(f'must be "[ipv6]:port", got {_describe(text)}')
            host, port_text = value[1:end], value[end + 2 :]
        elif ":" in value:
            host, _, port_text = value.rpartition(":")
            if ":" in host:
                raise ValueError(
                    f'an IPv6 host needs brackets, e.g. "[::1]:8080", got {_describe(text)}'
                )
        else:
            host, port_text = "", value
        if any(c.isspace() for c in host):
            raise ValueError(f"host must not contain spaces, got {_describe(text)}")
    if not port_text.isascii() or not port_text.isdigit():
        raise ValueError(f'must be "[host]:port" with a numeric port, got {_describe(text)}')
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port must be 0..65535, got {port}")
    return host, port


def _listen(value: Any) -> tuple[str, int]:
    try:
        return parse_listen_address(value)
    except ValueError as exc:
        raise _Invalid(str(exc)) from None


def _target_url(value: Any) -> str:
    """An upstream base URL: scheme and authority only, normalized without a
    trailing slash (relay appends the client's path unchanged)."""
    # A URL with user info is never echoed: that part may be a credential.
    shown = "a URL with user:password@" if "@" in value else _describe(value)
    if not value or any(c.isspace() for c in value):
        raise _Invalid(f"must be an http:// or https:// URL, got {shown}")
    parts = urlsplit(value)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.netloc:
        raise _Invalid(f"must be an http:// or https:// URL with a host, got {shown}")
    if "@" in parts.netloc:
        raise _Invalid("must not contain user:password@ (send credentials as request headers)")
    if not parts.hostname:
        raise _Invalid(f"must name a host, got {shown}")
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise _Invalid(f"has an invalid port, got {shown}") from None
    if parts.path not in ("", "/"):
        raise _Invalid(
            f"must not have a path (relay forwards the client's path unchanged), "
            f"got path {parts.path!r}"
        )
    if parts.query or parts.fragment or value.endswith(("?", "#")):
        raise _Invalid(f"must not have a query or fragment, got {shown}")
    return f"{scheme}://{parts.netloc.lower()}"


def _auth(value: Any) -> str:
    return str(_one_of(*AUTH_SCHEMES)(value))


def _retry_on(value: Any) -> tuple[str, ...]:
    """retries.on: condition names and HTTP statuses (429, 5xx), deduplicated."""
    seen: list[str] = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int | str):
            raise _Invalid(f"items must be condition names or status codes, got {_describe(item)}")
        text = str(item).strip().lower()
        if text.isdigit():
            status = int(text)
            if not (status in (408, 409, 429) or 500 <= status <= 599):
                raise _Invalid(f"status {status} cannot be retried (429, 408, 409 and 5xx can)")
        elif text not in RETRY_CONDITIONS:
            raise _Invalid(
                f"unknown condition {_describe(item)}: use {', '.join(RETRY_CONDITIONS)} "
                "or a status code" + _suggest(text, RETRY_CONDITIONS)
            )
        if text not in seen:
            seen.append(text)
    return tuple(seen)


def _host_port(value: Any) -> str:
    """redis.address: "host:port" (IPv6 as "[::1]:6379")."""
    try:
        host, port = parse_listen_address(value)
    except ValueError:
        host, port = "", 0
    if not host or port == 0:
        raise _Invalid(f'must be "host:port", got {_describe(value)}')
    return str(value).strip()


def _host_ports(value: Any) -> tuple[str, ...]:
    """redis.addresses: a list of "host:port" (the environment: comma-separated)."""
    items = [part for part in value.split(",") if part.strip()] if isinstance(value, str) else value
    addresses = []
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise _Invalid(f'item {index} must be a "host:port" string, got {_describe(item)}')
        try:
            addresses.append(_host_port(item))
        except _Invalid as exc:
            raise _Invalid(f"item {index} {exc}") from None
    if len(set(addresses)) != len(addresses):
        raise _Invalid("lists an address twice")
    return tuple(addresses)


def _master_name(value: Any) -> str:
    name = value.strip()
    if not name or any(c.isspace() for c in name):
        raise _Invalid(f"must be a name without spaces, got {_describe(value)}")
    return str(name)


# --------------------------------------------------------------------------
# Schema: one entry per scalar key. `kind` decides which YAML types are
# accepted and how an environment string is parsed; `check` validates.


@dataclass(frozen=True, slots=True)
class _Key:
    kind: str  # "bool" | "int" | "float" | "str" | "listen" | "list"
    check: Callable[[Any], Any] = _same
    secret: bool = False


# Upper bounds that every value must respect, so that a value the loader
# accepts is one every consumer accepts too (asyncio timers, socket timeouts,
# Redis expiry times, the C types of relay._fast). A reload whose values
# passed these checks cannot be refused later by an object refusing to be
# built from them, which would leave it half applied.
MAX_SECONDS = 31_536_000.0  # one year: durations, timeouts, TTLs
MAX_COUNT = 2**31 - 1  # counts held in a C int (failure_threshold) or similar
MAX_EXACT = 2**53  # largest integer a double (token buckets, Lua) holds exactly
MAX_BYTES = 2**53  # byte sizes
MAX_RATE = 1e9  # requests per second
MAX_REFILL_SECONDS = 1e12  # burst / rate: Redis expiry in ms must fit 64 bits
MAX_WORKERS = 1024
MAX_ATTEMPTS = 100  # retries.attempts: far beyond any useful number of tries
# Backstops by type, for keys without a bound of their own.
_INT_LIMIT = 2**63 - 1  # what C long long, Redis integers and SQLite hold
_FLOAT_LIMIT = 1e15


def bounded(kind: str, low: float, high: float, *, above: bool = False) -> _Key:
    """A numeric key (``kind`` "int" or "float") valid from ``low`` to ``high``
    inclusive (``above=True``: strictly more than ``low``). The one way to
    declare a number: every numeric key has both bounds."""
    if kind not in ("int", "float"):
        raise ValueError(f"bounded() is for int and float keys, not {kind!r}")
    return _Key(kind, _between(low, high, above=above))


def seconds(low: float = 0.0, high: float = MAX_SECONDS) -> _Key:
    """A duration in seconds, more than ``low`` (default: any positive)."""
    return bounded("float", low, high, above=True)


_SECTIONS: Mapping[str, Mapping[str, _Key]] = types.MappingProxyType(
    {
        "server": {
            "port": _Key("listen", _listen),  # -> ServerConfig.host + .port
            "workers": bounded("int", 1, MAX_WORKERS),
            "max_body_bytes": bounded("int", 0, MAX_BYTES, above=True),
            "max_header_bytes": bounded("int", 0, MAX_BYTES, above=True),
            "header_timeout": seconds(),
            "idle_timeout": seconds(),
            "shutdown_timeout": seconds(),
        },
        "proxy": {
            "target": _Key("str", _target_url),
            "connect_timeout": seconds(),
            "read_timeout": seconds(),
            "first_byte_timeout": seconds(),
            "pool_size": bounded("int", 0, MAX_COUNT, above=True),
            "max_connections": bounded("int", 1, MAX_COUNT),
            "api_key": _Key("str", secret=True),
            "auth": _Key("str", _auth),
        },
        "retries": {
            "attempts": bounded("int", 0, MAX_ATTEMPTS),
            "on": _Key("list", _retry_on),
            "max_retry_after": bounded("float", 0, MAX_SECONDS),
        },
        "cache": {
            "enabled": _Key("bool"),
            "ttl": seconds(),
            "max_entries": bounded("int", 0, MAX_COUNT, above=True),
            "max_body_bytes": bounded("int", 0, MAX_BYTES, above=True),
            "scope": _Key("str", _one_of("api_key", "global")),
        },
        "ratelimit": {
            "enabled": _Key("bool"),
            "requests_per_second": bounded("float", 0, MAX_RATE, above=True),
            "burst": bounded("int", 1, MAX_EXACT),
            "key": _Key("str", _one_of("api_key", "ip", "global")),
        },
        "circuit_breaker": {
            "enabled": _Key("bool"),
            "failure_threshold": bounded("int", 1, MAX_COUNT),
            "recovery_timeout": seconds(),
        },
        "redis": {
            "enabled": _Key("bool"),
            "address": _Key("str", _host_port),
            "mode": _Key("str", _one_of("standalone", "sentinel", "cluster")),
            "addresses": _Key("list", _host_ports),
            "master_name": _Key("str", _master_name),
            "password": _Key("str", secret=True),
            "db": bounded("int", 0, MAX_COUNT),
            "timeout": seconds(),
        },
        "log": {
            "level": _Key(
                "str", _one_of("debug", "info", "warning", "error", aliases={"warn": "warning"})
            ),
            "requests": _Key("bool"),
        },
        "metrics": {
            "enabled": _Key("bool"),
        },
        "usage": {
            "enabled": _Key("bool"),
        },
        "keys": {
            "enabled": _Key("bool"),
            "store": _Key("str", _one_of("sqlite", "redis")),
            "path": _Key("str", _non_empty),
            "admin_key": _Key("str", secret=True),
            "default_reserve_tokens": bounded("int", 0, MAX_COUNT),
        },
    }
)

_SECTION_TYPES: Mapping[str, type] = types.MappingProxyType(
    {
        "server": ServerConfig,
        "proxy": ProxyConfig,
        "retries": RetriesConfig,
        "cache": CacheConfig,
        "ratelimit": RateLimitConfig,
        "circuit_breaker": BreakerConfig,
        "redis": RedisConfig,
        "log": LogConfig,
        "metrics": MetricsConfig,
        "usage": UsageConfig,
        "keys": KeysConfig,
    }
)

_TOP_LEVEL = (
    "server", "proxy", "routes", "retries", "cache", "ratelimit", "circuit_breaker", "redis", "models", "log",
    "metrics", "usage", "keys",
)  # fmt: skip

# Every scalar key's environment name, e.g. CIRCUIT_BREAKER_FAILURE_THRESHOLD.
# A fixed table (rather than splitting names at "_") makes sections with an
# underscore unambiguous and ignores unrelated variables by construction.
ENV_KEYS: Mapping[str, tuple[str, str]] = types.MappingProxyType(
    {
        f"{section}_{key}".upper(): (section, key)
        for section, keys in _SECTIONS.items()
        for key in keys
    }
)

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


def known_keys() -> list[str]:
    """Every scalar key as "section.key" (routes and models are lists/maps)."""
    return [f"{s}.{k}" for s, keys in _SECTIONS.items() for k in keys]


def _suggest(word: str, choices: Any) -> str:
    import difflib  # only for a config with a typo

    match = difflib.get_close_matches(str(word).lower(), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _from_yaml(spec: _Key, value: Any) -> Any:
    """Type-check a YAML value for `spec`, then run its check."""
    secret = spec.secret
    if value is None:
        raise _Invalid("has no value (remove the key to use the default)")
    if spec.kind == "bool":
        if not isinstance(value, bool):
            raise _Invalid(f"must be true or false, got {_describe(value, secret)}")
    elif spec.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(f"must be an integer, got {_describe(value, secret)}")
    elif spec.kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Invalid(f"must be a number, got {_describe(value, secret)}")
        value = _finite(value)
    elif spec.kind == "str":
        if not isinstance(value, str):
            raise _Invalid(f"must be a string (quote it), got {_describe(value, secret)}")
    elif spec.kind == "list":
        if not isinstance(value, list):
            raise _Invalid(f"must be a list, got {_describe(value)}")
    return _backstop(spec, spec.check(value))


def _from_env(spec: _Key, text: str) -> Any:
    """Parse an environment string to the key's type, then run its check."""
    value: Any = text
    stripped = text.strip()
    if spec.kind == "bool":
        lowered = stripped.lower()
        if lowered in _TRUE:
            value = True
        elif lowered in _FALSE:
            value = False
        else:
            raise _Invalid(f"must be true/false/1/0/yes/no/on/off, got {_describe(text)}")
    elif spec.kind == "int":
        try:
            value = int(stripped)
        except ValueError:
            raise _Invalid(f"must be an integer, got {_describe(text)}") from None
    elif spec.kind == "float":
        try:
            value = float(stripped)
        except ValueError:
            raise _Invalid(f"must be a number, got {_describe(text)}") from None
        value = _finite(value)
    elif spec.kind == "list":
        # RETRIES_ON=connect,timeout,429
        value = [item.strip() for item in stripped.split(",") if item.strip()]
    return _backstop(spec, spec.check(value))


def _finite(value: float) -> float:
    try:
        number = float(value)
    except OverflowError:  # an int beyond any double
        raise _Invalid(f"must be a finite number, got {_short(int(value))}") from None
    if not math.isfinite(number):
        raise _Invalid(f"must be a finite number, got {_describe(number)}")
    return number


def _backstop(spec: _Key, value: Any) -> Any:
    """The bound by type, for a key whose own check has none."""
    if spec.kind == "int" and not -_INT_LIMIT <= value <= _INT_LIMIT:
        raise _Invalid(f"must be an integer between -(2**63 - 1) and 2**63 - 1, got {_short(value)}")
    if spec.kind == "float" and not -_FLOAT_LIMIT <= value <= _FLOAT_LIMIT:
        raise _Invalid(f"must be between -1e15 and 1e15, got {_describe(value)}")
    return value


def _short(value: int) -> str:
    text = str(value) if value.bit_length() < 4000 else "a very long integer"
    return text if len(text) <= 40 else f"{text[:20]}... ({len(text)} digits)"


# --------------------------------------------------------------------------
# YAML reading


class _Loader(yaml.SafeLoader):
    """SafeLoader that records duplicate mapping keys: plain YAML keeps the
    last one silently, which hides a second `cache:` section in a long file."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[str, int, int]] = []  # (key, line, first line)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key = self.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if key in seen:
                    self.duplicates.append((str(key), line, seen[key]))
                else:
                    seen[key] = line
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return mapping


def _read_yaml(path: str, problems: list[Problem]) -> Any:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        problems.append(Problem(path, "", "file not found"))
        return None
    except IsADirectoryError:
        problems.append(Problem(path, "", "is a directory, not a file"))
        return None
    except OSError as exc:
        problems.append(Problem(path, "", f"cannot read: {exc.strerror or exc}"))
        return None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        problems.append(Problem(path, "", f"is not UTF-8 text (byte offset {exc.start})"))
        return None
    loader = _Loader(text)
    try:
        document = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        # Built from the marks only: str(exc) quotes the offending source
        # line, which may be the one holding the Redis password.
        problems.append(Problem(path, "", _yaml_reason(exc)))
        return None
    except yaml.YAMLError as exc:
        problems.append(Problem(path, "", f"YAML error: {type(exc).__name__}"))
        return None
    except ValueError:
        # e.g. an integer of more digits than Python converts (4300)
        problems.append(Problem(path, "", "YAML error: a value cannot be read (a number too long?)"))
        return None
    finally:
        loader.dispose()
    for key, line, first in loader.duplicates:
        problems.append(
            Problem(path, "", f"line {line}: duplicate key {key!r} (first at line {first})")
        )
    return document


def _yaml_reason(exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
    reason = f"YAML syntax error at {where}: {exc.problem or 'invalid YAML'}"
    if exc.context:
        context = exc.context
        if exc.context_mark is not None and exc.context_mark is not mark:
            context += f" started at line {exc.context_mark.line + 1}"
        reason += f" ({context})"
    return reason


# --------------------------------------------------------------------------
# Document validation


def _check_sections(
    document: Any, file: str, problems: list[Problem]
) -> tuple[dict[str, dict[str, Any]], Any, Any]:
    """Validate the scalar sections; return (typed values, raw routes, raw models)."""
    values: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    if document is None:  # empty file: defaults
        return values, None, None
    if not isinstance(document, dict):
        problems.append(
            Problem(file, "", f"must be a mapping of sections, got {_describe(document)}")
        )
        return values, None, None
    for section, body in document.items():
        name = str(section)
        if name not in _TOP_LEVEL:
            problems.append(Problem(file, name, "unknown section" + _suggest(name, _TOP_LEVEL)))
            continue
        if name in ("routes", "models"):
            continue
        if body is None:  # "cache:" with nothing under it: defaults
            continue
        if not isinstance(body, dict):
            problems.append(Problem(file, name, f"must be a mapping, got {_describe(body)}"))
            continue
        keys = _SECTIONS[name]
        for raw_key, value in body.items():
            # YAML 1.1 reads a bare `on:` key as the boolean true.
            key = "on" if raw_key is True else str(raw_key)
            if name == "keys" and key == "static":
                continue  # a list: checked by _check_static_keys
            spec = keys.get(key)
            if spec is None:
                if name == "server" and key == "host":
                    reason = 'unknown key (the host is part of server.port: "HOST:PORT")'
                else:
                    reason = "unknown key" + _suggest(key, keys)
                problems.append(Problem(file, f"{name}.{key}", reason))
                continue
            try:
                values[name][key] = _from_yaml(spec, value)
            except _Invalid as exc:
                problems.append(Problem(file, f"{name}.{key}", str(exc)))
    return values, document.get("routes"), document.get("models")


_ROUTE_KEYS = ("target", "targets", "model", "path", "strategy", "fallback_models", "api_key", "auth")
_TARGET_KEYS = ("url", "weight", "name", "api_key", "auth")
STRATEGIES = ("weighted", "least_busy", "latency")
_TARGET = _Key("str", _target_url)
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _credential(
    item: dict[str, Any],
    where: str,
    file: str,
    env: Mapping[str, str],
    problems: list[Problem],
    inherited: tuple[str, str] = ("", "bearer"),
) -> tuple[str, str] | None:
    """(api_key, auth) of a route or target; ``"${NAME}"`` reads the environment."""
    api_key, auth = inherited
    ok = True
    if "api_key" in item:
        value = item["api_key"]
        if not isinstance(value, str):
            problems.append(
                Problem(
                    file,
                    f"{where}.api_key",
                    f"must be a string (quote it), got {_describe(value, secret=True)}",
                )
            )
            ok = False
        else:
            reference = _ENV_REFERENCE.fullmatch(value.strip())
            if reference is not None:
                value = env.get(reference.group(1), "")
                if not value:
                    problems.append(
                        Problem(
                            file,
                            f"{where}.api_key",
                            f"environment variable {reference.group(1)} is not set",
                        )
                    )
                    ok = False
            api_key = value.strip()
    if "auth" in item:
        try:
            auth = _from_yaml(_Key("str", _auth), item["auth"])
        except _Invalid as exc:
            problems.append(Problem(file, f"{where}.auth", str(exc)))
            ok = False
    return (api_key, auth) if ok else None


def _check_targets(
    raw: Any,
    where: str,
    file: str,
    env: Mapping[str, str],
    problems: list[Problem],
    inherited: tuple[str, str],
) -> tuple[Target, ...] | None:
    if not isinstance(raw, list) or not raw:
        problems.append(
            Problem(file, where, f"must be a non-empty list of targets, got {_describe(raw)}")
        )
        return None
    targets: list[Target] = []
    ok = True
    labels: dict[str, int] = {}
    for index, item in enumerate(raw):
        at = f"{where}[{index}]"
        if isinstance(item, str):
            item = {"url": item}
        if not isinstance(item, dict):
            problems.append(
                Problem(file, at, f"must be a mapping with url (and weight, name, api_key, auth), "
                        f"got {_describe(item)}")
            )
            ok = False
            continue
        good = True
        for key in item:
            if key not in _TARGET_KEYS:
                problems.append(
                    Problem(file, f"{at}.{key}", "unknown key" + _suggest(key, _TARGET_KEYS))
                )
                good = False
        url = ""
        if item.get("url") is None:
            problems.append(Problem(file, f"{at}.url", "missing (every target needs one)"))
            good = False
        else:
            try:
                url = _from_yaml(_TARGET, item["url"])
            except _Invalid as exc:
                problems.append(Problem(file, f"{at}.url", str(exc)))
                good = False
        weight = item.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not (
            math.isfinite(weight) and weight > 0
        ):
            problems.append(
                Problem(file, f"{at}.weight", f"must be a number > 0, got {_describe(weight)}")
            )
            good = False
        name = item.get("name")
        if name is not None and (
            not isinstance(name, str)
            or not name.strip()
            or len(name) > 64
            or any(c.isspace() or c in '"\\,' for c in name)
        ):
            problems.append(
                Problem(
                    file,
                    f"{at}.name",
                    f"must be a short label (no spaces, quotes or commas), got {_describe(name)}",
                )
            )
            good = False
        credential = _credential(item, at, file, env, problems, inherited)
        if credential is None or not good:
            ok = False
            continue
        target = Target(url, float(weight), name, credential[0], credential[1])
        label = name or _origin_label(url)
        if label in labels:
            problems.append(
                Problem(
                    file,
                    f"{at}",
                    f"same label {label!r} as {where}[{labels[label]}]: give each target "
                    "of one url a distinct name",
                )
            )
            ok = False
            continue
        labels[label] = index
        targets.append(target)
    return tuple(targets) if ok else None


def _origin_label(url: str) -> str:
    """host:port of a validated target URL (the default target label)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.hostname}:{port}"


def _check_routes(
    raw: Any, file: str, problems: list[Problem], env: Mapping[str, str] | None = None
) -> tuple[Route, ...]:
    env = {} if env is None else env
    if raw is None:
        return ()
    if not isinstance(raw, list):
        problems.append(Problem(file, "routes", f"must be a list of routes, got {_describe(raw)}"))
        return ()
    routes = []
    for index, item in enumerate(raw):
        where = f"routes[{index}]"
        if not isinstance(item, dict):
            problems.append(
                Problem(
                    file,
                    where,
                    f"must be a mapping with target and model and/or path, got {_describe(item)}",
                )
            )
            continue
        ok = True
        for key in item:
            if key not in _ROUTE_KEYS:
                problems.append(
                    Problem(file, f"{where}.{key}", "unknown key" + _suggest(key, _ROUTE_KEYS))
                )
                ok = False
        credential = _credential(item, where, file, env, problems)
        if credential is None:
            ok = False
            credential = ("", "bearer")
        targets: tuple[Target, ...] | None = None
        has_target, has_targets = item.get("target") is not None, "targets" in item
        if has_target and has_targets:
            problems.append(
                Problem(
                    file,
                    where,
                    "has both target and targets (use one: target is a one-element targets)",
                )
            )
            ok = False
        elif has_targets:
            targets = _check_targets(
                item["targets"], f"{where}.targets", file, env, problems, credential
            )
            ok = ok and targets is not None
        elif not has_target:
            problems.append(
                Problem(file, f"{where}.target", "missing (every route needs target or targets)")
            )
            ok = False
        else:
            try:
                url = _from_yaml(_TARGET, item["target"])
                targets = (Target(url, 1.0, None, credential[0], credential[1]),)
            except _Invalid as exc:
                problems.append(Problem(file, f"{where}.target", str(exc)))
                ok = False
        strategy = "weighted"
        if "strategy" in item:
            try:
                strategy = _from_yaml(_Key("str", _one_of(*STRATEGIES)), item["strategy"])
            except _Invalid as exc:
                problems.append(Problem(file, f"{where}.strategy", str(exc)))
                ok = False
        fallbacks: tuple[str, ...] = ()
        if "fallback_models" in item:
            value = item["fallback_models"]
            if not isinstance(value, list) or not all(
                isinstance(m, str) and m.strip() for m in value
            ):
                problems.append(
                    Problem(
                        file,
                        f"{where}.fallback_models",
                        f"must be a list of model names, got {_describe(value)}",
                    )
                )
                ok = False
            else:
                fallbacks = tuple(m.strip() for m in value)
        model, path = item.get("model"), item.get("path")
        if model is not None and (not isinstance(model, str) or not model.strip()):
            problems.append(
                Problem(file, f"{where}.model", f"must be a non-empty glob, got {_describe(model)}")
            )
            ok = False
        if path is not None and (
            not isinstance(path, str)
            or not path.startswith("/")
            or any(c.isspace() or c in "?#" for c in path)
        ):
            problems.append(
                Problem(
                    file,
                    f"{where}.path",
                    f'must be a path prefix starting with "/" (no query), got {_describe(path)}',
                )
            )
            ok = False
        if model is None and path is None:
            problems.append(
                Problem(
                    file,
                    where,
                    "needs model, path or both (a route matching everything belongs in proxy.target)",
                )
            )
            ok = False
        if ok and targets:
            routes.append(
                Route(
                    target=targets[0].url,
                    model=model,
                    path=path,
                    targets=targets,
                    strategy=strategy,
                    fallback_models=fallbacks,
                )
            )
    _check_fallbacks(routes, raw, file, problems)
    return tuple(routes)


def _check_fallbacks(
    routes: list[Route], raw: list[Any], file: str, problems: list[Problem]
) -> None:
    """Every fallback model must be one some route's model glob serves."""
    globs = [re.compile(fnmatch.translate(r.model)) for r in routes if r.model]
    for index, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("fallback_models"), list):
            continue
        for position, model in enumerate(item["fallback_models"]):
            if not isinstance(model, str) or not model.strip():
                continue
            if not any(g.match(model.strip()) for g in globs):
                problems.append(
                    Problem(
                        file,
                        f"routes[{index}].fallback_models[{position}]",
                        f"no route serves model {model.strip()!r} (add a route whose model "
                        "glob matches it)",
                    )
                )


_PRICE_KEYS = ("input", "output", "cached_input", "cache_write_input")
# USD per 1K tokens. Far above any real price; keeps every cost sum finite.
MAX_PRICE = 1_000_000.0


def _price(value: Any, shape_hint: str = "") -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Invalid(f"must be a price in USD per 1K tokens{shape_hint}, got {_describe(value)}")
    if isinstance(value, int) and not -_INT_LIMIT <= value <= _INT_LIMIT:
        raise _Invalid(f"must be <= {_number(MAX_PRICE)}, got {_short(value)}")
    if not math.isfinite(value) or value < 0:
        raise _Invalid(f"must be >= 0, got {_describe(value)}")
    if value > MAX_PRICE:
        raise _Invalid(f"must be <= {_number(MAX_PRICE)}, got {_describe(value)}")
    return float(value)


def _check_models(raw: Any, file: str, problems: list[Problem]) -> dict[str, ModelPrice]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.append(
            Problem(
                file, "models", f"must be a mapping of model name to price, got {_describe(raw)}"
            )
        )
        return {}
    models: dict[str, ModelPrice] = {}
    for name, spec in raw.items():
        where = f"models.{name}"
        if not isinstance(name, str) or not name.strip():
            problems.append(
                Problem(
                    file, where, f"model name must be a string (quote it), got {_describe(name)}"
                )
            )
            continue
        if isinstance(spec, dict):
            prices: dict[str, float] = {}
            for key, value in spec.items():
                if key not in _PRICE_KEYS:
                    problems.append(
                        Problem(file, f"{where}.{key}", "unknown key" + _suggest(key, _PRICE_KEYS))
                    )
                    continue
                try:
                    prices[key] = _price(value)
                except _Invalid as exc:
                    problems.append(Problem(file, f"{where}.{key}", str(exc)))
            missing = [k for k in ("input", "output") if k not in spec]
            for key in missing:
                problems.append(Problem(file, f"{where}.{key}", "missing"))
            if len(prices) == len(spec) and not missing:
                models[name] = ModelPrice(**prices)
            continue
        try:
            price = _price(spec, " (or a mapping {input, output, cached_input, cache_write_input})")
        except _Invalid as exc:
            problems.append(Problem(file, where, str(exc)))
            continue
        models[name] = ModelPrice(input=price, output=price)
    return models


def _check_static_keys(raw: Any, file: str, problems: list[Problem]) -> tuple[StaticKey, ...]:
    """``keys.static``: the same fields as the admin API, plus id and secret_sha256."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        problems.append(Problem(file, "keys.static", f"must be a list of keys, got {_describe(raw)}"))
        return ()
    from relay.keys.model import SETTABLE, KeyError_, parse_fields

    allowed = ("id", "secret_sha256", *SETTABLE)
    out: list[StaticKey] = []
    seen: set[str] = set()
    for index, item in enumerate(raw):
        where = f"keys.static[{index}]"
        if isinstance(item, dict) and "expires_at" in item and not isinstance(item["expires_at"], str):
            # YAML reads an unquoted timestamp as a datetime; take it as written.
            value = item["expires_at"]
            if hasattr(value, "isoformat"):
                item = {**item, "expires_at": value.isoformat()}
        try:
            fields = parse_fields(item, creating=True, allowed=allowed)
        except KeyError_ as exc:
            problems.append(Problem(file, f"{where}.{exc.field}" if exc.field != "body" else where,
                                    exc.reason))
            continue
        missing = [k for k in ("id", "secret_sha256") if k not in fields]
        for key in missing:
            problems.append(Problem(file, f"{where}.{key}", "missing"))
        if missing:
            continue
        if fields["id"] in seen:
            problems.append(Problem(file, f"{where}.id", f"duplicate id {fields['id']!r}"))
            continue
        seen.add(fields["id"])
        metadata = fields.pop("metadata", {}) or {}
        out.append(StaticKey(metadata=tuple(sorted(metadata.items())), **fields))
    return tuple(out)


def _check_keys_store(values: dict[str, dict[str, Any]], file: str, problems: list[Problem]) -> None:
    keys = values["keys"]
    if keys.get("store") == "redis" and not values["redis"].get("enabled", False):
        problems.append(
            Problem(file, "keys.store", "redis needs redis.enabled: true (or use store: sqlite)")
        )


def _apply_env(
    env: Mapping[str, str], values: dict[str, dict[str, Any]], problems: list[Problem]
) -> None:
    for name, (section, key) in ENV_KEYS.items():
        text = env.get(name)
        if text is None:
            continue
        try:
            values[section][key] = _from_env(_SECTIONS[section][key], text)
        except _Invalid as exc:
            problems.append(Problem(f"${name}", f"{section}.{key}", str(exc)))


def _check_combinations(
    values: dict[str, dict[str, Any]], file: str, problems: list[Problem]
) -> None:
    """Bounds that depend on more than one key."""
    limits = values["ratelimit"]
    defaults = RateLimitConfig()
    burst = limits.get("burst", defaults.burst)
    rate = limits.get("requests_per_second", defaults.requests_per_second)
    if isinstance(burst, int) and isinstance(rate, float) and burst / rate > MAX_REFILL_SECONDS:
        # The time an empty bucket takes to refill is also how long Redis
        # keeps an idle bucket; beyond this its expiry in ms overflows.
        problems.append(
            Problem(
                file,
                "ratelimit.burst",
                f"burst / requests_per_second (the time to refill an empty bucket) must be "
                f"<= {_number(MAX_REFILL_SECONDS)} s, got {burst / rate:.4g} s",
            )
        )


def _check_redis_topology(
    redis: dict[str, Any], file: str, problems: list[Problem]
) -> None:
    """Keys that are only valid together (after the environment is applied)."""
    mode = redis.get("mode", "standalone")
    if mode == "sentinel" and not redis.get("addresses"):
        problems.append(
            Problem(
                file,
                "redis.addresses",
                'must list the sentinels ("host:port", usually port 26379) '
                "when redis.mode is sentinel",
            )
        )
    if mode == "cluster" and redis.get("db", 0) != 0:
        problems.append(Problem(file, "redis.db", "must be 0 when redis.mode is cluster"))


def _build(
    values: dict[str, dict[str, Any]],
    routes: tuple[Route, ...],
    models: dict[str, ModelPrice],
    source: str | None,
) -> Config:
    sections: dict[str, Any] = {}
    for name, cls in _SECTION_TYPES.items():
        fields = dict(values[name])
        if name == "server" and "port" in fields:
            fields["host"], fields["port"] = fields["port"]
        sections[name] = cls(**fields)
    return Config(
        routes=routes,
        models=types.MappingProxyType(dict(models)),
        source=source,
        **sections,
    )


# --------------------------------------------------------------------------
# Public entry points


def load_config(path: str | None, env: Mapping[str, str] | None = None) -> Config:
    """Load `path` (None = built-in defaults) and apply environment overrides.

    `env` defaults to os.environ; pass {} to ignore the environment.
    Raises ConfigError listing every problem found.
    """
    env = os.environ if env is None else env
    problems: list[Problem] = []
    document = None if path is None else _read_yaml(path, problems)
    file = path or "<defaults>"
    values, raw_routes, raw_models = _check_sections(document, file, problems)
    routes = _check_routes(raw_routes, file, problems, env)
    models = _check_models(raw_models, file, problems)
    raw_keys = document.get("keys") if isinstance(document, dict) else None
    static = _check_static_keys(
        raw_keys.get("static") if isinstance(raw_keys, dict) else None, file, problems
    )
    _apply_env(env, values, problems)
    _check_keys_store(values, file, problems)
    _check_combinations(values, file, problems)
    _check_redis_topology(values["redis"], file, problems)
    if problems:
        raise ConfigError(problems)
    config = _build(values, routes, models, path)
    if static:
        config = dataclasses.replace(config, keys=dataclasses.replace(config.keys, static=static))
    return config


def resolve_config_path(cli_path: str | None, env: Mapping[str, str]) -> str | None:
    """--config, else $RELAY_CONFIG, else configs/config.yaml if present, else None.

    A path given explicitly (flag or variable) must exist: silently falling
    back to defaults would hide a typo in a deployment.
    """
    explicit = cli_path or env.get(CONFIG_PATH_ENV) or None
    if explicit is not None:
        if not os.path.exists(explicit):
            raise ConfigError([Problem(explicit, "", "file not found")])
        return explicit
    if os.path.isfile(DEFAULT_CONFIG_PATH):
        return DEFAULT_CONFIG_PATH
    return None


def check_config(path: str | None, env: Mapping[str, str] | None = None) -> int:
    """`--check-config`: print "OK: <file>" and return 0, or print each
    problem to stderr and return 1. `path` is the --config value (or None)."""
    env = os.environ if env is None else env
    try:
        resolved = resolve_config_path(path, env)
        load_config(resolved, env)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    print(f"OK: {resolved if resolved is not None else 'built-in defaults'}")
    return 0


def restart_changes(running: Config, new: Config) -> list[str]:
    """The RESTART_KEYS whose values differ between two configs, sorted."""
    changed = []
    for dotted in sorted(RESTART_KEYS):
        section, key = dotted.split(".")
        if getattr(getattr(running, section), key) != getattr(getattr(new, section), key):
            changed.append(dotted)
    return changed


def keep_restart_values(running: Config, new: Config) -> Config:
    """`new` with the RESTART_KEYS values of `running`: what a reload can
    actually apply to a process that is already listening."""
    server = dataclasses.replace(
        new.server,
        host=running.server.host,
        port=running.server.port,
        workers=running.server.workers,
    )
    return dataclasses.replace(new, server=server)

