"""What a virtual key is: its settings, its secret, its periods, its JSON form.

One module for the rules every entry point shares (admin API, CLI, the
config's ``keys.static``): field names and types, the secret format, the
calendar periods. Nothing here touches a store.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import fnmatch
import hashlib
import math
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "KeyRecord",
    "KeyError_",
    "KeySpend",
    "PERIODS",
    "SECRET_PREFIX",
    "new_key_id",
    "new_secret",
    "parse_fields",
    "period_start",
    "secret_hash",
]

SECRET_PREFIX = "rk-"
PERIODS = ("daily", "weekly", "monthly")
# Fields a request (admin API, CLI, config) may set.
SETTABLE = ("name", "budget_usd", "budget_period", "rpm", "tpm", "models", "expires_at", "metadata")
_NAME_OK = re.compile(r"[^\x00-\x1f\x7f|]{1,128}")
_ID_OK = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class KeyError_(ValueError):
    """A bad field in a key request; ``field`` names it (400 invalid_request)."""

    def __init__(self, field_name: str, reason: str) -> None:
        super().__init__(f"{field_name}: {reason}")
        self.field = field_name
        self.reason = reason


@dataclass(frozen=True, slots=True)
class KeySpend:
    """A key's counters: spend of the current period, lifetime tokens/requests."""

    spend_usd: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A key's settings as stored (never its secret, only the secret's hash)."""

    id: str
    name: str
    secret_sha256: str
    budget_usd: float | None = None
    budget_period: str | None = None
    rpm: int | None = None
    tpm: int | None = None
    models: tuple[str, ...] | None = None
    expires_at: float | None = None  # epoch seconds (UTC)
    metadata: Mapping[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    revoked: bool = False
    static: bool = False  # declared in the config file (keys.static)
    # Worked out once per record, not per request (admission reads them for
    # every request of the key): the caller identity for the cache scope
    # and rate limits (the id, stable across rotations, never the secret),
    # and whether admission reserves anything (a budget, rpm or tpm).
    identity: bytes = field(init=False, repr=False, compare=False)
    reserves: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "identity", b"relay-key:" + self.id.encode())
        object.__setattr__(
            self, "reserves",
            self.budget_usd is not None or self.rpm is not None or self.tpm is not None,
        )

    def to_json(self, spend: KeySpend | None = None) -> dict[str, Any]:
        """The key object of the admin API and the CLI (never the secret)."""
        spend = spend or KeySpend()
        return {
            "id": self.id,
            "name": self.name,
            "budget_usd": self.budget_usd,
            "budget_period": self.budget_period,
            "rpm": self.rpm,
            "tpm": self.tpm,
            "models": list(self.models) if self.models is not None else None,
            "expires_at": iso(self.expires_at) if self.expires_at is not None else None,
            "metadata": dict(self.metadata),
            "created_at": iso(self.created_at),
            "revoked": self.revoked,
            "spend_usd": round(spend.spend_usd, 10),
            "tokens": {"prompt": spend.prompt_tokens, "completion": spend.completion_tokens},
            "requests": spend.requests,
        }

    def settings(self) -> dict[str, Any]:
        """The settable fields, as stored (for backends that serialize)."""
        return {
            "name": self.name,
            "budget_usd": self.budget_usd,
            "budget_period": self.budget_period,
            "rpm": self.rpm,
            "tpm": self.tpm,
            "models": list(self.models) if self.models is not None else None,
            "expires_at": self.expires_at,
            "metadata": dict(self.metadata),
        }

    def model_allowed(self, model: str | None) -> bool:
        """True when ``models`` is unset, the request names no model, or a glob matches."""
        if self.models is None or model is None:
            return True
        return any(fnmatch.fnmatchcase(model, glob) for glob in self.models)


def secret_hash(secret: str | bytes) -> str:
    """Hex SHA-256 of a secret: the only form a store keeps."""
    data = secret.encode() if isinstance(secret, str) else secret
    return hashlib.sha256(data).hexdigest()


def new_secret() -> str:
    """``rk-`` and 43 URL-safe random characters (256 bits)."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def new_key_id() -> str:
    return "key_" + secrets.token_hex(8)


