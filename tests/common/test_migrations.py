"""Migrations apply once, in order, whoever and however many start at the same moment."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg

from services.common.db import apply_migrations, create_pool

SAMPLE = Path(__file__).with_name("sample_migrations")


async def _columns(pool: asyncpg.Pool) -> list[str]:
    rows = await pool.fetch(
        "SELECT column_name FROM information_schema.columns WHERE table_schema='sample' AND table_name='things'"
        " ORDER BY ordinal_position"
    )
    return [r["column_name"] for r in rows]


async def test_applied_twice_is_a_no_op(new_database: Callable[[], Awaitable[str]]) -> None:
    pool = await create_pool(await new_database(), max_size=2)
    try:
        assert await apply_migrations(pool, "sample", SAMPLE) == ["0001_init.sql", "0002_more.sql"]
        assert await apply_migrations(pool, "sample", SAMPLE) == []
        assert await _columns(pool) == ["workspace_id", "id", "name"]
        versions = await pool.fetch("SELECT version FROM sample.schema_migrations ORDER BY version")
        assert [r["version"] for r in versions] == ["0001_init.sql", "0002_more.sql"]
    finally:
        await pool.close()


async def test_concurrent_starters_leave_one_consistent_schema(new_database: Callable[[], Awaitable[str]]) -> None:
    url = await new_database()
    pools = [await create_pool(url, max_size=1) for _ in range(6)]
    try:
        results = await asyncio.gather(*(apply_migrations(p, "sample", SAMPLE) for p in pools))
        # Exactly one starter applied each file; the others found nothing to do.
        applied = [name for result in results for name in result]
        assert sorted(applied) == ["0001_init.sql", "0002_more.sql"]
        assert await _columns(pools[0]) == ["workspace_id", "id", "name"]
        count = await pools[0].fetchval("SELECT count(*) FROM sample.schema_migrations")
        assert count == 2
    finally:
        for p in pools:
            await p.close()


async def test_a_failing_migration_leaves_nothing_half_applied(
    new_database: Callable[[], Awaitable[str]], tmp_path: Path
) -> None:
    (tmp_path / "0001_ok.sql").write_text("CREATE TABLE a (id int PRIMARY KEY);")
    (tmp_path / "0002_bad.sql").write_text("CREATE TABLE b (id int PRIMARY KEY); SELECT no_such_function();")
    pool = await create_pool(await new_database(), max_size=1)
    try:
        try:
            await apply_migrations(pool, "broken", tmp_path)
        except Exception as exc:
            assert "no_such_function" in str(exc)
        else:
            raise AssertionError("the bad migration should fail")
        tables = await pool.fetch("SELECT table_name FROM information_schema.tables WHERE table_schema='broken'")
        assert sorted(r["table_name"] for r in tables) == ["a", "schema_migrations"]
        versions = await pool.fetch("SELECT version FROM broken.schema_migrations")
        assert [r["version"] for r in versions] == ["0001_ok.sql"]
    finally:
        await pool.close()
