"""``python -m relay keys ...``: manage virtual keys from a shell.

Works on the store the config names (found as relay finds its config:
``--config``, ``$RELAY_CONFIG``, ``configs/config.yaml``), so a key made
here works at once in a running relay using the same store. Prints the
key object as JSON and exits 0, or prints what is wrong and exits 1
(2 for a config that cannot be used).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from relay.config import ConfigError, load_config, resolve_config_path

from .manage import KeyManager, NotFound
from .model import KeyError_
from .store import StoreUnavailable
from .stores import KeyStoreError, open_store

__all__ = ["main"]

_NULLS = ("none", "null", "")


class _Usage(Exception):
    """A flag whose value cannot be used; the message says which and why."""


def _number(whole: bool) -> Callable[[str, str], Any]:
    def read(text: str, field: str) -> Any:
        try:
            return int(text) if whole else float(text)
        except ValueError:
            kind = "a whole number" if whole else "a number"
            raise KeyError_(field, f"must be {kind} or none, got {text!r}") from None

    return read


def _metadata(text: str, field: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        raise KeyError_(field, "must be a JSON object") from None


class _Setting(NamedTuple):
    """A key setting as a flag of ``create`` and ``update``."""

    field: str  # the admin API's field; the flag is --field-with-dashes
    metavar: str | None
    help: str
    parse: Callable[[str, str], Any]  # (flag's text, field) -> the field's value
    nullable: bool  # "none" (or "null", or nothing) clears it


_SETTINGS = (
    _Setting("name", None, "the application's name", lambda text, _: text, False),
    _Setting("budget_usd", "X", "budget in USD per period (none: no budget)", _number(False), True),
    _Setting("budget_period", "P", "daily | weekly | monthly | none (lifetime)",
             lambda text, _: text.strip().lower(), True),
    _Setting("rpm", "N", "requests per minute (none: no limit)", _number(True), True),
    _Setting("tpm", "N", "tokens per minute (none: no limit)", _number(True), True),
    _Setting("models", "G,G", "allowed model globs, comma-separated (none: all)",
             lambda text, _: [g.strip() for g in text.split(",") if g.strip()], True),
    _Setting("expires_at", "T", "ISO 8601 time it stops working (none: never)",
             lambda text, _: text.strip(), True),
    _Setting("metadata", "JSON", "a JSON object kept with the key", _metadata, False),
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="relay keys", description="Manage relay's virtual keys.")
    p.add_argument("--config", metavar="PATH", help="config file naming the key store")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    create = sub.add_parser("create", help="create a key (prints its secret, once)")
    sub.add_parser("list", help="list every key")
    for name, text in (("show", "show one key"), ("rotate", "new secret; the old one stops"),
                       ("revoke", "revoke a key")):
        sub.add_parser(name, help=text).add_argument("id")
    update = sub.add_parser("update", help="change a key's settings")
    update.add_argument("id")
    for cmd in (create, update):
        for setting in _SETTINGS:
            cmd.add_argument(
                "--" + setting.field.replace("_", "-"),
                metavar=setting.metavar,
                required=cmd is create and setting.field == "name",
                help=setting.help,
            )
    return p


def _fields(args: argparse.Namespace) -> dict[str, Any]:
    """The flags given, as admin-API fields (validated by the same rules)."""
    fields: dict[str, Any] = {}
    for setting in _SETTINGS:
        text = getattr(args, setting.field)
        if text is None:
            continue
        if setting.nullable and text.strip().lower() in _NULLS:
            fields[setting.field] = None
        else:
            fields[setting.field] = setting.parse(text, setting.field)
    return fields


async def _run(args: argparse.Namespace) -> Any:
    path = resolve_config_path(args.config, os.environ)
    config = load_config(path, os.environ)
    redis = None
    if config.keys.store == "redis":
        from relay.redisconn import RedisConnection

        r = config.redis
        redis = RedisConnection(r.address, r.password, r.db, max(r.timeout, 2.0))
    store = open_store(config.keys, redis)
    try:
        manager = KeyManager(store)
        command = args.command
        if command == "create":
            return await manager.create(_fields(args))
        if command == "list":
            return await manager.list()
        if command == "show":
            return await manager.show(args.id)
        if command == "update":
            fields = _fields(args)
            if not fields:
                raise _Usage("update: give at least one setting to change (see --help)")
            return await manager.update(args.id, fields)
        if command == "rotate":
            return await manager.rotate(args.id)
        return await manager.revoke(args.id)
    finally:
        await store.close()
        if redis is not None:
            await redis.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        result = asyncio.run(_run(args))
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"relay keys: {problem}", file=sys.stderr)
        return 2
    except KeyStoreError as exc:
        print(f"relay keys: {exc}", file=sys.stderr)
        return 2
    except KeyError_ as exc:
        print(f"relay keys: invalid {exc.field.replace('_', '-')}: {exc.reason}", file=sys.stderr)
        return 1
    except NotFound as exc:
        print(f"relay keys: no key with id {exc.args[0]!r}", file=sys.stderr)
        return 1
    except StoreUnavailable as exc:
        print(f"relay keys: the key store is unavailable: {exc}", file=sys.stderr)
        return 1
    except _Usage as exc:
        print(f"relay keys: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0
