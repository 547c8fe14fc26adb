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
from collections.abc import Sequence
from typing import Any

from relay.config import ConfigError, load_config, resolve_config_path

from .manage import KeyManager, NotFound
from .model import KeyError_
from .store import StoreUnavailable
from .stores import KeyStoreError, open_store

__all__ = ["main"]

_NULLS = ("none", "null", "")


class _Usage(Exception):
    """A flag whose value cannot be used; the message says which and why."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="relay keys", description="Manage relay's virtual keys.")
    p.add_argument("--config", metavar="PATH", help="config file naming the key store")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def settings(cmd: argparse.ArgumentParser, creating: bool) -> None:
        cmd.add_argument("--name", required=creating, help="the application's name")
        cmd.add_argument("--budget-usd", metavar="X", help="budget in USD per period (none: no budget)")
        cmd.add_argument("--budget-period", metavar="P", help="daily | weekly | monthly | none (lifetime)")
        cmd.add_argument("--rpm", metavar="N", help="requests per minute (none: no limit)")
        cmd.add_argument("--tpm", metavar="N", help="tokens per minute (none: no limit)")
        cmd.add_argument("--models", metavar="G,G", help="allowed model globs, comma-separated (none: all)")
        cmd.add_argument("--expires-at", metavar="T", help="ISO 8601 time it stops working (none: never)")
        cmd.add_argument("--metadata", metavar="JSON", help="a JSON object kept with the key")

    settings(sub.add_parser("create", help="create a key (prints its secret, once)"), True)
    sub.add_parser("list", help="list every key")
    for name, text in (("show", "show one key"), ("rotate", "new secret; the old one stops"),
                       ("revoke", "revoke a key")):
        sub.add_parser(name, help=text).add_argument("id")
    update = sub.add_parser("update", help="change a key's settings")
    update.add_argument("id")
    settings(update, False)
    return p


def _number(text: str, name: str, whole: bool) -> Any:
    if text.strip().lower() in _NULLS:
        return None
    try:
        return int(text) if whole else float(text)
    except ValueError:
        kind = "a whole number" if whole else "a number"
        raise KeyError_(name, f"must be {kind} or none, got {text!r}") from None


def _fields(args: argparse.Namespace) -> dict[str, Any]:
    """The flags given, as admin-API fields (validated by the same rules)."""
    fields: dict[str, Any] = {}
    if args.name is not None:
        fields["name"] = args.name
    if args.budget_usd is not None:
        fields["budget_usd"] = _number(args.budget_usd, "budget_usd", whole=False)
    if args.budget_period is not None:
        value = args.budget_period.strip().lower()
        fields["budget_period"] = None if value in _NULLS else value
    for name in ("rpm", "tpm"):
        value = getattr(args, name)
        if value is not None:
            fields[name] = _number(value, name, whole=True)
    if args.models is not None:
        text = args.models.strip()
        fields["models"] = (
            None if text.lower() in _NULLS else [g.strip() for g in text.split(",") if g.strip()]
        )
    if args.expires_at is not None:
        text = args.expires_at.strip()
        fields["expires_at"] = None if text.lower() in _NULLS else text
    if args.metadata is not None:
        try:
            fields["metadata"] = json.loads(args.metadata)
        except ValueError:
            raise KeyError_("metadata", "must be a JSON object") from None
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
