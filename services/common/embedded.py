"""The database URL: ``PARLEY_DATABASE_URL`` when set, else an embedded PostgreSQL (pgserver)."""

from __future__ import annotations

import warnings
from pathlib import Path

from services.common.settings import Settings

EMBEDDED_DB = "parley"


def embedded_server_url(data_dir: str | Path) -> str:
    """Start (or reuse) the embedded server whose data lives under ``data_dir``; its admin URL.

    The server keeps running after this process exits so later runs reuse it; it listens
    on a Unix socket inside its data folder only, so it never collides with other servers.
    """
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    import pgserver  # imported late: only needed when no database URL is given

    pgdata = Path(data_dir) / "pgdata"
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(pgdata, cleanup_mode=None)
    return str(server.get_uri())


def with_database(url: str, database: str) -> str:
    """``url`` pointing at another database on the same server."""
    base, _, query = url.partition("?")
    scheme, _, rest = base.partition("://")
    authority, _, _old = rest.partition("/")
    return f"{scheme}://{authority}/{database}" + (f"?{query}" if query else "")


def database_url(settings: Settings) -> str:
    """Where this process's data lives; creates the embedded server's ``parley`` database once."""
    if settings.database_url:
        return settings.database_url
    admin = embedded_server_url(settings.data_dir)
    _ensure_database(admin, EMBEDDED_DB)
    return with_database(admin, EMBEDDED_DB)


def _ensure_database(admin_url: str, name: str) -> None:
    import asyncio

    import asyncpg

    async def create() -> None:
        conn = await asyncpg.connect(admin_url)
        try:
            exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
            if not exists:
                try:
                    await conn.execute(f'CREATE DATABASE "{name}"')
                except asyncpg.DuplicateDatabaseError:
                    pass  # another process won the race
        finally:
            await conn.close()

    # Callers run this outside any event loop (in a thread when a loop is running).
    asyncio.run(create())
