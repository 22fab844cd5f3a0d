"""A stored version that does not parse is logged and skipped: the consumer keeps going.

Versions are immutable, so such a row stays broken; what must not happen is the consumer
raising on every batch (the stream would stall for every campaign). Enrollments already on
that version are kept and retried, not ended.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from parley.campaign.v1 import campaign_service_pb2 as pb

from services.campaign.engine import Engine
from tests.campaign.conftest import Stack, consume, track_event
from tests.campaign.test_fresh_runs import Wrapped, fstack, new_contact

__all__ = ["fstack"]

BROKEN = {
    "trigger": {"event": {"name": "Broken Up"}},
    "re_entry": {"policy": "any_time"},
    "steps": [{"id": "rest", "wait": {"duration": "1d"}}],
}


@pytest.fixture
async def broken(fstack: Stack, db_url: str) -> AsyncIterator[pb.Campaign]:
    campaign = await fstack.campaign.live("broken", BROKEN)
    yield campaign
    original = _saved.pop(campaign.id, None)
    if original is None:
        return
    conn = await asyncpg.connect(db_url)
    try:
        # Put the row back as it was stored, for any engine that reads versions later.
        await conn.execute(
            "UPDATE campaign.campaign_versions SET definition = $1::jsonb WHERE campaign_id = $2",
            original,
            uuid.UUID(campaign.id),
        )
    finally:
        await conn.close()


_saved: dict[str, str] = {}


async def _corrupt(db_url: str, campaign: pb.Campaign) -> None:
    conn = await asyncpg.connect(db_url)
    try:
        _saved[campaign.id] = await conn.fetchval(
            "SELECT definition::text FROM campaign.campaign_versions WHERE campaign_id = $1", uuid.UUID(campaign.id)
        )
        await conn.execute(
            """UPDATE campaign.campaign_versions SET definition = '{"steps": "not a list"}'::jsonb
               WHERE campaign_id = $1""",
            uuid.UUID(campaign.id),
        )
    finally:
        await conn.close()


async def test_an_unparsable_version_is_skipped_not_fatal(fstack: Stack, broken: pb.Campaign, db_url: str) -> None:
    s = fstack
    pool = s.campaign.server.runtime.pool
    fx = Wrapped(s.campaign.server.runtime.state["effects"])
    # Enrolled while the version still parsed; a replica that reads it afterwards cannot.
    held = await new_contact(s, 95)
    assert await consume(Engine(pool, fx, s.clock), [track_event(s, held, "Broken Up")]) == 1
    await _corrupt(db_url, broken)
    engine = Engine(pool, fx, s.clock)
    contact = await new_contact(s, 96)
    # Other campaigns still enroll; the broken one is skipped.
    assert await consume(engine, [track_event(s, contact, "Signed Up"), track_event(s, contact, "Broken Up")]) == 1
    resp = await s.campaign.stub.ListEnrollments(pb.ListEnrollmentsRequest(contact_id=contact), metadata=s.campaign.md)
    assert [e.campaign_id for e in resp.enrollments] != [broken.id] and len(resp.enrollments) == 1
    # The enrollment on the broken version is kept and retried later, not ended.
    assert await engine.run_due() >= 1
    row = await pool.fetchrow(
        "SELECT state, attempts FROM campaign.enrollments WHERE campaign_id = $1 AND contact_id = $2",
        uuid.UUID(broken.id),
        held,
    )
    assert row["state"] == "active" and row["attempts"] >= 1
