"""The batch writer assumes no stored message ids, and finds out when one is."""

from __future__ import annotations

import time

from services.common.db import create_pool
from services.identity import record
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
