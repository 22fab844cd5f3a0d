"""asyncpg pools and per-service SQL migrations applied under an advisory lock."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import asyncpg
import orjson
import structlog

log = structlog.get_logger(__name__)

_MIGRATION_NAME = re.compile(r"^(\d{4})_[\w-]+\.sql$")
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")


# jsonb's binary wire format: a version byte, then the JSON text. orjson reads and writes it
# 5-10 times faster than the json module (identity decodes every locked user's traits); the
# json module takes what orjson does not: dicts with non-string keys and integers beyond 64
# bits, which orjson refuses to write and reads as floats (any run of 19 digits, even inside
# a string, sends a value there, so no number is read inexactly).
_JSONB_VERSION = b"\x01"
_LONG_DIGITS = re.compile(rb"\d{19}")


def dumps_json(value: object) -> bytes:
    """``value`` as JSON text, the way jsonb columns are written (see above)."""
    try:
        return orjson.dumps(value)
    except TypeError:
        # Compact and UTF-8 like orjson's, so a value's size reads the same either way (identity
        # bounds contact properties by it).
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _jsonb_encode(value: object) -> bytes:
    return _JSONB_VERSION + dumps_json(value)


def _jsonb_decode(data: bytes) -> object:
    if _LONG_DIGITS.search(data) is None:
        return orjson.loads(data[1:])
    return json.loads(data[1:])


async def _init_connection(conn: asyncpg.Connection) -> None:
    # json/jsonb columns read and write Python objects. jsonb in binary format, so COPY (binary
    # only) can write jsonb columns too.
    await conn.set_type_codec("json", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    await conn.set_type_codec(
        "jsonb", encoder=_jsonb_encode, decoder=_jsonb_decode, schema="pg_catalog", format="binary"
    )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Release without asyncpg's default reset query (a round trip and a commit per release).

    The pool still rolls back a transaction left open and drops listener callbacks; what the
    default query also clears — session settings, session advisory locks, LISTENs, cursors —
    Parley code never leaves behind on a released connection: settings are ``SET LOCAL``,
    advisory locks are transaction-scoped or released in ``finally``, and identity's LISTEN runs
    on a connection of its own, outside the pool.
    """


# How long a transaction may sit idle, waiting on its service, before PostgreSQL ends it (0: never).
# One left open by a frozen process or a network partition would otherwise hold its locks until
# TCP noticed (a frozen process's never), and an identity batch's would hold back every
# subscriber of the event stream (which waits for older open writers, to stay gap-safe).
# Transactions that wait longer by design set their own limit with SET LOCAL: identity's batches
# a shorter one, campaign's batches of runs (which call other services) a longer one.
IDLE_TRANSACTION_TIMEOUT_MS = 60_000


async def create_pool(
    dsn: str, *, min_size: int = 1, max_size: int = 10, idle_transaction_timeout_ms: int = IDLE_TRANSACTION_TIMEOUT_MS
) -> asyncpg.Pool:
    """A pool whose connections map json/jsonb to Python objects."""
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
        reset=_keep_session,
        # asyncpg prepares every statement, and after five runs PostgreSQL may switch one to a
        # generic plan chosen without its arguments — often while tables are still small. For
        # the array-driven batch statements every service runs, that plan scans whole tables
        # (measured: 5.9 ms against 1.0 ms of backend CPU per small identity batch; trigger-to-send
        # p99 at 200 events/s 174 ms against 61 ms). Planning each run costs far less.
        server_settings={
            "plan_cache_mode": "force_custom_plan",
            "idle_in_transaction_session_timeout": str(idle_transaction_timeout_ms),
            # A peer gone without closing (a partition, a dead host) is found within ~2 minutes
            # instead of the system's default of over two hours (TCP connections only).
            "tcp_keepalives_idle": "60",
            "tcp_keepalives_interval": "10",
            "tcp_keepalives_count": "6",
        },
    )
    assert pool is not None
    return pool


def _lock_key(schema: str) -> int:
    # Stable 63-bit key per schema, so services migrate in parallel but replicas of one wait.
    return int.from_bytes(hashlib.sha256(f"parley-migrate:{schema}".encode()).digest()[:8], "big") >> 1


def _read_migrations(directory: Path) -> list[tuple[str, str]]:
    """(file name, SQL) of the numbered migrations in ``directory``, in order; a few small files."""
    paths = sorted(p for p in Path(directory).glob("*.sql") if _MIGRATION_NAME.match(p.name))
    return [(p.name, p.read_text()) for p in paths]


async def apply_migrations(pool: asyncpg.Pool, schema: str, directory: Path) -> list[str]:
    """Apply ``directory``'s ``NNNN_name.sql`` files not yet recorded in ``<schema>.schema_migrations``.

    Safe with concurrent starters: one holds the advisory lock while the others wait, then
    find nothing left to do. Each file runs in its own transaction with ``search_path``
    set to the schema. Returns the names applied now.
    """
    if not _SCHEMA_NAME.match(schema):
        raise ValueError(f"bad schema name {schema!r}")
    files = _read_migrations(directory)
    applied_now: list[str] = []
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock($1)", _lock_key(schema))
        try:
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
            await conn.execute(
                f"""CREATE TABLE IF NOT EXISTS {schema}.schema_migrations (
                        version text PRIMARY KEY,
                        checksum text NOT NULL,
                        applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            rows = await conn.fetch(f"SELECT version, checksum FROM {schema}.schema_migrations")
            done = {r["version"]: r["checksum"] for r in rows}
            for name, sql in files:
                checksum = hashlib.sha256(sql.encode()).hexdigest()
                if name in done:
                    if done[name] != checksum:
                        log.warning("migration_changed_after_apply", schema=schema, migration=name)
                    continue
                async with conn.transaction():
                    await conn.execute(f"SET LOCAL search_path TO {schema}, public")
                    await conn.execute(sql)
                    await conn.execute(
                        f"INSERT INTO {schema}.schema_migrations (version, checksum) VALUES ($1, $2)",
                        name,
                        checksum,
                    )
                applied_now.append(name)
                log.info("migration_applied", schema=schema, migration=name)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _lock_key(schema))
    return applied_now
