"""The ``parley`` admin command: workspaces and API keys (and campaigns, from the campaign service)."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg

from services.common import tenancy
from services.common.db import create_pool
from services.common.embedded import database_url
from services.common.errors import ParleyError
from services.common.settings import load_settings

Handler = Callable[[asyncpg.Pool, argparse.Namespace], Awaitable[None]]


async def _workspace_create(pool: asyncpg.Pool, args: argparse.Namespace) -> None:
    ws, key = await tenancy.create_workspace(pool, args.name, args.region)
    print(f"workspace {ws.name} id={ws.id} region={ws.default_region}")
    print("API key (shown once, store it now):")
    print(key)


async def _workspace_list(pool: asyncpg.Pool, args: argparse.Namespace) -> None:
    for ws in await tenancy.list_workspaces(pool):
        print(f"{ws.id}\t{ws.name}\t{ws.default_region}")


async def _key_create(pool: asyncpg.Pool, args: argparse.Namespace) -> None:
    scope = tenancy.WRITE if args.write_only else tenancy.FULL
    key_id, key = await tenancy.create_key(pool, args.workspace, args.label, scope)
    print(f"key id={key_id} scope={scope} (shown once, store it now):")
    print(key)


async def _key_list(pool: asyncpg.Pool, args: argparse.Namespace) -> None:
    for key in await tenancy.list_keys(pool, args.workspace):
        state = f"revoked {key.revoke_time.isoformat()}" if key.revoke_time else "active"
        print(f"{key.id}\t{key.scope}\t{state}\tcreated {key.create_time.isoformat()}\t{key.label}")


async def _key_revoke(pool: asyncpg.Pool, args: argparse.Namespace) -> None:
    await tenancy.revoke_key(pool, args.key_id)
    print(f"key {args.key_id} revoked")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parley", description="Parley administration.")
    sub = parser.add_subparsers(dest="command", required=True)

    workspace = sub.add_parser("workspace", help="manage workspaces").add_subparsers(dest="action", required=True)
    create = workspace.add_parser("create", help="create a workspace; prints its first API key last")
    create.add_argument("name")
    create.add_argument("--region", default="US", help="default region for phones without a country code")
    create.set_defaults(db_handler=_workspace_create)
    workspace.add_parser("list", help="list workspaces").set_defaults(db_handler=_workspace_list)

    key = sub.add_parser("key", help="manage API keys").add_subparsers(dest="action", required=True)
    kc = key.add_parser("create", help="create an API key; prints it last")
    kc.add_argument("workspace", help="workspace name or id")
    kc.add_argument("--label", default="")
    kc.add_argument(
        "--write-only",
        action="store_true",
        help="a write key: it may only send events (for a website or app, where anyone can read it)",
    )
    kc.set_defaults(db_handler=_key_create)
    kl = key.add_parser("list", help="list a workspace's keys (ids, never secrets)")
    kl.add_argument("workspace", help="workspace name or id")
    kl.set_defaults(db_handler=_key_list)
    kr = key.add_parser("revoke", help="revoke a key by id")
    kr.add_argument("key_id")
    kr.set_defaults(db_handler=_key_revoke)

    # Commands owned by services (e.g. `parley campaigns apply`), when present.
    for module_name in ("services.campaign.cli",):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        module.register(sub)
    return parser


async def _run_db(handler: Handler, args: argparse.Namespace) -> None:
    settings = load_settings()
    pool = await create_pool(await asyncio.to_thread(database_url, settings), max_size=2)
    try:
        await tenancy.migrate(pool)
        await handler(pool, args)
    finally:
        await pool.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        db_handler: Handler | None = getattr(args, "db_handler", None)
        if db_handler is not None:
            asyncio.run(_run_db(db_handler, args))
            return 0
        func: Callable[[argparse.Namespace], Any] = args.func
        result = func(args)
        if asyncio.iscoroutine(result):
            result = asyncio.run(result)
        return int(result or 0)
    except ParleyError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
