"""Session fixtures: a real PostgreSQL (PARLEY_DATABASE_URL, else embedded) and fresh databases."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest

from services.common import tenancy
from services.common.context import Workspace
from services.common.db import create_pool
from services.common.embedded import embedded_server_url, with_database
from services.common.settings import PROJECT_ROOT


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    """A URL of a database on the test server where databases can be created."""
    url = os.environ.get("PARLEY_DATABASE_URL")
    if url:
        return url
    return embedded_server_url(os.environ.get("PARLEY_TEST_DATA_DIR", str(PROJECT_ROOT / ".parley" / "test")))


@pytest.fixture(scope="session")
async def new_database(pg_admin_url: str) -> AsyncIterator[Callable[[], Awaitable[str]]]:
    """Factory: a fresh, empty database on the test server; all are dropped at the end."""
    created: list[str] = []

    async def make() -> str:
        name = f"parley_t_{uuid.uuid4().hex[:12]}"
        conn = await asyncpg.connect(pg_admin_url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        created.append(name)
        return with_database(pg_admin_url, name)

    yield make
    conn = await asyncpg.connect(pg_admin_url)
    try:
        for name in created:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="module")
async def db_url(new_database: Callable[[], Awaitable[str]]) -> str:
    """A fresh database for the test module."""
    return await new_database()


@pytest.fixture(scope="session")
async def make_workspace() -> AsyncIterator[Callable[..., Awaitable[tuple[Workspace, str]]]]:
    """Factory: ``ws, api_key = await make_workspace(db_url, "acme")`` (name defaults to unique)."""
    pools: dict[str, asyncpg.Pool] = {}

    async def make(db_url: str, name: str | None = None, default_region: str = "US") -> tuple[Workspace, str]:
        pool = pools.get(db_url)
        if pool is None:
            pool = pools[db_url] = await create_pool(db_url, max_size=2)
            await tenancy.migrate(pool)
        return await tenancy.create_workspace(pool, name or f"ws-{uuid.uuid4().hex[:8]}", default_region)

    yield make
    for pool in pools.values():
        await pool.close()
