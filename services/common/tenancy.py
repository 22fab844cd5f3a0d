"""Workspaces and API keys (the ``tenancy`` schema): creation, revocation and verification."""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import asyncpg
import phonenumbers

from services.common.context import Workspace
from services.common.db import apply_migrations
from services.common.errors import AlreadyExists, InvalidArgument, NotFound, Unauthenticated

SCHEMA = "tenancy"
MIGRATIONS = Path(__file__).with_name("tenancy_migrations")
KEY_PREFIX = "pk_"
# What a key may do: every API of its workspace, or only send events (a key a website or an app
# embeds, which anyone can read there: it must not read contacts or send messages).
FULL = "full"
WRITE = "write"
SCOPES = (FULL, WRITE)


@dataclass(frozen=True)
class ApiKey:
    id: str
    workspace_id: str
    label: str
    create_time: datetime
    revoke_time: datetime | None
    scope: str = FULL


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _row_to_workspace(row: asyncpg.Record) -> Workspace:
    return Workspace(id=str(row["id"]), name=row["name"], default_region=row["default_region"])


async def migrate(pool: asyncpg.Pool) -> None:
    await apply_migrations(pool, SCHEMA, MIGRATIONS)


async def create_workspace(pool: asyncpg.Pool, name: str, default_region: str = "US") -> tuple[Workspace, str]:
    """A new workspace and its first API key (returned once, in plaintext)."""
    name = name.strip()
    if not name or len(name) > 100:
        raise InvalidArgument.field("name", "must be 1..100 characters")
    region = default_region.upper()
    if region not in phonenumbers.SUPPORTED_REGIONS:
        raise InvalidArgument.field("default_region", f"unknown region {default_region!r}")
    async with pool.acquire() as conn, conn.transaction():
        try:
            row = await conn.fetchrow(
                "INSERT INTO tenancy.workspaces (name, default_region) VALUES ($1, $2) RETURNING *", name, region
            )
        except asyncpg.UniqueViolationError as exc:
            raise AlreadyExists(f"workspace {name!r} already exists") from exc
        workspace = _row_to_workspace(row)
        _, key = await _insert_key(conn, workspace.id, "first key")
    return workspace, key


async def _insert_key(conn: asyncpg.Connection, workspace_id: str, label: str, scope: str = FULL) -> tuple[str, str]:
    if scope not in SCOPES:
        raise InvalidArgument.field("scope", f"must be one of {', '.join(SCOPES)}")
    key_id = secrets.token_hex(6)
    key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    await conn.execute(
        "INSERT INTO tenancy.api_keys (workspace_id, id, key_hash, label, scope) VALUES ($1, $2, $3, $4, $5)",
        workspace_id,
        key_id,
        _digest(key),
        label,
        scope,
    )
    return key_id, key


async def find_workspace(pool: asyncpg.Pool, name_or_id: str) -> Workspace:
    row = await pool.fetchrow("SELECT * FROM tenancy.workspaces WHERE name = $1 OR id::text = $1 LIMIT 1", name_or_id)
    if row is None:
        raise NotFound(f"workspace {name_or_id!r} not found")
    return _row_to_workspace(row)


async def list_workspaces(pool: asyncpg.Pool) -> list[Workspace]:
    rows = await pool.fetch("SELECT * FROM tenancy.workspaces ORDER BY create_time")
    return [_row_to_workspace(r) for r in rows]


async def create_key(pool: asyncpg.Pool, workspace: str, label: str = "", scope: str = FULL) -> tuple[str, str]:
    """A new key for the workspace (by name or id): ``(key_id, key)``; ``scope`` is ``FULL`` or ``WRITE``."""
    ws = await find_workspace(pool, workspace)
    async with pool.acquire() as conn:
        return await _insert_key(conn, ws.id, label, scope)


async def list_keys(pool: asyncpg.Pool, workspace: str) -> list[ApiKey]:
    ws = await find_workspace(pool, workspace)
    rows = await pool.fetch("SELECT * FROM tenancy.api_keys WHERE workspace_id = $1 ORDER BY create_time", ws.id)
    return [
        ApiKey(r["id"], str(r["workspace_id"]), r["label"], r["create_time"], r["revoke_time"], r["scope"])
        for r in rows
    ]


async def revoke_key(pool: asyncpg.Pool, key_id: str) -> None:
    done = await pool.fetchval(
        "UPDATE tenancy.api_keys SET revoke_time = coalesce(revoke_time, now()) WHERE id = $1 RETURNING id",
        key_id,
    )
    if done is None:
        raise NotFound(f"key {key_id!r} not found")


async def internal_token(pool: asyncpg.Pool) -> str:
    """The database's service-to-service token, generated on first use."""
    await pool.execute(
        "INSERT INTO tenancy.internal_secret (token) VALUES ($1) ON CONFLICT DO NOTHING",
        secrets.token_urlsafe(32),
    )
    return str(await pool.fetchval("SELECT token FROM tenancy.internal_secret"))


class KeyVerifier:
    """Resolves API keys to workspaces, with a short cache so the hot path skips the database."""

    def __init__(self, pool: asyncpg.Pool, internal: str, cache_seconds: float = 5.0) -> None:
        self._pool = pool
        self.internal_token = internal
        self._cache_seconds = cache_seconds
        self._cache: dict[bytes, tuple[float, Workspace, str]] = {}
        self._by_id: dict[str, tuple[float, Workspace]] = {}

    def is_internal(self, token: str) -> bool:
        return secrets.compare_digest(token.encode(), self.internal_token.encode())

    async def verify(self, key: str) -> Workspace:
        """The key's workspace; UNAUTHENTICATED for an unknown or revoked key."""
        return (await self.verify_scoped(key))[0]

    async def verify_scoped(self, key: str) -> tuple[Workspace, str]:
        """The key's workspace and scope (``FULL`` or ``WRITE``); UNAUTHENTICATED for an unknown
        or revoked key."""
        if not key:
            raise Unauthenticated("missing API key")
        try:
            digest = _digest(key)
        except UnicodeEncodeError:
            # A lone surrogate (a JSON "\ud800" escape, an undecodable header byte) is no key of ours.
            raise Unauthenticated("invalid or revoked API key") from None
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit and hit[0] > now:
            return hit[1], hit[2]
        row = await self._pool.fetchrow(
            """SELECT w.*, k.scope FROM tenancy.api_keys k JOIN tenancy.workspaces w ON w.id = k.workspace_id
               WHERE k.key_hash = $1 AND k.revoke_time IS NULL""",
            digest,
        )
        if row is None:
            self._cache.pop(digest, None)
            raise Unauthenticated("invalid or revoked API key")
        ws = _row_to_workspace(row)
        scope = str(row["scope"])
        if self._cache_seconds > 0:
            self._cache[digest] = (now + self._cache_seconds, ws, scope)
        return ws, scope

    async def workspace_by_id(self, workspace_id: str) -> Workspace:
        """The workspace an internal call names; UNAUTHENTICATED when it does not exist."""
        now = time.monotonic()
        hit = self._by_id.get(workspace_id)
        if hit and hit[0] > now:
            return hit[1]
        try:
            row = await self._pool.fetchrow("SELECT * FROM tenancy.workspaces WHERE id = $1::uuid", workspace_id)
        except (asyncpg.DataError, asyncpg.InvalidTextRepresentationError):
            row = None
        if row is None:
            raise Unauthenticated(f"unknown workspace {workspace_id!r}")
        ws = _row_to_workspace(row)
        self._by_id[workspace_id] = (now + max(self._cache_seconds, 60.0), ws)
        return ws
