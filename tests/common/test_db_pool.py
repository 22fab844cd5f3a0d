"""A connection back in the pool carries nothing of the transaction its last user left open."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import asyncpg
import pytest

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


async def test_a_transaction_left_idle_is_ended_by_the_server(new_database: Callable[[], Awaitable[str]]) -> None:
    # A frozen process must not hold its locks (and the event stream) for ever.
    pool = await create_pool(await new_database(), max_size=1, idle_transaction_timeout_ms=200)
    try:
        assert await pool.fetchval("SHOW idle_in_transaction_session_timeout") == "200ms"
        conn = await pool.acquire()
        try:
            await conn.execute("BEGIN")
            await conn.execute("SELECT pg_advisory_xact_lock(7)")
            await asyncio.sleep(1.0)
            with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError)):
                await conn.fetchval("SELECT 1")
        finally:
            await pool.release(conn)
        async with pool.acquire() as again:
            assert await again.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == 0
    finally:
        await pool.close()


async def test_jsonb_values_round_trip_exactly(new_database: Callable[[], Awaitable[str]]) -> None:
    """The fast JSON path must not change a value: integers past 64 bits and the digits of long
    strings come back exact, non-string keys become strings, and COPY writes the same."""
    values: list[object] = [
        {},
        {"a": 1.5, "b": [1, None, "x", True], "c": {"d": "é"}},
        {"big": 2**70, "neg": -(2**64) - 1, "float": 1.2345678901234568e29},
        {"digits": "1234567890123456789012", "n": 12345678901234567},
        {1: "one"},
        [1, 2.0, "3"],
        "text",
    ]
    expected = list(values)
    expected[4] = {"1": "one"}
    # PostgreSQL prints that float's numeric value in full, as the json module reads it too.
    expected[2] = {**values[2], "float": 123456789012345680000000000000}  # type: ignore[dict-item]
    pool = await create_pool(await new_database(), max_size=1)
    try:
        await pool.execute("CREATE TABLE j (i int, v jsonb)")
        await pool.executemany("INSERT INTO j VALUES ($1, $2)", list(enumerate(values)))
        async with pool.acquire() as conn:
            await conn.copy_records_to_table("j", records=[(100 + i, v) for i, v in enumerate(values)])
        rows = await pool.fetch("SELECT i, v FROM j ORDER BY i")
        assert [r["v"] for r in rows if r["i"] < 100] == expected
        assert [r["v"] for r in rows if r["i"] >= 100] == expected
        # Integers stay integers, exactly, and the database holds them as numbers.
        assert rows[2]["v"]["big"] == 2**70 and isinstance(rows[2]["v"]["big"], int)
        assert await pool.fetchval("SELECT (v->>'big')::numeric = 2^70 FROM j WHERE i = 2")
    finally:
        await pool.close()
