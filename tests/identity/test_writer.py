"""The batch writer assumes no stored message ids, and finds out when one is."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pgserver
import pytest

from services.common import tenancy
from services.common.db import apply_migrations, create_pool
from services.identity import record
from services.identity.module import MODULE as IDENTITY
from tests.identity.conftest import Identity, Tenant, identify, track, uid


async def test_a_batch_repeating_stored_message_ids_reports_them_and_stores_the_rest(
    identity: Identity, tenant: Tenant
) -> None:
    ws = tenant.workspace.id
    user = uid()
    first, second, third = track("A", user_id=user), identify({"plan": "gold"}, user_id=user), track("C", user_id=user)
    pool = await create_pool(identity.db_url, max_size=2)
    try:
        writer = record.BatchWriter(pool)
        stored = await writer.record(ws, [first, second])
        assert [o.duplicate for o in stored] == [False, False]
        # The first attempt goes without reading the stored ids; the COPY finds the repeat.
        again = await writer.record(ws, [second, third])
        assert [o.duplicate for o in again] == [True, False]
        assert again[0].contact_id is None
        # Retries come in runs: for a while every batch reads its stored ids first.
        assert writer._probe_until > time.monotonic()
        async with pool.acquire() as conn:
            count = await conn.fetchval(
                "SELECT count(*) FROM identity.events WHERE workspace_id = $1::uuid AND user_key IS NOT NULL", ws
            )
        assert count == 3
    finally:
        await pool.close()


async def test_a_batch_whose_process_stops_answering_frees_its_locks(
    identity: Identity, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A frozen identity process keeps its batch's transaction open: PostgreSQL ends it after the
    # batch's idle timeout (made short here), not the pool's minute, so other replicas' batches
    # for the same users stop waiting.
    monkeypatch.setattr(record, "BATCH_IDLE_TIMEOUT_MS", 200)
    real_resolve = record.resolve
    frozen = asyncio.Event()

    def stalled(*args: object, **kwargs: object) -> record.Plan:
        if not frozen.is_set():
            frozen.set()
            time.sleep(0.6)  # the whole process stops, as a frozen one would
        return real_resolve(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(record, "resolve", stalled)
    ws, user = tenant.workspace.id, uid()
    events = [identify({"plan": "gold"}, user_id=user, phone="+14155550177"), track("A", user_id=user)]
    pool = await create_pool(identity.db_url, max_size=2)
    try:
        writer = record.BatchWriter(pool)
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError)):
            await writer.record(ws, events)
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == 0
        # Nothing was stored; the retry stores the batch.
        assert [o.duplicate for o in await writer.record(ws, events)] == [False, False]
    finally:
        await pool.close()


@pytest.fixture
def small_lock_table(tmp_path: Path) -> Iterator[str]:
    """A server of its own, whose lock table holds ~10 locks per connection slot: filling it here
    leaves every other server (and test run) alone, and takes a few thousand locks, not ~12,000.
    Embedded (pgserver) even when ``PARLEY_DATABASE_URL`` names a server: the setting it needs is
    server-wide and read at start."""
    server = pgserver.get_server(tmp_path / "pgdata", cleanup_mode="stop")
    server.psql("ALTER SYSTEM SET max_locks_per_transaction = 10;")
    server.cleanup()  # max_locks_per_transaction is read at start
    server = pgserver.get_server(tmp_path / "pgdata", cleanup_mode="stop")
    try:
        yield str(server.get_uri())
    finally:
        server.cleanup()


async def _fill_lock_table(conn: asyncpg.Connection) -> int:
    """Take advisory locks in ``conn``'s open transaction until PostgreSQL's lock table is full."""
    held, first = 0, 10**15
    while True:
        await conn.execute("SAVEPOINT fill")
        try:
            await conn.execute(
                "SELECT pg_advisory_xact_lock(k) FROM generate_series($1::int8, $2::int8) AS k", first, first + 19
            )
        except asyncpg.OutOfMemoryError:
            await conn.execute("ROLLBACK TO SAVEPOINT fill")
            return held
        await conn.execute("RELEASE SAVEPOINT fill")
        held, first = held + 20, first + 20


async def test_a_batch_that_finds_the_lock_table_full_waits_and_runs_again(small_lock_table: str) -> None:
    # Write connections in flight each hold a lock per id and phone of their batch; with enough
    # of them, PostgreSQL's shared lock table fills ("out of shared memory"). Here one
    # transaction fills it, and lets go while the batch waits.
    pool = await create_pool(small_lock_table, max_size=2)
    hog = await asyncpg.connect(small_lock_table)
    release: asyncio.Task[None] | None = None
    try:
        await tenancy.migrate(pool)
        await apply_migrations(pool, "identity", IDENTITY.migrations)
        workspace, _key = await tenancy.create_workspace(pool, "locks")
        ws = workspace.id
        events = [track("A", user_id=uid()) for _ in range(300)]
        writer = record.BatchWriter(pool)
        hog_tx = hog.transaction()
        await hog_tx.start()
        assert await _fill_lock_table(hog) > 0

        async def release_soon() -> None:
            await asyncio.sleep(0.3)
            await hog_tx.rollback()

        release = asyncio.create_task(release_soon())
        started = time.monotonic()
        outcomes = await writer.record(ws, events)
        took = time.monotonic() - started
        assert release.done() and took >= 0.3  # it waited for the locks to go, and did not fail
        assert [o.duplicate for o in outcomes] == [False] * len(events)
        async with pool.acquire() as conn:
            count = await conn.fetchval(
                "SELECT count(*) FROM identity.events WHERE workspace_id = $1::uuid AND message_id = ANY($2::text[])",
                ws,
                [e.message_id for e in events],
            )
        assert count == len(events)
    finally:
        if release is not None:
            release.cancel()
        await hog.close()
        await pool.close()
