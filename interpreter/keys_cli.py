"""``interpreter keys``: managed API keys straight in the configured store, no server needed.

Works beside a running server (SQLite and Redis both take concurrent writers); a server notices a
change within its 5 s cache. Output is JSON, so scripts can read it; ``create`` prints the key once.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import trio
import trio_asyncio

from interpreter.auth.managed import PERIODS, ManagedKeys
from interpreter.settings import Settings
from interpreter.stores.open import open_kv
from interpreter.stores.protocols import StoreError


def add_parser(commands: Any) -> None:
    keys = commands.add_parser("keys", help="create, list, revoke managed API keys and set their rate limits")
    actions = keys.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="create a key (printed once)")
    create.add_argument("name")
    actions.add_parser("list", help="list managed keys (never the keys themselves)")
    revoke = actions.add_parser("revoke", help="delete a key for good")
    revoke.add_argument("key_hash")
    limits = actions.add_parser("set-limits", help="replace a key's rate limits (omitted periods: unlimited)")
    limits.add_argument("key_hash")
    for command in (create, limits):
        for period in PERIODS:
            command.add_argument(f"--{period.replace('_', '-')}", type=_positive, dest=period, metavar="N")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("a limit is a positive number of requests")
    return value


def run(settings: Settings, args: argparse.Namespace) -> int:
    try:
        return trio.run(_run, settings, args)
    except StoreError as exc:
        print(f"interpreter: storage unavailable: {exc}", file=sys.stderr)
        return 1


async def _run(settings: Settings, args: argparse.Namespace) -> int:
    limits = {period: getattr(args, period, None) for period in PERIODS}
    async with trio_asyncio.open_loop(), open_kv(settings) as kv:
        keys = ManagedKeys(kv, rate_limits_enabled=False)
        if args.action == "create":
            key, record = await keys.create(args.name, limits, {})
            _print({"api_key": key, "record": record.public()})
        elif args.action == "list":
            _print([record.public(await keys.usage(record.key_hash)) for record in await keys.records()])
        else:
            found = await keys.get(args.key_hash)
            if found is None:
                print(f"interpreter: no managed key {args.key_hash[:80]}", file=sys.stderr)
                return 1
            if args.action == "revoke":
                await keys.delete(found.key_hash)
            else:
                found.rate_limits = limits
                await keys.save(found)
            _print(found.public(await keys.usage(found.key_hash)))
    return 0


def _print(value: object) -> None:
    print(json.dumps(value, indent=2))