def iso(ts: float) -> str:
    """Epoch seconds as ISO 8601 UTC (``2026-01-31T00:00:00Z``)."""
    moment = _dt.datetime.fromtimestamp(ts, _dt.UTC)
    text = moment.isoformat(timespec="milliseconds" if ts % 1 else "seconds")
    return text.replace("+00:00", "Z")


def parse_time(value: Any, field_name: str) -> float:
    """ISO 8601 (a zone, or UTC when none) -> epoch seconds."""
    if not isinstance(value, str) or not value.strip():
        raise KeyError_(field_name, f"must be an ISO 8601 time such as 2026-12-31T00:00:00Z, got {_shown(value)}")
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        moment = _dt.datetime.fromisoformat(text)
    except ValueError:
        raise KeyError_(field_name, f"must be an ISO 8601 time such as 2026-12-31T00:00:00Z, got {_shown(value)}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=_dt.UTC)
    return moment.timestamp()


def period_start(period: str | None, now: float) -> int:
    """Start of the calendar UTC period holding ``now`` (0 for lifetime)."""
    if period is None:
        return 0
    day = _dt.datetime.fromtimestamp(now, _dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "weekly":
        day -= _dt.timedelta(days=day.weekday())  # Monday
    elif period == "monthly":
        day = day.replace(day=1)
    return int(day.timestamp())


def _shown(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, int | float):
        return repr(value)
    return f"a {type(value).__name__}"


def _opt_number(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise KeyError_(name, f"must be a number or null, got {_shown(value)}")
    if value < 0:
        raise KeyError_(name, f"must be >= 0, got {_shown(value)}")
    return float(value)


def _opt_count(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise KeyError_(name, f"must be a whole number or null, got {_shown(value)}")
    if value < 1:
        raise KeyError_(name, f"must be >= 1 (null: no limit), got {_shown(value)}")
    return value


def parse_fields(data: Any, *, creating: bool, allowed: tuple[str, ...] = SETTABLE) -> dict[str, Any]:
    """Validate a request's fields; returns the normalized values given.

    Unknown fields, wrong types, negative budgets or limits, a bad period
    or time all raise :class:`KeyError_` naming the field.
    """
    if not isinstance(data, dict):
        raise KeyError_("body", "must be a JSON object")
    out: dict[str, Any] = {}
    for name in data:
        if name not in allowed:
            raise KeyError_(str(name), "unknown field (known: " + ", ".join(allowed) + ")")
    if creating and "name" not in data:
        raise KeyError_("name", "missing (every key needs a name)")
    for name, value in data.items():
        if name == "name":
            if not isinstance(value, str) or not _NAME_OK.fullmatch(value) or not value.strip():
                raise KeyError_(name, f"must be 1-128 printable characters without '|', got {_shown(value)}")
            out[name] = value
        elif name == "budget_usd":
            out[name] = _opt_number(value, name)
        elif name == "budget_period":
            if value is not None and value not in PERIODS:
                raise KeyError_(name, f"must be one of daily | weekly | monthly or null, got {_shown(value)}")
            out[name] = value
        elif name in ("rpm", "tpm"):
            out[name] = _opt_count(value, name)
        elif name == "models":
            if value is not None:
                if not isinstance(value, list) or not value or not all(
                    isinstance(g, str) and g.strip() for g in value
                ):
                    raise KeyError_(name, f"must be a non-empty list of model globs or null, got {_shown(value)}")
                value = tuple(value)
            out[name] = value
        elif name == "expires_at":
            out[name] = None if value is None else parse_time(value, name)
        elif name == "metadata":
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise KeyError_(name, f"must be a JSON object, got {_shown(value)}")
            out[name] = dict(value)
        elif name == "id":
            if not isinstance(value, str) or not _ID_OK.fullmatch(value):
                raise KeyError_(name, f"must be 1-64 of A-Z a-z 0-9 _ . -, got {_shown(value)}")
            out[name] = value
        elif name == "secret_sha256":
            if not isinstance(value, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", value):
                raise KeyError_(name, "must be 64 hex digits (the SHA-256 of the secret)")
            out[name] = value.lower()
    return out


def apply_fields(record: KeyRecord, fields: Mapping[str, Any]) -> KeyRecord:
    """``record`` with the validated ``fields`` replaced."""
    return dataclasses.replace(record, **{k: v for k, v in fields.items() if k in SETTABLE})
