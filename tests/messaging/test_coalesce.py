"""Group commit: concurrent items share a transaction; a failing item does not fail its neighbours."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import asyncpg
import pytest

from services.common.db import create_pool
from services.messaging.coalesce import Coalescer


async def test_batches_and_isolates_failures(db_url: str) -> None:
    pool = await create_pool(db_url, max_size=2)
    batches: list[list[int]] = []

    async def handle(conn: asyncpg.Connection, items: Sequence[int]) -> list[int]:
        batches.append(list(items))
        if 13 in items:
            raise ValueError("unlucky")
        return [int(await conn.fetchval("SELECT $1::int * 2", i)) for i in items]

    try:
        co: Coalescer[int, int] = Coalescer(pool, handle)
        results = await asyncio.gather(*(co.submit(i) for i in range(20)), return_exceptions=True)
    finally:
        await pool.close()
    assert [r for i, r in enumerate(results) if i != 13] == [i * 2 for i in range(20) if i != 13]
    assert isinstance(results[13], ValueError)
    assert any(len(b) > 1 for b in batches)  # concurrent callers shared a transaction


@pytest.mark.parametrize("n", [1])
async def test_a_lone_caller_gets_its_own_transaction(db_url: str, n: int) -> None:
    pool = await create_pool(db_url, max_size=1)

    async def handle(conn: asyncpg.Connection, items: Sequence[int]) -> list[int]:
        return list(items)

    try:
        assert await Coalescer(pool, handle).submit(n) == n
    finally:
        await pool.close()


async def test_linger_lets_later_callers_share_the_transaction(db_url: str) -> None:
    pool = await create_pool(db_url, max_size=1)
    batches: list[list[int]] = []

    async def handle(conn: asyncpg.Connection, items: Sequence[int]) -> list[int]:
        batches.append(list(items))
        return list(items)

    async def later(co: Coalescer[int, int], item: int) -> int:
        await asyncio.sleep(0.01)
        return await co.submit(item)

    try:
        co: Coalescer[int, int] = Coalescer(pool, handle, linger=0.2)
        started = time.perf_counter()
        assert await co.submit(0) == 0  # alone: no waiting
        assert time.perf_counter() - started < 0.2
        # Concurrent callers: the flush waits for the ones a little behind.
        assert await asyncio.gather(co.submit(1), co.submit(2), later(co, 3), later(co, 4)) == [1, 2, 3, 4]
    finally:
        await pool.close()
    assert batches == [[0], [1, 2, 3, 4]]


async def test_after_a_batch_of_several_the_next_lone_caller_lingers_once(db_url: str) -> None:
    pool = await create_pool(db_url, max_size=1)
    batches: list[list[int]] = []

    async def handle(conn: asyncpg.Connection, items: Sequence[int]) -> list[int]:
        batches.append(list(items))
        return list(items)

    async def timed(co: Coalescer[int, int], item: int) -> float:
        started = time.perf_counter()
        assert await co.submit(item) == item
        return time.perf_counter() - started

    try:
        co: Coalescer[int, int] = Coalescer(pool, handle, linger=0.2)
        assert await asyncio.gather(co.submit(1), co.submit(2)) == [1, 2]
        after_several = await timed(co, 3)  # load was seen: it waits for company that does not come
        after_one = await timed(co, 4)  # its batch of one ended that: no waiting
    finally:
        await pool.close()
    assert batches == [[1, 2], [3], [4]]
    assert after_several >= 0.19
    assert after_one < 0.2
