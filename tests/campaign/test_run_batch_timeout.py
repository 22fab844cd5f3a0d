"""A batch of claimed runs may idle longer than the pool allows: it calls other services."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from services.campaign import repository
from tests.campaign.conftest import Campaigns, seed

WAITS = {
    "trigger": {"event": {"name": "Quote Requested"}},
    "steps": [{"id": "w", "next": "", "wait": {"duration": "1h"}}],
}


async def test_a_batch_of_runs_sets_its_own_idle_limit(
    campaigns_only: Campaigns, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its transaction (its claim) stays open while the runs call identity, messaging and ingest:
    # the pool's one minute would roll healthy batches back behind a slow peer.
    c = campaigns_only
    campaign = await c.live("idle-limit", WAITS)
    await seed(c, campaign, ["contact-1", "contact-2"])
    seen: list[str] = []
    real = repository.claim_due

    async def claim_due(conn: asyncpg.Connection, *args: Any, **kwargs: Any) -> Any:
        seen.append(await conn.fetchval("SHOW idle_in_transaction_session_timeout"))
        return await real(conn, *args, **kwargs)

    monkeypatch.setattr(repository, "claim_due", claim_due)
    assert await c.engine.run_due() == 2
    assert seen and set(seen) == {"5min"}
    async with c.engine.pool.acquire() as conn:  # the pool's own limit is back after the batch
        assert await conn.fetchval("SHOW idle_in_transaction_session_timeout") == "1min"
