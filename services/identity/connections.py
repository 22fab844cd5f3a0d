"""A few pool connections held for the life of the service, for the read RPCs' short queries.

The writes (``RecordEvents``) can never take every connection from the reads, and a lookup
skips the pool's acquire and release. A connection that saw an error or a cancellation goes back
to the pool, which cleans or replaces it, and a fresh one takes its place.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import structlog

log = structlog.get_logger(__name__)


def _usable(conn: asyncpg.Connection) -> bool:
    """Whether a held connection can still run queries. When its server connection is lost
    (PostgreSQL restarted, the backend terminated), asyncpg releases it back to the pool on its
    own: the proxy held here is then detached, and every call on it raises ``InterfaceError``."""
    try:
        return not conn.is_closed()
    except asyncpg.InterfaceError:
        return False


class HeldConnections:
    """``async with held.connection() as conn`` borrows one of ``size`` connections taken from ``pool``.

    With ``size`` 0 it borrows from the pool each time instead.
    """

    def __init__(self, pool: asyncpg.Pool, size: int) -> None:
        self._pool = pool
        self._size = max(0, size)
        self._idle: asyncio.Queue[Any] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    async def start(self) -> None:
        for _ in range(self._size):
            self._idle.put_nowait(await self._pool.acquire())

    async def stop(self) -> None:
        """Give every connection back to the pool (borrowed ones as they come back)."""
        self._closing = True
        while not self._idle.empty():
            await self._pool.release(self._idle.get_nowait())
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        if self._size == 0:  # too small a pool to hold any: plain pooled connections
            async with self._pool.acquire() as pooled:
                yield pooled
            return
        conn = await self._idle.get()
        if not _usable(conn):
            conn = await self._reconnect()
        clean = False
        try:
            yield conn
            clean = _usable(conn) and not conn.is_in_transaction()
        finally:
            if clean and not self._closing:
                self._idle.put_nowait(conn)
            else:
                # Not awaited here: this may run inside a cancellation.
                task = asyncio.get_running_loop().create_task(self._replace(conn))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _reconnect(self) -> asyncpg.Connection:
        """A fresh connection for a slot whose connection was lost; when none can be had, the
        slot is refilled in the background and the caller gets the error."""
        try:
            return await self._pool.acquire()
        except BaseException:
            self._keep_slot()
            raise

    def _keep_slot(self) -> None:
        task = asyncio.get_running_loop().create_task(self._retry())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _replace(self, conn: asyncpg.Connection) -> None:
        try:
            await self._pool.release(conn)
        except Exception as exc:
            log.warning("held_connection_release_failed", error=repr(exc))
        if self._closing:
            return
        try:
            self._idle.put_nowait(await self._pool.acquire())
        except Exception as exc:
            log.error("held_connection_replace_failed", error=repr(exc))
            # Keep the slot: try again when it is next needed.
            self._keep_slot()

    async def _retry(self) -> None:
        while not self._closing:
            await asyncio.sleep(1.0)
            try:
                self._idle.put_nowait(await self._pool.acquire())
                return
            except Exception as exc:
                log.warning("held_connection_replace_failed", error=repr(exc))
