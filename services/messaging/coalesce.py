"""Group commit: concurrent callers' items handled in one transaction, so the database sees batches."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import asyncpg

T = TypeVar("T")
R = TypeVar("R")


class Coalescer(Generic[T, R]):
    """Queues items from concurrent callers; a flusher runs ``handle(conn, items)`` in one transaction.

    While a batch's transaction runs, later items wait and form the next batch (up to
    ``max_batch``). Under load a flush may first ``linger`` to gather more (see ``linger``);
    otherwise a caller alone gets its own transaction at once. If a batch fails, its items go
    again one by one, so one bad item fails only its own caller.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        handle: Callable[[asyncpg.Connection, Sequence[T]], Awaitable[Sequence[R]]],
        max_batch: int = 500,
        flushers: int = 1,
        linger: float = 0.0,
    ) -> None:
        self._pool = pool
        self._handle = handle
        self.max_batch = max_batch
        self.flushers = flushers
        # Seconds a flush waits for more before it starts, when several callers are waiting or
        # the previous batch held several (load: more are likely on their way; callbacks arrive
        # a few at a time, and each transaction has a fixed cost that waiting callers share).
        # So the first caller after a batch of several waits up to ``linger`` even when it turns
        # out to be alone; its batch of one then ends that, and a lone caller after it does not
        # wait. A caller alone after a batch of one (or as the first ever) never waits.
        self.linger = linger
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._active = 0
        self._last_batch = 0

    async def submit(self, item: T) -> R:
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, fut))
        if self._active < self.flushers:
            self._active += 1
            asyncio.get_running_loop().create_task(self._flush())
        return await fut

    async def _alone(self, item: T, fut: asyncio.Future[R]) -> None:
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                [result] = await self._handle(conn, [item])
        except Exception as exc:
            if not fut.done():
                fut.set_exception(exc)
            return
        if not fut.done():
            fut.set_result(result)

    async def _flush(self) -> None:
        try:
            # Let callers that are already runnable join this batch.
            await asyncio.sleep(0)
            while self._pending:
                busy = len(self._pending) > 1 or self._last_batch > 1
                if self.linger > 0 and busy and len(self._pending) < self.max_batch:
                    await asyncio.sleep(self.linger)
                batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
                self._last_batch = len(batch)
                try:
                    async with self._pool.acquire() as conn, conn.transaction():
                        results = await self._handle(conn, [item for item, _ in batch])
                except Exception as exc:
                    if len(batch) == 1:
                        if not batch[0][1].done():
                            batch[0][1].set_exception(exc)
                    else:
                        # One bad item must not fail its neighbours: each goes again alone.
                        for one in batch:
                            await self._alone(*one)
                    continue
                for (_, fut), result in zip(batch, results, strict=True):
                    if not fut.done():
                        fut.set_result(result)
        finally:
            self._active -= 1
