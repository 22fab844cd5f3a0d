"""A connection back in the pool carries nothing of the transaction its last user left open."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from services.common.db import create_pool


async def test_released_connection_rolls_back_an_open_transaction(
    new_database: Callable[[], Awaitable[str]],
) -> None:
    pool = await create_pool(await new_database(), min_size=1, max_size=1)
    try:
        await pool.execute("CREATE TABLE t (x int)")
        conn = await pool.acquire()
        await conn.execute("BEGIN")
        await conn.execute("INSERT INTO t VALUES (1)")
        await conn.execute("SELECT pg_advisory_xact_lock(42)")
        await pool.release(conn)
        async with pool.acquire() as again:  # the same and only connection
            assert not again.is_in_transaction()
            assert await again.fetchval("SELECT count(*) FROM t") == 0
            assert await again.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == 0
    finally:
        await pool.close()


async def test_statements_are_planned_with_their_arguments(new_database: Callable[[], Awaitable[str]]) -> None:
    pool = await create_pool(await new_database(), max_size=1)
    try:
        assert await pool.fetchval("SHOW plan_cache_mode") == "force_custom_plan"
    finally:
        await pool.close()
